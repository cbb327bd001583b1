"""Golden outputs for model-upgrade acceptance: the greedy token ids (with the top-k logprobs of every step)
of each generating case, and the perplexity of the fixed text, recorded per backend with
--neox-update-baselines. A later run (a new model revision, DeepSpeed or transformers version) is compared
against them with the parity engine's rules:

* greedy ids: parity.compare_greedy with the near-tie rule (a divergence is forgiven only where each side's
  token is in the other's top-k at that step; the row stops there);
* perplexity: |new - golden| / golden within --neox-parity-multiple times the noise floor measured in this
  session (the HF reference's own low precision vs fp32 on the fixed text), as parity.judge does.

The comparison says which cases changed and how (row, step, tokens, why), and which versions moved.

The HF reference's golden outputs are those of fp32 HF (the ground truth); those of ds, mii and zero are at
the dtype they run. This module is the format and the comparison, free of pytest; the checks that record or
compare them in a test are in checks/golden.py."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from pytest_neoxmii import parity
from pytest_neoxmii.outputs import Generation, PromptBatch, Scores

STATUSES = ("unchanged", "near-tie", "changed", "not-comparable")


# --- recording ----------------------------------------------------------------------------------------

def prompt_digest(batch: PromptBatch) -> str:
    """A short digest of the prompt ids: a golden output answers one prompt, never another."""
    text = json.dumps([list(r) for r in batch.rows], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def golden_case(batch: PromptBatch, generation: Generation, max_new_tokens: int, top_k: int,
                versions: dict | None = None) -> dict:
    """The stored form of one case: ids per row, [[token, logprob], ...] per row and step (highest first),
    and what makes it comparable (prompt digest and lengths, number of new tokens)."""
    return {
        "tokens": [[int(t) for t in row] for row in generation.tokens],
        # 1e-6 nats is far below any noise floor and keeps the files a third shorter; the near-tie rule
        # looks at which tokens are in the top-k, not at the digits.
        "top_logprobs": [[[[int(t), round(float(lp), 6)] for t, lp in list(step)[:top_k]] for step in row]
                         for row in generation.top_logprobs],
        "prompt_lengths": [len(r) for r in batch.rows],
        "prompt_sha256": prompt_digest(batch),
        "max_new_tokens": int(max_new_tokens),
        "versions": dict(versions or {}),
    }


def as_generation(case: dict, steps: int | None = None) -> Generation:
    """A stored case as a Generation, cut to its first `steps` tokens."""
    cut = slice(None) if steps is None else slice(0, steps)
    tokens = [list(row)[cut] for row in case["tokens"]]
    top = [[[(int(t), float(lp)) for t, lp in step] for step in row[cut]] for row in case.get("top_logprobs", [])]
    return Generation(tokens=tokens, top_logprobs=top)


# --- comparing greedy ids -----------------------------------------------------------------------------

@dataclass
class CaseChange:
    case: str
    status: str                  # one of STATUSES
    detail: str                  # how it changed, one line per changed row
    report: parity.GreedyReport | None = None

    @property
    def passed(self) -> bool:
        return self.status in ("unchanged", "near-tie")

    @property
    def first_divergence(self) -> int | None:
        if self.report is None:
            return None
        return min((r.divergence_step for r in self.report.rows if r.divergence_step is not None), default=None)

    def line(self) -> str:
        return f"{self.case}: {self.status}" + (f" ({self.detail})" if self.detail else "")


def _row_detail(r: parity.GreedyRowResult) -> str:
    if r.divergence_step is None:
        return f"row {r.row}: {r.reason}"
    return (f"row {r.row}: step {r.divergence_step} token {r.ref_token} -> {r.cand_token} after "
            f"{r.matched_prefix_len} identical ({'near-tie' if r.acceptable else 'changed'}: {r.reason})")


def compare_case(case_id: str, golden: dict, new: Generation, batch: PromptBatch, max_new_tokens: int,
                 top_k: int) -> CaseChange:
    """Compare a new generation of a case with its golden output (the golden side plays the reference)."""
    digest = golden.get("prompt_sha256")
    if digest is not None and digest != prompt_digest(batch):
        return CaseChange(case_id, "not-comparable",
                          "the golden output answers other prompt ids (another --neox-seed or tokenizer)")
    ids = min((len(r) for r in golden["tokens"]), default=0)
    asked = golden.get("max_new_tokens")               # (older files lack it: their ids' count stands in)
    recorded = asked if asked is not None else ids     # (an integer >= 1: storage/schema.py)
    if recorded < max_new_tokens:
        return CaseChange(case_id, "not-comparable",
                          f"recorded with {recorded} new tokens, this run generates {max_new_tokens}")
    if ids < max_new_tokens:
        # Fewer ids than the recording asked for: an engine's text re-tokenized, special tokens dropped, as MII
        # was judged before it was judged on the ids it generates (3b3cb80). Its steps no longer line up with
        # a run's ids (seen on one H200: MII's short-b1-len16, 31 ids recorded for 32, pad token 1 at step 21).
        return CaseChange(case_id, "not-comparable",
                          f"recorded with {ids} ids for {recorded} new tokens: ids re-tokenized from the engine's "
                          f"text, as MII's were judged before its own ids were")
    report = parity.compare_greedy(as_generation(golden, max_new_tokens), new, top_k)
    if report.errors:
        return CaseChange(case_id, "changed", "; ".join(report.errors), report)
    if all(r.identical for r in report.rows):
        return CaseChange(case_id, "unchanged", "", report)
    detail = "; ".join(_row_detail(r) for r in report.rows if not r.identical)
    return CaseChange(case_id, "near-tie" if report.passed else "changed", detail, report)


# --- perplexity ---------------------------------------------------------------------------------------

def perplexity(scores: Scores, batch: PromptBatch) -> tuple[float | None, int]:
    """exp(mean NLL) of each real position's next real token, over the whole batch (as
    parity.teacher_forced_metrics computes it, without the vocabulary-wide work); (None, 0) without targets."""
    ids, mask = batch.padded()
    mask = mask.bool()
    lp = scores.logprobs
    nll = []
    for b in range(batch.batch_size):
        idx = mask[b].nonzero().squeeze(1)
        if idx.numel() < 2:
            continue
        src, tgt = idx[:-1], idx[1:]
        keep = tgt == src + 1                     # left padding: real tokens are contiguous
        nll.append(-lp[b, src[keep], ids[b, tgt[keep]]].to(torch.float64))
    if not nll:
        return None, 0
    all_nll = torch.cat(nll)
    return math.exp(float(all_nll.mean())), int(all_nll.numel())


@dataclass
class PerplexityChange:
    golden: float
    current: float
    floor_rel: float | None      # this session's noise floor: |ppl(HF low precision) - ppl(HF fp32)| / ppl(fp32)
    multiple: float
    # Set when the golden perplexity is a low-precision one recorded on another machine (another GPU class, or
    # a GPU for a CPU session): that machine's name and its session's noise floor then (see `limit`).
    recorded_on: str | None = None
    recorded_floor_rel: float | None = None

    @property
    def rel_diff(self) -> float:
        if not (math.isfinite(self.golden) and math.isfinite(self.current)) or self.golden <= 0:
            return math.inf
        return abs(self.current - self.golden) / self.golden

    def _limit_of(self, floor_rel: float | None) -> float:
        return self.multiple * max(floor_rel or 0.0, parity.PPL_REL_EPSILON)

    def _term(self, floor_rel: float | None) -> str:
        """How _limit_of reads in a message."""
        floor = "-" if floor_rel is None else f"{floor_rel:.3g}"
        return f"{self.multiple:g} x max(noise floor {floor}, {parity.PPL_REL_EPSILON:g})"

    @property
    def limit_here(self) -> float:
        return self._limit_of(self.floor_rel)

    @property
    def limit_recorded(self) -> float:
        """Another machine's low-precision kernels sit within their own limit of the fp32 answer, as this
        machine's sit within theirs (the parity judge holds each there; the two fp32 answers agree to 1e-6),
        so the two may lie up to both limits apart. Measured: synthetic pythia-70m, fixed text, fp16: ds on one
        H200 +0.082 % from fp32, ds on a CPU -0.026 %; 0.108 % apart, each within its 0.1 %. Zero for a golden
        of this machine's class, or an fp32 one."""
        return 0.0 if self.recorded_on is None else self._limit_of(self.recorded_floor_rel)

    @property
    def limit(self) -> float:
        return self.limit_here + self.limit_recorded

    @property
    def passed(self) -> bool:
        return self.rel_diff <= self.limit

    def message(self) -> str:
        change = (self.current - self.golden) / self.golden * 100 if self.golden else math.inf
        why = self._term(self.floor_rel)
        if self.recorded_on is not None:
            why = f"{why} here + {self._term(self.recorded_floor_rel)} on {self.recorded_on}, where it was recorded"
        return (f"perplexity {self.golden:.4f} -> {self.current:.4f} ({change:+.3f}%): relative change "
                f"{self.rel_diff:.3g} {'<=' if self.passed else '>'} limit {self.limit:.3g} ({why})")


def compare_perplexity(golden: float, current: float, floor_rel: float | None, multiple: float,
                       recorded_on: str | None = None, recorded_floor_rel: float | None = None) \
        -> PerplexityChange:
    """recorded_on: the machine class of a low-precision golden recorded elsewhere (None: this class, or fp32)."""
    return PerplexityChange(float(golden), float(current), floor_rel, float(multiple), recorded_on,
                            recorded_floor_rel)


# --- the summary --------------------------------------------------------------------------------------

def version_changes(recorded: dict | None, now: dict | None) -> list[str]:
    """'deepspeed 0.19.8 -> 0.20.0' for every package whose version moved since the golden outputs."""
    recorded, now = recorded or {}, now or {}
    out = []
    for name in sorted(set(recorded) | set(now)):
        a, b = recorded.get(name), now.get(name)
        if a != b:
            out.append(f"{name} {a or 'not installed'} -> {b or 'not installed'}")
    return out


@dataclass
class GoldenSummary:
    """Which cases changed and how, for one backend."""
    backend: str
    changes: list[CaseChange] = field(default_factory=list)
    perplexity: PerplexityChange | None = None
    versions: list[str] = field(default_factory=list)
    source: str = ""             # where the golden outputs came from (file, GPU class)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.changes) and (self.perplexity is None or self.perplexity.passed)

    def text(self) -> str:
        counts = {s: sum(c.status == s for c in self.changes) for s in STATUSES}
        head = f"golden outputs of {self.backend}"
        if self.source:
            head += f" ({self.source})"
        parts = [f"{counts['unchanged']}/{len(self.changes)} cases unchanged"] if self.changes else []
        parts += [f"{counts[s]} {s}" for s in STATUSES[1:] if counts[s]]
        if self.perplexity is not None:
            parts.append(self.perplexity.message())
        lines = [head + ": " + (", ".join(parts) or "nothing compared")]
        if self.versions:
            lines.append("versions since the golden outputs were recorded: " + ", ".join(self.versions))
        lines += [f"  {c.line()}" for c in self.changes if c.status != "unchanged"]
        return "\n".join(lines)
