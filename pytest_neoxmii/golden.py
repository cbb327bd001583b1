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
the dtype they run."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import pytest
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
    recorded = min((len(r) for r in golden["tokens"]), default=0)
    if recorded < max_new_tokens:
        return CaseChange(case_id, "not-comparable",
                          f"recorded with {recorded} new tokens, this run generates {max_new_tokens}")
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

    @property
    def rel_diff(self) -> float:
        if not (math.isfinite(self.golden) and math.isfinite(self.current)) or self.golden <= 0:
            return math.inf
        return abs(self.current - self.golden) / self.golden

    @property
    def limit(self) -> float:
        return self.multiple * max(self.floor_rel or 0.0, parity.PPL_REL_EPSILON)

    @property
    def passed(self) -> bool:
        return self.rel_diff <= self.limit

    def message(self) -> str:
        change = (self.current - self.golden) / self.golden * 100 if self.golden else math.inf
        floor = "-" if self.floor_rel is None else f"{self.floor_rel:.3g}"
        return (f"perplexity {self.golden:.4f} -> {self.current:.4f} ({change:+.3f}%): relative change "
                f"{self.rel_diff:.3g} {'<=' if self.passed else '>'} limit {self.limit:.3g} "
                f"({self.multiple:g} x max(noise floor {floor}, {parity.PPL_REL_EPSILON:g}))")


def compare_perplexity(golden: float, current: float, floor_rel: float | None, multiple: float) \
        -> PerplexityChange:
    return PerplexityChange(float(golden), float(current), floor_rel, float(multiple))


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


# --- the acceptance checks ----------------------------------------------------------------------------

def _golden_backend(neox, name: str):
    return neox.reference() if name == "hf" else neox.backend(name)


def _where(neox, name: str, backend):
    from pytest_neoxmii import baseline_io
    store = baseline_io.store_for(neox)
    key = baseline_io.key_for(neox, name, backend.info.dtype, backend.info.tensor_parallel)
    return store, key, baseline_io.gpu_class(neox)


def _load(store, key, cls, request, what: str):
    """(class the golden outputs came from, golden dict); skips with the how-to when there are none."""
    from pytest_neoxmii import baseline_io
    got = baseline_io.fail_on_bad_file(lambda: store.golden(key, cls))
    if got is None:
        command = baseline_io.update_command(request.config) if request is not None else baseline_io.UPDATE_FLAG
        pytest.skip(f"no golden outputs ({what}) in {baseline_io.shown_path(store, key)}; create them with: "
                    f"{command}")
    return got


def _source(store, key, src_cls: str, cls: str) -> str:
    from pytest_neoxmii import baseline_io
    where = baseline_io.shown_path(store, key)
    return f"{where}, GPU class {src_cls}" + ("" if src_cls == cls else f", this machine is {cls}")


def check_golden(neox, backend_name: str, case, request=None) -> CaseChange | None:
    """Record (--neox-update-baselines) or compare the golden greedy output of one case on one backend."""
    from pytest_neoxmii import baseline_io
    from pytest_neoxmii.session import Record

    if not case.plan.generate:
        pytest.skip(f"{case.id} is scored teacher-forced only")
    backend = _golden_backend(neox, backend_name)
    from pytest_neoxmii.checks import mark_known_issue
    known = mark_known_issue(request, "greedy", backend, case)   # a known decode defect has no golden output
    store, key, cls = _where(neox, backend_name, backend)
    # Read first: an unusable file fails (and a missing one skips) before any model call.
    got = None if neox.options.update_baselines else _load(store, key, cls, request, "greedy ids")
    gen = neox.generation(backend, case)
    top_k = neox.options.top_k
    if neox.options.update_baselines:
        bad = parity.find_nonfinite(gen, f"{backend_name} {backend.info.dtype} generation of {case.id}")
        if bad:     # a golden output is what a correct run answers: NaN/Inf never is (nor valid JSON)
            neox.record(Record("golden", backend_name, case.id, False, {"status": "non-finite"},
                               parity.find_nonfinite(gen, case.id), known))
            pytest.fail(f"not recorded as a golden output: {bad}", pytrace=False)
        entry = golden_case(case.batch, gen, case.plan.max_new_tokens, top_k, baseline_io.versions())
        path = baseline_io.merge_golden(store, key, cls, cases={case.id: entry})
        neox.record(Record("golden", backend_name, case.id, True, {"status": "recorded"},
                           f"recorded for GPU class {cls} in {path}"))
        print(f"golden output of {case.id} ({backend.info.describe()}) written to {path}")
        return None

    src_cls, golden = got
    stored = golden["cases"].get(case.id)
    if stored is None:
        command = baseline_io.update_command(request.config) if request is not None else baseline_io.UPDATE_FLAG
        pytest.skip(f"no golden output for case {case.id} in {_source(store, key, src_cls, cls)}; "
                    f"create it with: {command}")
    change = compare_case(case.id, stored, gen, case.batch, case.plan.max_new_tokens, top_k)
    summary = GoldenSummary(f"{backend_name} {backend.info.dtype}", [change],
                            versions=version_changes(stored.get("versions", golden.get("versions")),
                                                     baseline_io.versions()),
                            source=_source(store, key, src_cls, cls))
    metrics = {"status": change.status, "first_divergence": change.first_divergence, "gpu_class": src_cls,
               "detail": change.detail}
    from pytest_neoxmii.checks import config_note
    note = config_note(neox, backend_name, case, "greedy", metrics)
    neox.record(Record("golden", backend_name, case.id, change.passed if change.status != "not-comparable"
                       else None, metrics, change.line(), known))
    if request is not None:
        request.node.user_properties.append(("golden_status", change.status))
    print(summary.text())
    if change.status == "not-comparable":
        pytest.skip(f"golden output of {case.id} not comparable: {change.detail}; re-record it with "
                    f"{baseline_io.UPDATE_FLAG}")
    if not change.passed:
        pytest.fail(note + summary.text() + "\n" + change.report.message(), pytrace=False)
    return change


def fixed_text_case(neox):
    plan = next(p for p in neox.plans() if p.family == "fixed-text")
    return neox.case(plan)


def session_floor(neox, case) -> float | None:
    """The perplexity noise floor of this session: HF at the session's dtype against HF fp32."""
    ref, _ = perplexity(neox.scores(neox.reference(), case), case.batch)
    low, _ = perplexity(neox.scores(neox.peer(), case), case.batch)
    if ref is None or low is None or not ref > 0:
        return None
    return abs(low - ref) / ref


def check_golden_perplexity(neox, backend_name: str, request=None) -> PerplexityChange | None:
    """Record or compare the perplexity of the fixed text on one backend."""
    from pytest_neoxmii import baseline_io
    from pytest_neoxmii.session import Record

    case = fixed_text_case(neox)
    backend = _golden_backend(neox, backend_name)
    store, key, cls = _where(neox, backend_name, backend)
    got = None if neox.options.update_baselines else _load(store, key, cls, request, "perplexity")
    ppl, targets = perplexity(neox.scores(backend, case), case.batch)
    floor = session_floor(neox, case)
    if ppl is None or not math.isfinite(ppl):
        pytest.fail(f"{backend.info.describe()}: perplexity of the fixed text is {ppl} (no finite value)",
                    pytrace=False)
    if neox.options.update_baselines:
        path = baseline_io.merge_golden(store, key, cls, perplexity={
            "perplexity": ppl, "targets": targets, "case": case.id, "prompt_sha256": prompt_digest(case.batch),
            "noise_floor_rel": floor, "dtype": backend.info.dtype})
        neox.record(Record("golden-perplexity", backend_name, case.id, True, {"perplexity": ppl},
                           f"recorded {ppl:.4f} for GPU class {cls} in {path}"))
        print(f"golden perplexity {ppl:.4f} of {backend.info.describe()} written to {path}")
        return None

    src_cls, golden = got
    detail = golden.get("perplexity_detail") or {}
    if golden.get("perplexity") is None:
        pytest.skip(f"no golden perplexity in {_source(store, key, src_cls, cls)}; record it with "
                    f"{baseline_io.UPDATE_FLAG}")
    if detail.get("prompt_sha256") not in (None, prompt_digest(case.batch)):
        pytest.skip("the golden perplexity was measured on other token ids of the fixed text (another "
                    f"tokenizer); re-record it with {baseline_io.UPDATE_FLAG}")
    change = compare_perplexity(golden["perplexity"], ppl, floor, neox.options.parity_multiple)
    summary = GoldenSummary(f"{backend_name} {backend.info.dtype}", [], change,
                            version_changes(golden.get("versions"), baseline_io.versions()),
                            _source(store, key, src_cls, cls))
    neox.record(Record("golden-perplexity", backend_name, case.id, change.passed,
                       {"perplexity": ppl, "golden": change.golden, "rel_diff": change.rel_diff,
                        "limit": change.limit, "gpu_class": src_cls}, change.message()))
    if request is not None:
        request.node.user_properties.append(("golden_perplexity", ppl))
    print(summary.text())
    if not change.passed:
        pytest.fail(summary.text(), pytrace=False)
    return change
