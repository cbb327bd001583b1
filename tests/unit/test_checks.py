"""checks/parity.py against a real NeoxSession whose backends are tiny stand-ins with fixed outputs (no model): the
verdicts, what is recorded for the report, the failure messages, and the strict xfail of a known issue.

The stand-ins are plain functions and classes so that the pytester test at the end can write the same code
into a module of its own (inspect.getsource) and run a check inside a real pytest test."""
from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import types

import pytest
import torch

from pytest_neoxmii import checks, parity
from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.cases import Case, CasePlan
from pytest_neoxmii.options import NeoxOptions
from pytest_neoxmii.outputs import Generation, PromptBatch, Scores
from pytest_neoxmii.parity import ParityFailure
from pytest_neoxmii.session import NeoxSession

HEADER = '''
from pathlib import Path
import torch
from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.cases import Case, CasePlan
from pytest_neoxmii.options import NeoxOptions
from pytest_neoxmii.outputs import Generation, PromptBatch, Scores
from pytest_neoxmii.session import NeoxSession
'''

INJECTED = "injected 6/6 layers"


class StandInBackend:
    """A backend with fixed outputs; `trace` fails, as a backend without hidden states would."""

    def __init__(self, backend: str, dtype: str, *, generation=None, scores=None, kernels: str = "none"):
        self.info = BackendInfo(backend=backend, dtype=dtype, device="cpu", kernels=kernels)
        self._generation, self._scores = generation, scores
        self.calls: list[str] = []

    def generate(self, batch, max_new_tokens, top_k=5):
        self.calls.append("generate")
        return self._generation

    def score(self, batch):
        self.calls.append("score")
        return self._scores

    def trace(self, batch):
        raise RuntimeError("the stand-in has no hidden states")

    def close(self):
        pass


def stand_in_session(backends, dtype: str = "fp16", top_k: int = 2, multiple: float = 10.0) -> NeoxSession:
    """A real NeoxSession with the stand-in backends already loaded (keyed as the session keys them)."""
    options = NeoxOptions(model=None, revision="main", weights="synthetic", dtype=dtype, tp=1,
                          backends=("hf", "ds", "mii", "zero"), baseline_dir=Path("baselines"),
                          update_baselines=False, max_new_tokens=2, seed=0, top_k=top_k,
                          parity_multiple=multiple, cases="default", cache_dir=None, zero_nvme=None,
                          latency_threshold=0.1, report_dir=None)
    session = NeoxSession(options, model=None)
    for b in backends:
        session.backends[f"{b.info.backend}:{b.info.dtype}"] = b
    return session


def padded_case(generate: bool = True) -> Case:
    """Two left-padded rows of unequal length (3 and 2 tokens), 2 new tokens."""
    plan = CasePlan(id="padded-3+2", family="padded", lengths=(3, 2), generate=generate, max_new_tokens=2)
    return Case(plan, PromptBatch(rows=((5, 6, 7), (8, 9)), pad_token_id=0))


def equal_case() -> Case:
    plan = CasePlan(id="batch-2x3", family="batch", lengths=(3, 3), generate=True, max_new_tokens=2)
    return Case(plan, PromptBatch(rows=((5, 6, 7), (8, 9, 10)), pad_token_id=0))


def greedy(second_token_row0: int) -> Generation:
    """Row 0 generates 1 then `second_token_row0`; the reference's choice at step 1 is 2, its runner-up 3
    and token 8 is far down. Row 1 always generates 4, 4."""
    tops = {2: [(2, -0.1), (3, -0.2), (8, -6.0)], 3: [(3, -0.1), (2, -0.2), (8, -6.0)],
            8: [(8, -0.1), (3, -0.2), (2, -6.0)]}
    return Generation(tokens=[[1, second_token_row0], [4, 4]],
                      top_logprobs=[[[(1, -0.1)], tops[second_token_row0]], [[(4, -0.1)], [(4, -0.1)]]])


def scores(case: Case, perturbation: float) -> Scores:
    """Logprobs of a fixed random model, plus `perturbation` times a fixed noise direction."""
    g = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(case.batch.batch_size, case.batch.max_len, 32, generator=g)
    logits = logits + perturbation * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    _, mask = case.batch.padded()
    return Scores(logprobs=torch.log_softmax(logits, dim=-1), mask=mask.bool())


def fake_request():
    """The two things checks/parity.py uses of pytest's `request`: node.user_properties and applymarker."""
    markers = []
    return SimpleNamespace(node=SimpleNamespace(user_properties=[]), applymarker=markers.append, markers=markers)


# ---------------------------------------------------------------------------------------------- greedy

def test_check_greedy_passes_records_and_prints_the_table(capsys):
    ref = StandInBackend("hf", "fp32", generation=greedy(2))
    ds = StandInBackend("ds", "fp16", generation=greedy(2))
    session, request = stand_in_session([ref, ds]), fake_request()
    report = checks.check_greedy(session, "ds", padded_case(), request)
    assert report.passed and report.top_k == 2
    [record] = session.records
    assert (record.check, record.backend, record.case, record.passed) == ("greedy", "ds", "padded-3+2", True)
    assert record.metrics == {"rows": 2, "rows_identical": 2, "first_divergence": None}
    assert record.summary == report.summary()
    assert request.node.user_properties == [("greedy_rows", 2), ("greedy_rows_identical", 2),
                                            ("greedy_first_divergence", None)]
    assert "greedy parity PASSED (near-tie rule: top-2)" in capsys.readouterr().out
    assert request.markers == []                      # no known issue on CPU (no kernels injected)


def test_check_greedy_near_tie_passes_with_the_divergence_recorded():
    session = stand_in_session([StandInBackend("hf", "fp32", generation=greedy(2)),
                                StandInBackend("ds", "fp16", generation=greedy(3))])
    assert checks.check_greedy(session, "ds", padded_case()).passed
    assert session.records[0].passed is True
    assert session.records[0].metrics == {"rows": 2, "rows_identical": 1, "first_divergence": 1}


def test_check_greedy_fails_with_the_backend_and_the_reason():
    session = stand_in_session([StandInBackend("hf", "fp32", generation=greedy(2)),
                                StandInBackend("ds", "fp16", generation=greedy(8))])
    with pytest.raises(ParityFailure) as failure:
        checks.check_greedy(session, "ds", padded_case())
    text = str(failure.value)
    assert text.startswith("ds: fp16 on cpu, tp=1, kernels none\ngreedy parity FAILED (near-tie rule: top-2)")
    assert "candidate token 8 is not in the reference's top-2 at step 1" in text
    assert failure.value.report.passed is False
    [record] = session.records
    assert record.passed is False and record.metrics["first_divergence"] == 1


def test_check_greedy_uses_the_sessions_top_k():
    """Token 8 is third in the reference's list and 2 third in the candidate's: a near-tie at top-3 only."""
    def session(top_k):
        return stand_in_session([StandInBackend("hf", "fp32", generation=greedy(2)),
                                 StandInBackend("ds", "fp16", generation=greedy(8))], top_k=top_k)
    assert checks.check_greedy(session(3), "ds", padded_case()).passed
    with pytest.raises(ParityFailure, match="not in the reference's top-2"):
        checks.check_greedy(session(2), "ds", padded_case())


def test_check_greedy_skips_a_scoring_only_case_without_calling_a_backend():
    ds = StandInBackend("ds", "fp16", generation=greedy(2))
    with pytest.raises(pytest.skip.Exception, match="padded-3\\+2 is scored teacher-forced only"):
        checks.check_greedy(stand_in_session([ds]), "ds", padded_case(generate=False))
    assert ds.calls == []


# ---------------------------------------------------------------------------------------------- teacher-forced

def tf_session(candidate_perturbation: float, backend_dtype: str = "fp16", session_dtype: str = "fp16",
               multiple: float = 10.0):
    case = padded_case()
    hf32 = StandInBackend("hf", "fp32", scores=scores(case, 0.0))
    hf_low = StandInBackend("hf", backend_dtype, scores=scores(case, 0.01))      # the noise floor
    ds = StandInBackend("ds", backend_dtype, scores=scores(case, candidate_perturbation))
    session = stand_in_session([hf32, hf_low], dtype=session_dtype, multiple=multiple)
    session.backends[f"ds:{session_dtype}"] = ds    # asked for at the session's dtype, ran at its own
    return session, case


def test_check_teacher_forced_within_the_floor_passes_and_records(capsys):
    session, case = tf_session(0.02)
    request = fake_request()
    verdict = checks.check_teacher_forced(session, "ds", case, request)
    assert verdict.passed and verdict.multiple == 10.0
    [record] = session.records
    assert (record.check, record.backend, record.passed) == ("teacher-forced", "ds", True)
    assert record.metrics["kl_max"] == verdict.measured.kl_max > 0
    assert record.metrics["floor_kl_max"] == verdict.floor.kl_max > 0
    assert record.metrics["multiple"] == 10.0
    assert record.metrics["perplexity"] == verdict.measured.perplexity_candidate
    assert record.summary == f"KL max {verdict.measured.kl_max:.3g} vs floor {verdict.floor.kl_max:.3g}"
    assert ("tf_kl_max", verdict.measured.kl_max) in request.node.user_properties
    assert "PASSED" in capsys.readouterr().out
    # the metrics' arithmetic (floor and measured) is the session's "judging" phase, not its overhead
    from pytest_neoxmii.checks.parity import JUDGING
    assert session.timings[JUDGING] > 0


def test_check_teacher_forced_beyond_the_floor_fails_with_localisation_message():
    session, case = tf_session(1.0)
    with pytest.raises(ParityFailure) as failure:
        checks.check_teacher_forced(session, "ds", case)
    text = str(failure.value)
    assert text.startswith("ds: fp16 on cpu, tp=1, kernels none\n")
    assert "FAILED" in text and "kl_max" in text
    # localisation is a help: a backend without hidden states does not turn the failure into an error
    assert text.rstrip().endswith("localisation unavailable: RuntimeError: the stand-in has no hidden states")
    assert session.records[0].passed is False


def test_check_teacher_forced_floor_is_taken_at_the_backends_dtype():
    """A backend that ran in bf16 in an fp16 session (a CPU without fp16) is judged against HF bf16, not the
    session's fp16 peer."""
    session, case = tf_session(0.02, backend_dtype="bf16", session_dtype="fp16")
    # the session's own fp16 peer equals fp32 here (a zero floor): judged against it, ds would fail
    session.backends["hf:fp16"] = StandInBackend("hf", "fp16", scores=scores(case, 0.0))
    verdict = checks.check_teacher_forced(session, "ds", case)
    assert verdict.passed
    assert verdict.floor.kl_max == checks.noise_floor(session, case, "bf16").kl_max > 0
    assert checks.noise_floor(session, case).kl_max == 0


def test_check_teacher_forced_uses_the_sessions_multiple():
    """The candidate is ~2x the floor (perturbation 0.02 vs 0.01): within 10x, not within 1x."""
    session, case = tf_session(0.02, multiple=1.0)
    with pytest.raises(ParityFailure) as failure:
        checks.check_teacher_forced(session, "ds", case)
    assert failure.value.report.multiple == 1.0 and session.records[0].metrics["multiple"] == 1.0


# ---------------------------------------------------------------------------------------------- known issues

def test_known_issue_marks_strict_xfail_only_under_its_condition():
    ref = StandInBackend("hf", "fp32", generation=greedy(2))
    injected = StandInBackend("ds", "fp16", generation=greedy(8), kernels=INJECTED)
    session = stand_in_session([ref, injected])
    request = fake_request()
    with pytest.raises(ParityFailure):                # the check still runs and still fails
        checks.check_greedy(session, "ds", padded_case(), request)
    [marker] = request.markers
    assert marker.name == "xfail" and marker.kwargs["strict"] is True
    assert marker.kwargs["reason"].startswith("known issue [ds-left-padded-decode]: ")
    # rows of equal length: not the known issue, so no marker and a plain failure
    request = fake_request()
    with pytest.raises(ParityFailure):
        checks.check_greedy(session, "ds", equal_case(), request)
    assert request.markers == []


STRICT_XFAIL_TESTS = '''
from pytest_neoxmii.checks import check_greedy
from stand_ins import StandInBackend, greedy, padded_case, stand_in_session

def run(request, candidate_second_token):
    ref = StandInBackend("hf", "fp32", generation=greedy(2))
    ds = StandInBackend("ds", "fp16", generation=greedy(candidate_second_token), kernels="injected 6/6 layers")
    check_greedy(stand_in_session([ref, ds]), "ds", padded_case(), request)

def test_still_broken_upstream(request):
    run(request, 8)

def test_fixed_upstream(request):
    run(request, 2)
'''


def test_known_issue_is_a_strict_xfail_in_a_real_test_run(pytester):
    """Through pytest itself: the known defect is reported xfailed, and once it is fixed the XPASS fails the
    run (strict), naming the known issue, so the entry gets deleted."""
    helpers = [StandInBackend, stand_in_session, padded_case, greedy]
    pytester.makepyfile(stand_ins=HEADER + "\n\n".join(inspect.getsource(h) for h in helpers))
    pytester.makepyfile(test_known_issue=STRICT_XFAIL_TESTS)
    result = pytester.runpytest("-rxX", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, xfailed=1)
    out = result.stdout.str()
    assert "[XPASS(strict)] known issue [ds-left-padded-decode]: " in out
    assert "XFAIL test_known_issue.py::test_still_broken_upstream - known issue [ds-left-padded-decode]" in out


class TextStandIn(StandInBackend):
    generations_from_text = True     # generated text, re-tokenized by the session


def test_check_greedy_compares_a_text_backend_with_the_reference_as_text_shows_it(capsys):
    """The reference generates token 1, a special token the text channel drops; the text backend's row
    therefore lacks it. Judged through the channel it passes; the same ids from a backend that returns ids
    do not (a missing token there is a real divergence)."""
    seen_as_text = Generation(tokens=[[2], [4, 4]], top_logprobs=[[[(2, -0.1), (3, -0.2)]],
                                                                  [[(4, -0.1)], [(4, -0.1)]]])
    session = stand_in_session([StandInBackend("hf", "fp32", generation=greedy(2)),
                                TextStandIn("mii", "fp16", generation=seen_as_text),
                                StandInBackend("ds", "fp16", generation=seen_as_text)])
    session._tokenizer = types.SimpleNamespace(all_special_ids=[0, 1])
    assert checks.check_greedy(session, "mii", padded_case()).passed
    assert "1 special token(s) of the reference dropped: mii returns text" in capsys.readouterr().out
    with pytest.raises(parity.ParityFailure):
        checks.check_greedy(session, "ds", padded_case())


def test_the_noise_floor_is_computed_once_per_case_and_dtype(monkeypatch):
    """Every engine's teacher-forced check and the reference's own test ask for the same floor: it is computed
    once per case and dtype (the 2016-token case's metrics take about 9 s on a 2-core CPU)."""
    from pytest_neoxmii import parity as parity_module
    session, case = tf_session(0.02, backend_dtype="bf16", session_dtype="fp16")
    session.backends["hf:fp16"] = StandInBackend("hf", "fp16", scores=scores(case, 0.0))
    real, computed = parity_module.teacher_forced_metrics, []
    monkeypatch.setattr(parity_module, "teacher_forced_metrics",
                        lambda r, c, b, **kw: computed.append(c) or real(r, c, b, **kw))
    first = checks.noise_floor(session, case, "bf16")
    assert checks.noise_floor(session, case, "bf16") is first and len(computed) == 1
    assert checks.noise_floor(session, case).kl_max == 0 and len(computed) == 2      # fp16: another floor
    checks.check_teacher_forced(session, "ds", case)
    assert len(computed) == 3                                    # the candidate's metrics, not the floor again
