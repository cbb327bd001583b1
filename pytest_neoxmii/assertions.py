"""One assertion for users' own acceptance tests: does a deployment give the HF reference's answers on these
prompts? Greedy ids against fp32 HF (top-k near-tie rule) and, where the deployment can score, teacher-forced
logprobs against the noise floor measured in the same session (HF at the deployment's dtype vs fp32).
On failure it raises parity.ParityFailure whose message is the parity table (one row per prompt and check)
followed by each failing check's own table."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from pytest_neoxmii import backends as engines
from pytest_neoxmii import parity
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.outputs import PromptBatch
from pytest_neoxmii.table import format_table

HEADERS = ["prompt", "tokens", "check", "result", "first divergence", "KL max", "floor KL max", "top-1 agree",
           "verdict"]


@dataclass
class ParityResults:
    """What assert_matches_reference compared: the table it prints, and each check's report or verdict."""
    backend: str
    table: str
    greedy: list[parity.GreedyReport]
    teacher_forced: list[parity.ParityVerdict | None]   # None where the deployment cannot score

    def __str__(self) -> str:
        return f"{self.backend}\n{self.table}"


def _token_ids(neox, prompt) -> tuple[int, ...]:
    if isinstance(prompt, str):
        ids = neox.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = prompt
    else:
        raise TypeError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}")
    if len(ids) < 2:
        raise ValueError(f"prompt {prompt!r} is {len(ids)} token(s): the checks need at least 2")
    return tuple(ids)


def _label(prompt) -> str:
    text = prompt if isinstance(prompt, str) else "ids " + " ".join(map(str, prompt[:6]))
    return text if len(text) <= 32 else text[:29] + "..."


def assert_matches_reference(neox, backend, prompts, *, max_new_tokens: int | None = None) -> ParityResults:
    """Compare `backend` (a deployment fixture such as neox_ds, or a backend name) with the fp32 HF reference
    on each prompt (text, or a list of token ids), one batch-1 case per prompt. Tolerances are the session's
    (--neox-top-k, --neox-parity-multiple). Returns the results (print them, or str()) when every check passes;
    raises ParityFailure with the table otherwise."""
    __tracebackhide__ = True          # pytest shows the user's test line and the message, not this helper
    if isinstance(backend, str):
        backend = neox.backend(backend)
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise TypeError("prompts is a non-empty list of prompts (text or token ids)")
    new = max_new_tokens or neox.options.max_new_tokens
    top_k, multiple = neox.options.top_k, neox.options.parity_multiple
    context = neox.model.spec.max_position_embeddings
    pad = neox.tokenizer.pad_token_id if neox.tokenizer.pad_token_id is not None else 0
    reference, peer = neox.reference(), neox.backend(engines.reference_name(), backend.info.dtype)
    can_score = getattr(backend, "can_score", True)
    rows, failures, greedy_reports, verdicts = [], [], [], []
    for prompt in prompts:
        ids = _token_ids(neox, prompt)
        if len(ids) + new > context:
            raise ValueError(f"prompt {_label(prompt)!r}: {len(ids)} tokens + {new} new = {len(ids) + new} do "
                             f"not fit the model's context of {context}")
        batch, label = PromptBatch(rows=(ids,), pad_token_id=pad), _label(prompt)
        try:
            with neox.timed("model calls"):
                candidate = backend.generate(batch, new, top_k)
        except BackendUnavailable as exc:      # e.g. MII's text interface and a tokenizer that cannot round-trip
            pytest.skip(f"{backend.info.backend}: {exc}")
        with neox.timed("model calls"):
            greedy = parity.compare_greedy(reference.generate(batch, new, top_k), candidate, top_k)
        greedy_reports.append(greedy)
        first = min((r.divergence_step for r in greedy.rows if r.divergence_step is not None), default=None)
        rows.append([label, len(ids), "greedy", greedy.summary(), first, None, None, None,
                     "ok" if greedy.passed else "FAIL"])
        if not greedy.passed:
            failures.append(f"prompt {label!r}: {greedy.message()}")
        verdict = None
        if can_score:
            with neox.timed("model calls"):
                ref_scores = reference.score(batch)
                floor = parity.teacher_forced_metrics(ref_scores, peer.score(batch), batch, device=neox.device)
                measured = parity.teacher_forced_metrics(ref_scores, backend.score(batch), batch,
                                                         device=neox.device)
            verdict = parity.judge(floor, measured, multiple)
            rows.append([label, len(ids), "teacher-forced", "within the floor" if verdict.passed
                         else ", ".join(verdict.failures), None, measured.kl_max, floor.kl_max,
                         measured.top1_agreement, "ok" if verdict.passed else "FAIL"])
            if not verdict.passed:
                failures.append(f"prompt {label!r}: {verdict.message()}")
        verdicts.append(verdict)
    table = format_table(HEADERS, rows)
    results = ParityResults(backend.info.describe(), table, greedy_reports, verdicts)
    if failures:
        raise parity.ParityFailure(
            f"{backend.info.describe()}: {len(failures)} of {len(rows)} checks differ from the fp32 HF reference "
            f"beyond the session's tolerances (top-{top_k} near-tie rule, {multiple:g}x the noise floor)\n"
            f"{table}\n\n" + "\n\n".join(failures), results)
    return results
