"""Golden outputs: recording and comparing greedy ids with the near-tie rule, perplexity against the noise
floor multiple, the summary of which cases changed and how, and merging cases into the baseline store."""
from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
import torch

from pytest_neoxmii import parity
from pytest_neoxmii.cases import CasePlan
from pytest_neoxmii.checks.baseline_policy import BaselinePolicy
from pytest_neoxmii.golden import (CaseChange, GoldenSummary, PerplexityChange, as_generation, compare_case,
                                   compare_perplexity, golden_case, perplexity, prompt_digest, version_changes)
# The pytest layer of golden outputs (the checks, their skips and failures, the session's noise floor): one
# import line, so that moving these names to another module changes only this line.
from pytest_neoxmii.checks import golden as checks_golden
from pytest_neoxmii.checks.golden import check_golden, check_golden_perplexity, session_floor
from pytest_neoxmii.outputs import Generation, PromptBatch, Scores
from pytest_neoxmii.storage import BaselineKey, BaselineStore

BATCH = PromptBatch(rows=((5, 6, 7), (8, 9, 10)), pad_token_id=0)


def _gen(tokens, alt=None):
    """Each step's top-3: the chosen token at -0.1, then `alt` (or token+1) at -0.2 (a near-tie), then 999."""
    top = []
    for r, row in enumerate(tokens):
        steps = []
        for s, t in enumerate(row):
            second = alt[r][s] if alt else t + 1
            steps.append([(t, -0.1), (second, -0.2), (999, -9.0)])
        top.append(steps)
    return Generation(tokens=[list(r) for r in tokens], top_logprobs=top)


TOKENS = [[11, 12, 13, 14], [21, 22, 23, 24]]


def _golden(tokens=TOKENS, batch=BATCH):
    return json.loads(json.dumps(golden_case(batch, _gen(tokens), 4, 5, {"torch": "2.3.0"})))


def test_golden_case_round_trips_through_json():
    stored = _golden()
    assert stored["tokens"] == TOKENS and stored["prompt_lengths"] == [3, 3] and stored["max_new_tokens"] == 4
    assert stored["top_logprobs"][0][0] == [[11, -0.1], [12, -0.2], [999, -9.0]]
    back = as_generation(stored)
    assert back.tokens == TOKENS and back.top_logprobs == _gen(TOKENS).top_logprobs
    assert as_generation(stored, 2).tokens == [[11, 12], [21, 22]]


def test_identical_outputs_are_unchanged():
    change = compare_case("c", _golden(), _gen(TOKENS), BATCH, 4, 5)
    assert (change.status, change.passed, change.detail) == ("unchanged", True, "")


def test_a_changed_token_is_caught_and_described():
    new = [[11, 12, 77, 78], [21, 22, 23, 24]]           # row 0 step 2: 13 -> 77, not in the golden top-k
    change = compare_case("short-b2-len3", _golden(), _gen(new), BATCH, 4, 5)
    assert change.status == "changed" and not change.passed
    assert change.first_divergence == 2
    assert "row 0: step 2 token 13 -> 77 after 2 identical (changed: candidate token 77 is not in the " \
           "reference's top-5 at step 2" in change.detail
    assert "row 1" not in change.detail


def test_a_near_tie_divergence_passes_and_is_reported():
    new = [[11, 12, 14, 15], [21, 22, 23, 24]]           # 14 is golden's runner-up at step 2, 13 the new one's
    change = compare_case("c", _golden(), _gen(new, alt=[[12, 13, 13, 16], [22, 23, 24, 25]]), BATCH, 4, 5)
    assert change.status == "near-tie" and change.passed
    assert "row 0: step 2 token 13 -> 14" in change.detail and "near-tie" in change.detail


def test_shorter_runs_compare_the_recorded_prefix():
    new = _gen([[11, 12], [21, 22]])
    assert compare_case("c", _golden(), new, BATCH, 2, 5).status == "unchanged"
    assert compare_case("c", _golden(), _gen([[11, 99], [21, 22]]), BATCH, 2, 5).status == "changed"


def test_not_comparable_when_prompts_or_lengths_differ():
    other = PromptBatch(rows=((5, 6, 7), (8, 9, 11)))
    assert prompt_digest(other) != prompt_digest(BATCH)
    change = compare_case("c", _golden(), _gen(TOKENS), other, 4, 5)
    assert change.status == "not-comparable" and "other prompt ids" in change.detail
    change = compare_case("c", _golden(), _gen([r + [0] for r in TOKENS]), BATCH, 5, 5)
    assert change.status == "not-comparable" and "recorded with 4 new tokens, this run generates 5" in change.detail


def test_a_recording_with_fewer_ids_than_it_asked_for_is_not_compared_and_says_why():
    """MII was once judged on its text re-tokenized, which drops special tokens: 32 new tokens asked, 31 ids
    kept, and every later step shifted by one against a run judged on MII's own ids (seen on one H200: the
    pad token 1 at step 21 of short-b1-len16). Such a recording says so and is not compared."""
    stored = _golden([[11, 12, 14], [21, 22, 23, 24]])
    assert stored["max_new_tokens"] == 4
    change = compare_case("c", stored, _gen(TOKENS), BATCH, 4, 5)
    assert (change.status, change.detail) == (
        "not-comparable", "recorded with 3 ids for 4 new tokens: ids re-tokenized from the engine's text, as "
                          "MII's were judged before its own ids were")
    assert compare_case("c", stored, _gen([[11, 12, 14], [21, 22, 23]]), BATCH, 3, 5).status == "unchanged"
    longer = compare_case("c", stored, _gen([r + [0] for r in TOKENS]), BATCH, 5, 5)
    assert (longer.status, longer.detail) == ("not-comparable", "recorded with 4 new tokens, this run generates 5")
    del stored["max_new_tokens"]                     # a file from before the field: its ids' count stands in
    assert compare_case("c", stored, _gen(TOKENS), BATCH, 4, 5).detail == (
        "recorded with 3 new tokens, this run generates 4")


def test_row_count_change_is_a_change():
    change = compare_case("c", _golden(), _gen(TOKENS[:1]), BATCH, 4, 5)
    assert change.status == "changed" and "row counts differ" in change.detail


# --- perplexity -------------------------------------------------------------------------------------------------

def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    vocab = 50
    batch = PromptBatch(rows=((1, 2, 3, 4), (5, 6)), pad_token_id=0)   # row 1 left-padded
    _, mask = batch.padded()
    lp = torch.full((2, 4, vocab), -math.log(vocab))
    ppl, n = perplexity(Scores(lp, mask.bool()), batch)
    assert ppl == pytest.approx(vocab) and n == 3 + 1


def test_perplexity_matches_the_parity_engine():
    torch.manual_seed(0)
    batch = PromptBatch(rows=((1, 2, 3, 4, 5), (6, 7, 8)), pad_token_id=0)
    _, mask = batch.padded()
    lp = torch.log_softmax(torch.randn(2, 5, 20), -1)
    scores = Scores(lp, mask.bool())
    ppl, _ = perplexity(scores, batch)
    assert ppl == pytest.approx(parity.teacher_forced_metrics(scores, scores, batch).perplexity_reference)


def test_perplexity_within_the_noise_floor_multiple():
    same = compare_perplexity(20.0, 20.0, 1e-3, 10)
    assert same.passed and same.rel_diff == 0
    small = compare_perplexity(20.0, 20.1, 1e-3, 10)           # 0.5% <= 10 x 0.1%
    assert small.passed and small.limit == pytest.approx(1e-2)
    moved = compare_perplexity(20.0, 21.0, 1e-3, 10)           # 5% > 1%
    assert not moved.passed
    assert "perplexity 20.0000 -> 21.0000 (+5.000%)" in moved.message() and "> limit 0.01" in moved.message()
    # a zero floor (fp32 session) is replaced by the parity engine's epsilon, so equality is not demanded
    assert compare_perplexity(20.0, 20.01, 0.0, 10).passed                 # 0.05% <= 10 x 0.01%
    zero_floor = compare_perplexity(20.0, 20.05, 0.0, 10)                  # 0.25% > 0.1%
    assert zero_floor.limit == pytest.approx(10 * parity.PPL_REL_EPSILON) and not zero_floor.passed
    assert not compare_perplexity(20.0, float("nan"), 1e-3, 10).passed


def test_perplexity_decrease_beyond_the_limit_is_a_change_too():
    """The limit is on |change|: a perplexity that drops (20 -> 15) moved as much as one that rose, and a
    better number from a different model is still a different model."""
    dropped = compare_perplexity(20.0, 15.0, 1e-3, 10)
    assert dropped.rel_diff == pytest.approx(0.25)
    assert not dropped.passed
    assert "perplexity 20.0000 -> 15.0000 (-25.000%)" in dropped.message() and "> limit 0.01" in dropped.message()
    assert compare_perplexity(20.0, 19.9, 1e-3, 10).passed          # -0.5% is within 10 x 0.1%
    assert not compare_perplexity(20.0, 19.7, 1e-3, 10).passed      # -1.5% is not


# --- the summary ------------------------------------------------------------------------------------------------

def test_summary_lists_which_cases_changed_and_how():
    changes = [compare_case("short-b1", _golden(), _gen(TOKENS), BATCH, 4, 5),
               compare_case("batch-b2", _golden(), _gen([[11, 12, 77, 78], TOKENS[1]]), BATCH, 4, 5)]
    s = GoldenSummary("ds fp16", changes, compare_perplexity(20.0, 21.0, 1e-3, 10),
                      version_changes({"deepspeed": "0.19.8", "torch": "2.3.0"},
                                      {"deepspeed": "0.20.0", "torch": "2.3.0"}), "baselines/x.json, GPU class cpu")
    text = s.text()
    assert not s.passed
    assert text.startswith("golden outputs of ds fp16 (baselines/x.json, GPU class cpu): 1/2 cases unchanged, "
                           "1 changed, perplexity 20.0000 -> 21.0000")
    assert "versions since the golden outputs were recorded: deepspeed 0.19.8 -> 0.20.0" in text
    assert "  batch-b2: changed (row 0: step 2 token 13 -> 77" in text
    assert "short-b1" not in text
    assert GoldenSummary("hf fp32", changes[:1]).passed


def test_version_changes():
    assert version_changes({"a": "1"}, {"a": "1"}) == []
    assert version_changes({"a": "1", "b": None}, {"a": "2", "c": "3"}) == ["a 1 -> 2", "c not installed -> 3"]


# --- the store --------------------------------------------------------------------------------------------------

def test_merge_golden_keeps_other_cases_and_classes(tmp_path):
    store = BaselineStore(tmp_path)
    key = BaselineKey(model="pythia-14m", weights="synthetic-seed0-v2", dtype="fp16", backend="ds", tp=1)
    store.put_golden(key, "cpu", {"cases": {"a": _golden()}})
    store.put_golden(key, "cpu", {"cases": {"b": _golden([[1, 2, 3, 4], [5, 6, 7, 8]])}})
    store.put_golden(key, "cpu", {"cases": {}, "perplexity": 12.5, "perplexity_detail": {"targets": 10}})
    store.put_golden(key, "NVIDIA-H100-80GB-HBM3", {"cases": {"a": _golden()}})
    cls, golden = store.golden(key, "cpu")
    assert cls == "cpu" and sorted(golden["cases"]) == ["a", "b"]
    assert golden["perplexity"] == 12.5 and golden["perplexity_detail"] == {"targets": 10}
    assert golden["cases"]["b"]["tokens"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    cls, other = store.golden(key, "NVIDIA-H100-80GB-HBM3")
    assert sorted(other["cases"]) == ["a"] and other["perplexity"] is None
    # a class with no golden outputs falls back to another class's, and says which
    assert store.golden(key, "NVIDIA-A100-SXM4-40GB")[0] in ("cpu", "NVIDIA-H100-80GB-HBM3")


def test_merge_golden_refuses_a_corrupt_file(tmp_path):
    store = BaselineStore(tmp_path)
    key = BaselineKey(model="m", weights="w", dtype="fp16", backend="ds", tp=1)
    path = store.path_for(key)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(pytest.fail.Exception, match=r"cannot write baseline: .*ds-fp16-tp1.json: not valid JSON"):
        BaselinePolicy(store, key, "cpu", recording=True).record(
            lambda s: s.put_golden(key, "cpu", {"cases": {"a": _golden()}}))
    assert path.read_text() == "{not json"


# --- the check itself, on a stand-in session ----------------------------------------------------------------------

class _Session:
    """The parts of NeoxSession that check_golden uses."""

    def __init__(self, tmp_path, generation, update):
        import types
        from pytest_neoxmii.hardware import Hardware
        from pytest_neoxmii.registry import lookup
        self.options = types.SimpleNamespace(update_baselines=update, top_k=5, baseline_dir=tmp_path)
        self.model = types.SimpleNamespace(spec=lookup("pythia-14m"), weights_key="synthetic-seed0-v2")
        self.hardware = Hardware(gpus=())
        self.records = []
        self._gen = generation
        self._backend = types.SimpleNamespace(info=types.SimpleNamespace(
            backend="ds", dtype="fp16", tensor_parallel=1, kernels="none (CPU)", describe=lambda: "ds: fp16 on cpu"))

    # The stand-in checks what it is asked for, as the real session would answer only that.
    def backend(self, name):
        assert name == "ds", name
        return self._backend

    def generation(self, backend, case):
        assert backend is self._backend and case.plan.generate, (backend, case)
        return self._gen

    def record(self, rec):
        self.records.append(rec)


class _Plan(types.SimpleNamespace):
    """A stand-in case plan (a test sets its lengths); padded as a real CasePlan computes it."""
    padded = property(CasePlan.padded.fget)


def _case():
    plan = _Plan(generate=True, max_new_tokens=4)
    return types.SimpleNamespace(id="short-b2-len3", plan=plan, batch=BATCH)


def test_check_golden_records_then_fails_with_how_it_changed(tmp_path, capsys):
    check_golden(_Session(tmp_path, _gen(TOKENS), update=True), "ds", _case())
    assert check_golden(_Session(tmp_path, _gen(TOKENS), update=False), "ds", _case()).status == "unchanged"
    session = _Session(tmp_path, _gen([[11, 12, 77, 78], TOKENS[1]]), update=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden(session, "ds", _case())
    text = str(failed.value)
    assert "golden outputs of ds fp16 (" in text and "GPU class cpu): 0/1 cases unchanged, 1 changed" in text
    assert "short-b2-len3: changed (row 0: step 2 token 13 -> 77" in text
    assert session.records[-1].passed is False and session.records[-1].metrics["status"] == "changed"


def test_non_finite_generations_are_never_recorded(tmp_path):
    gen = _gen(TOKENS)
    gen.top_logprobs[0][1][0] = (12, float("nan"))
    session = _Session(tmp_path, gen, update=True)
    with pytest.raises(pytest.fail.Exception, match=r"not recorded as a golden output: ds fp16 generation of "
                                                    r"short-b2-len3: 1 non-finite top logprob: row 0, step 1"):
        check_golden(session, "ds", _case())
    assert not list(tmp_path.rglob("*.json"))


# --- the perplexity check, on a stand-in session --------------------------------------------------------------

def _uniform(vocab: int, batch=BATCH) -> Scores:
    """A model that is uniform over `vocab` tokens: its perplexity is exactly `vocab`."""
    _, mask = batch.padded()
    return Scores(torch.full((batch.batch_size, batch.max_len, 32), -math.inf).index_fill(
        -1, torch.arange(vocab), -math.log(vocab)), mask.bool())


class _PerplexitySession(_Session):
    """Adds what check_golden_perplexity uses: the fixed-text case, the fp32 reference and its peer."""

    def __init__(self, tmp_path, backend_vocab, update, peer_vocab=20):
        super().__init__(tmp_path, None, update)
        import types
        self.options.parity_multiple = 10.0
        self._plan = types.SimpleNamespace(family="fixed-text", generate=False, max_new_tokens=4)
        self._scores = {"ref": _uniform(20), "peer": _uniform(peer_vocab), "ds": _uniform(backend_vocab)}
        self._ref = types.SimpleNamespace(name="ref", info=self._backend.info)
        self._peer = types.SimpleNamespace(name="peer", info=self._backend.info)
        self._backend.name = "ds"

    def plans(self):
        return [self._plan]

    def case(self, plan):
        import types
        assert plan is self._plan, plan
        return types.SimpleNamespace(id="fixed-text", plan=plan, batch=BATCH)

    def reference(self):
        return self._ref

    def peer(self):
        return self._peer

    def scores(self, backend, case):
        assert case.id == "fixed-text" and case.plan is self._plan, case
        return self._scores[backend.name]


def test_check_golden_perplexity_records_then_fails_on_a_drop_or_a_rise(tmp_path):
    assert check_golden_perplexity(_PerplexitySession(tmp_path, 20, update=True), "ds") is None
    same = _PerplexitySession(tmp_path, 20, update=False)
    change = check_golden_perplexity(same, "ds")
    assert change.passed and change.rel_diff == pytest.approx(0.0, abs=1e-12)
    # the peer equals the reference: a zero floor, so the limit is 10 x the epsilon
    assert change.limit == pytest.approx(10 * parity.PPL_REL_EPSILON)
    record = same.records[-1]
    assert record.check == "golden-perplexity" and record.passed is True
    assert record.metrics["golden"] == pytest.approx(20.0) and record.metrics["perplexity"] == pytest.approx(20.0)
    for vocab, shown in ((15, "perplexity 20.0000 -> 15.0000 (-25.000%)"),
                         (21, "perplexity 20.0000 -> 21.0000 (+5.000%)")):
        session = _PerplexitySession(tmp_path, vocab, update=False)
        with pytest.raises(pytest.fail.Exception) as failed:
            check_golden_perplexity(session, "ds")
        assert shown in str(failed.value)
        assert session.records[-1].passed is False
        assert session.records[-1].metrics["rel_diff"] == pytest.approx(abs(vocab - 20) / 20, rel=1e-5)


def test_check_golden_perplexity_limit_follows_the_sessions_floor(tmp_path):
    """With the peer at perplexity 21 (floor 5 %), a move to 25 (+25 %) is within 10 x the floor."""
    check_golden_perplexity(_PerplexitySession(tmp_path, 20, update=True), "ds")
    session = _PerplexitySession(tmp_path, 25, update=False, peer_vocab=21)
    assert session_floor(session, session.case(session._plan)) == pytest.approx(0.05, rel=1e-5)
    change = check_golden_perplexity(session, "ds")
    assert change.passed and change.limit == pytest.approx(0.5, rel=1e-5)


def _on_an_h200(session):
    from pytest_neoxmii.hardware import Gpu, Hardware
    session.hardware = Hardware(gpus=(Gpu(0, "NVIDIA H200", 141 * 2**30, (9, 0)),))
    return session


def test_a_low_precision_golden_of_another_machine_adds_that_machines_limit(tmp_path):
    """Recorded on an H200 whose session floor was 5 % (peer at 21 against 20); compared on a CPU whose floor is
    zero (limit 10 x 1e-4). Each machine's fp16 may sit within its own limit of fp32, so the two may lie up to
    both limits apart: +45 % passes (0.001 + 0.5), +55 % does not. The same +45 % against a golden of this
    machine's own class fails at 0.001, as before."""
    check_golden_perplexity(_on_an_h200(_PerplexitySession(tmp_path, 20, update=True, peer_vocab=21)), "ds")
    apart = check_golden_perplexity(_PerplexitySession(tmp_path, 29, update=False), "ds")
    assert apart.passed and apart.rel_diff == pytest.approx(0.45, rel=1e-5)
    assert (apart.limit_here, apart.limit_recorded) == (pytest.approx(1e-3), pytest.approx(0.5, rel=1e-5))
    assert apart.message().endswith("<= limit 0.501 (10 x max(noise floor 0, 0.0001) here + 10 x max(noise floor "
                                    "0.05, 0.0001) on NVIDIA-H200, where it was recorded)")
    session = _PerplexitySession(tmp_path, 31, update=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden_perplexity(session, "ds")
    assert "perplexity 20.0000 -> 31.0000 (+55.000%): relative change 0.55 > limit 0.501" in str(failed.value)
    assert session.records[-1].passed is False and session.records[-1].metrics["limit"] == pytest.approx(0.501, rel=1e-5)
    # recorded on this machine's own class: only this session's limit
    own = tmp_path / "own"
    own.mkdir()
    check_golden_perplexity(_PerplexitySession(own, 20, update=True, peer_vocab=21), "ds")
    with pytest.raises(pytest.fail.Exception, match=r"> limit 0\.001 \(10 x max\(noise floor 0, 0\.0001\)\)$"):
        check_golden_perplexity(_PerplexitySession(own, 29, update=False), "ds")


def test_an_fp32_golden_of_another_machine_gets_no_second_limit(tmp_path):
    """fp32 answers agree across machines to float32 round-off: another machine's low-precision noise says
    nothing of them."""
    recording = _on_an_h200(_PerplexitySession(tmp_path, 20, update=True, peer_vocab=21))
    recording._backend.info.dtype = "fp32"
    check_golden_perplexity(recording, "ds")
    session = _PerplexitySession(tmp_path, 29, update=False)
    session._backend.info.dtype = "fp32"
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden_perplexity(session, "ds")
    assert "> limit 0.001 (10 x max(noise floor 0, 0.0001))" in str(failed.value) and "recorded)" not in str(
        failed.value)


# --- stored form and comparison details, pinned ------------------------------------------------------------------

def test_prompt_digest_is_the_sha256_of_the_compact_json_ids():
    # computed independently: sha256(b"[[5,6,7],[8,9,10]]"), first 16 hex digits; stored files depend on it
    assert prompt_digest(BATCH) == "b5c99e9cb02751ac"


def test_golden_case_stored_form():
    gen = Generation(tokens=[[11, 12]], top_logprobs=[[[(11, -0.123456789), (3, -1.0), (4, -2.0)],
                                                       [(12, -0.1), (5, -0.2), (6, -0.3)]]])
    batch = PromptBatch(rows=((5, 6, 7),), pad_token_id=0)
    stored = golden_case(batch, gen, 2, top_k=2, versions={"torch": "2.13.0"})
    assert stored == {"tokens": [[11, 12]], "top_logprobs": [[[[11, -0.123457], [3, -1.0]], [[12, -0.1], [5, -0.2]]]],
                      "prompt_lengths": [3], "prompt_sha256": prompt_digest(batch), "max_new_tokens": 2,
                      "versions": {"torch": "2.13.0"}}
    assert golden_case(batch, gen, 2, top_k=2)["versions"] == {}


def test_as_generation_cuts_to_the_first_steps():
    stored = _golden()
    cut = as_generation(stored, 2)
    assert cut.tokens == [[11, 12], [21, 22]]
    assert [len(row) for row in cut.top_logprobs] == [2, 2] and cut.top_logprobs[0][1][0] == (12, -0.1)
    assert as_generation(stored).tokens == TOKENS
    assert as_generation({"tokens": [[1, 2]]}, 1) == Generation(tokens=[[1]], top_logprobs=[])


def test_compare_case_keeps_the_case_and_report_in_every_verdict():
    same = compare_case("c", _golden(), _gen(TOKENS), BATCH, 4, 5)
    assert (same.case, same.status, same.detail) == ("c", "unchanged", "") and same.report.passed
    assert same.first_divergence is None
    two_rows = _gen([[11, 12, 77, 78], [21, 22, 23, 88]])
    changed = compare_case("c", _golden(), two_rows, BATCH, 4, 5)
    assert changed.case == "c" and changed.status == "changed" and changed.first_divergence == 2
    assert changed.detail.count("; row 1: step 3 token 24 -> 88 after 3 identical (") == 1
    assert changed.line().startswith("c: changed (row 0: step 2 token 13 -> 77 after 2 identical (changed: ")
    nan = _gen(TOKENS)
    nan.top_logprobs[0][0][1] = (12, float("nan"))
    broken = compare_case("c", _golden(), nan, BATCH, 4, 5)
    assert (broken.case, broken.status) == ("c", "changed") and broken.report is not None
    assert broken.detail.startswith("candidate generation: 1 non-finite top logprob: row 0, step 0")
    other = compare_case("c", _golden(), _gen(TOKENS), PromptBatch(rows=((5, 6, 8), (8, 9, 10))), 4, 5)
    assert (other.case, other.status) == ("c", "not-comparable") and other.line() == (
        "c: not-comparable (the golden output answers other prompt ids (another --neox-seed or tokenizer))")
    longer = compare_case("c", _golden(), _gen(TOKENS), BATCH, 5, 5)
    assert longer.case == "c" and longer.detail == "recorded with 4 new tokens, this run generates 5"
    empty = compare_case("c", {"tokens": []}, _gen(TOKENS), BATCH, 1, 5)
    assert empty.detail == "recorded with 0 new tokens, this run generates 1"


def test_perplexity_skips_a_row_without_targets_and_keeps_the_rows_after_it():
    batch = PromptBatch(rows=((7,), (1, 2, 3)), pad_token_id=0)   # row 0 has one token: no target
    _, mask = batch.padded()
    lp = torch.full((2, 3, 10), -math.log(10))
    ppl, n = perplexity(Scores(lp, mask.bool()), batch)
    assert n == 2 and ppl == pytest.approx(10)


# --- check_golden: every way out, with what it says ---------------------------------------------------------------

def _case_with(case_id="short-b2-len3", generate=True, max_new_tokens=4):
    return types.SimpleNamespace(id=case_id, plan=_Plan(generate=generate, max_new_tokens=max_new_tokens),
                                 batch=BATCH)


def _golden_path(tmp_path) -> str:
    return str(next(tmp_path.rglob("*.json")))


def test_check_golden_skips_say_why_and_how_to_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden(_Session(tmp_path, _gen(TOKENS), update=False), "ds", _case_with(generate=False))
    assert str(skip.value) == "short-b2-len3 is scored teacher-forced only"
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden(_Session(tmp_path, _gen(TOKENS), update=False), "ds", _case_with())
    assert str(skip.value) == ("no golden outputs (greedy ids) in pythia-14m/synthetic-seed0-v2/ds-fp16-tp1.json; "
                               "create them with: --neox-update-baselines")
    check_golden(_Session(tmp_path, _gen(TOKENS), update=True), "ds", _case_with())
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden(_Session(tmp_path, _gen(TOKENS), update=False), "ds", _case_with("other-case"))
    assert str(skip.value) == ("no golden output for case other-case in pythia-14m/synthetic-seed0-v2/"
                               "ds-fp16-tp1.json, GPU class cpu; create it with: --neox-update-baselines")
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden(_Session(tmp_path, _gen(TOKENS), update=False), "ds", _case_with(max_new_tokens=5))
    assert str(skip.value) == ("golden output of short-b2-len3 not comparable: recorded with 4 new tokens, this "
                               "run generates 5; re-record it with --neox-update-baselines")


def test_check_golden_records_what_it_did(tmp_path, capsys):
    session = _Session(tmp_path, _gen(TOKENS), update=True)
    assert check_golden(session, "ds", _case_with()) is None
    path = _golden_path(tmp_path)
    [rec] = session.records
    assert (rec.check, rec.backend, rec.case, rec.passed, rec.metrics) == (
        "golden", "ds", "short-b2-len3", True, {"status": "recorded"})
    assert rec.summary == f"recorded for GPU class cpu in {path}"
    assert capsys.readouterr().out == f"golden output of short-b2-len3 (ds: fp16 on cpu) written to {path}\n"
    stored = json.loads(open(path).read())["gpu_classes"]["cpu"]["golden"]["cases"]["short-b2-len3"]
    assert stored["tokens"] == TOKENS and stored["max_new_tokens"] == 4 and len(stored["top_logprobs"][0][0]) == 3

    import types
    request = types.SimpleNamespace(node=types.SimpleNamespace(user_properties=[]), applymarker=None)
    # step 2: 14 is the golden runner-up, and the golden 13 is the candidate's runner-up
    tie = _Session(tmp_path, _gen([[11, 12, 14, 15], TOKENS[1]], alt=[[12, 13, 13, 16], [22, 23, 24, 25]]),
                   update=False)
    change = check_golden(tie, "ds", _case_with(), request)
    assert change.status == "near-tie" and change.passed
    [rec] = tie.records
    assert rec.passed is True and rec.metrics == {"status": "near-tie", "first_divergence": 2, "gpu_class": "cpu",
                                                  "detail": change.detail}
    assert rec.summary == change.line()
    assert request.node.user_properties == [("golden_status", "near-tie")]
    out = capsys.readouterr().out
    assert out.startswith(f"golden outputs of ds fp16 ({path}, GPU class cpu): 0/1 cases unchanged, 1 near-tie")


def test_check_golden_perplexity_records_its_detail_and_skips_or_fails_with_reasons(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden_perplexity(_PerplexitySession(tmp_path, 20, update=False), "ds")
    assert str(skip.value) == ("no golden outputs (perplexity) in pythia-14m/synthetic-seed0-v2/ds-fp16-tp1.json; "
                               "create them with: --neox-update-baselines")
    check_golden(_Session(tmp_path, _gen(TOKENS), update=True), "ds", _case())      # greedy ids only
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden_perplexity(_PerplexitySession(tmp_path, 20, update=False), "ds")
    assert str(skip.value) == ("no golden perplexity in pythia-14m/synthetic-seed0-v2/ds-fp16-tp1.json, GPU class "
                               "cpu; create it with: --neox-update-baselines")
    capsys.readouterr()

    session = _PerplexitySession(tmp_path, 20, update=True)
    check_golden_perplexity(session, "ds")
    path = "pythia-14m/synthetic-seed0-v2/ds-fp16-tp1.json"
    [rec] = session.records
    assert (rec.check, rec.backend, rec.case, rec.passed) == ("golden-perplexity", "ds", "fixed-text", True)
    assert rec.metrics["perplexity"] == pytest.approx(20.0)
    assert rec.summary == f"recorded {rec.metrics['perplexity']:.4f} for GPU class cpu in {tmp_path / path}"
    assert capsys.readouterr().out == f"golden perplexity 20.0000 of ds: fp16 on cpu written to {tmp_path / path}\n"
    golden = json.loads((tmp_path / path).read_text())["gpu_classes"]["cpu"]["golden"]
    assert golden["perplexity"] == pytest.approx(20.0)
    assert golden["perplexity_detail"] == {"targets": 4, "case": "fixed-text", "prompt_sha256": prompt_digest(BATCH),
                                           "noise_floor_rel": 0.0, "dtype": "fp16"}

    request = types_request()
    checked = _PerplexitySession(tmp_path, 20, update=False)
    check_golden_perplexity(checked, "ds", request)
    assert request.node.user_properties == [("golden_perplexity", pytest.approx(20.0))]
    assert set(checked.records[-1].metrics) == {"perplexity", "golden", "rel_diff", "limit", "gpu_class"}
    assert checked.records[-1].metrics["gpu_class"] == "cpu"
    assert capsys.readouterr().out.startswith(f"golden outputs of ds fp16 ({path}, GPU class cpu): perplexity "
                                              "20.0000 -> 20.0000 (+0.000%)")

    other_ids = _PerplexitySession(tmp_path, 20, update=False)
    other_ids.case = lambda plan: __import__("types").SimpleNamespace(
        id="fixed-text", plan=plan, batch=PromptBatch(rows=((5, 6, 8), (8, 9, 10)), pad_token_id=0))
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden_perplexity(other_ids, "ds")
    assert str(skip.value) == ("the golden perplexity was measured on other token ids of the fixed text (another "
                               "tokenizer); re-record it with --neox-update-baselines")

    nan = _PerplexitySession(tmp_path, 20, update=False)
    nan._scores["ds"] = Scores(torch.full((2, 3, 32), math.nan), nan._scores["ds"].mask)
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden_perplexity(nan, "ds")
    assert str(failed.value) == "ds: fp16 on cpu: perplexity of the fixed text is nan (no finite value)"


def types_request():
    import types
    return types.SimpleNamespace(node=types.SimpleNamespace(user_properties=[]))


def test_a_non_finite_generation_is_recorded_as_such(tmp_path):
    from pytest_neoxmii.session import Record
    gen = _gen(TOKENS)
    gen.top_logprobs[0][1][0] = (12, float("nan"))
    session = _Session(tmp_path, gen, update=True)
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden(session, "ds", _case())
    assert failed.value.pytrace is False
    assert session.records == [Record("golden", "ds", "short-b2-len3", False, {"status": "non-finite"},
                                      "short-b2-len3: 1 non-finite top logprob: row 0, step 1 (token 12: nan)")]


def test_check_golden_marks_a_known_issue_strict_xfail(tmp_path):
    """The golden check of a known decode defect (ds with injected kernels on a left-padded case) is a strict
    xfail, like the parity check: the defect has no golden output."""
    import types
    check_golden(_Session(tmp_path, _gen(TOKENS), update=True), "ds", _case())
    session = _Session(tmp_path, _gen(TOKENS), update=False)
    session._backend.info.kernels = "injected 6/6 layers"
    case = _case_with()
    case.plan.lengths = (3, 2)
    markers = []
    request = types.SimpleNamespace(node=types.SimpleNamespace(user_properties=[]), applymarker=markers.append)
    check_golden(session, "ds", case, request)
    [marker] = markers
    assert marker.name == "xfail" and marker.kwargs["strict"] is True
    assert marker.kwargs["reason"].startswith("known issue [ds-left-padded-decode]")


# --- the rules of the checks, one by one ----------------------------------------------------------------------

def _no_skip(check, *args, **kwargs):
    """Run a check that must reach a verdict. A skip raised in a test body makes the test SKIPPED, not failed,
    so a check that gave up where it should have recorded or compared would otherwise go unseen."""
    try:
        return check(*args, **kwargs)
    except pytest.skip.Exception as exc:
        pytest.fail(f"the check skipped instead of deciding: {exc}")


KEY = BaselineKey(model="pythia-14m", weights="synthetic-seed0-v2", dtype="fp16", backend="ds", tp=1)
OTHER_CLASS = "NVIDIA-A100-SXM4-40GB"        # sorts before "cpu": a fallback to it is visible


def _request(*args):
    """A pytest request of an invocation with these arguments."""
    import types
    config = types.SimpleNamespace(invocation_params=types.SimpleNamespace(args=args))
    return types.SimpleNamespace(config=config, node=types.SimpleNamespace(user_properties=[]),
                                 applymarker=lambda marker: None)


def test_recording_needs_no_golden_outputs_to_exist_and_checking_needs_no_update(tmp_path):
    """--neox-update-baselines records into an empty store (it does not look for golden outputs first and
    skip for lack of them); without it, recorded outputs are compared, not skipped."""
    greedy, ppl = tmp_path / "greedy", tmp_path / "perplexity"          # each check starts from an empty store
    assert _no_skip(check_golden, _Session(greedy, _gen(TOKENS), update=True), "ds", _case()) is None
    assert _no_skip(check_golden_perplexity, _PerplexitySession(ppl, 20, update=True), "ds") is None
    assert _no_skip(check_golden, _Session(greedy, _gen(TOKENS), update=False), "ds", _case()).status == "unchanged"
    assert _no_skip(check_golden_perplexity, _PerplexitySession(ppl, 20, update=False), "ds").passed


def test_recording_keeps_the_sessions_top_k_and_the_installed_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(checks_golden, "installed_versions", lambda: {"torch": "2.13.0", "deepspeed": "0.19.8"})
    session = _Session(tmp_path, _gen(TOKENS), update=True)
    session.options.top_k = 2
    check_golden(session, "ds", _case())
    stored = BaselineStore(tmp_path).golden(KEY, "cpu")[1]["cases"]["short-b2-len3"]
    assert [len(step) for row in stored["top_logprobs"] for step in row] == [2] * 8
    assert stored["versions"] == {"torch": "2.13.0", "deepspeed": "0.19.8"}
    # ... and at the file level, the versions the perplexity and older cases are compared with
    assert BaselineStore(tmp_path).golden(KEY, "cpu")[1]["versions"] == {"torch": "2.13.0", "deepspeed": "0.19.8"}


def test_recording_the_perplexity_keeps_the_installed_versions_for_its_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(checks_golden, "installed_versions", lambda: {"torch": "2.13.0", "deepspeed": "0.19.8"})
    check_golden_perplexity(_PerplexitySession(tmp_path, 20, update=True), "ds")
    assert BaselineStore(tmp_path).golden(KEY, "cpu")[1]["versions"] == {"torch": "2.13.0", "deepspeed": "0.19.8"}


def test_the_summary_names_the_versions_that_moved_since_recording(tmp_path, monkeypatch, capsys):
    """A case is compared with the versions it was recorded under (its own, else the file's), the perplexity
    with the file's; the summary names every package that moved."""
    recorded = {"torch": "2.12.0", "deepspeed": "0.18.0"}
    case = dict(_golden(), versions={"torch": "2.12.0", "deepspeed": "0.19.8"})
    older_case = {k: v for k, v in _golden().items() if k != "versions"}       # written before per-case versions
    BaselineStore(tmp_path).put_golden(KEY, "cpu", {"cases": {"short-b2-len3": case, "older": older_case},
                                                    "versions": recorded, "perplexity": 20.0})
    monkeypatch.setattr(checks_golden, "installed_versions", lambda: {"torch": "2.13.0", "deepspeed": "0.20.0"})
    line = "versions since the golden outputs were recorded: "

    _no_skip(check_golden, _Session(tmp_path, _gen(TOKENS), update=False), "ds", _case())
    assert line + "deepspeed 0.19.8 -> 0.20.0, torch 2.12.0 -> 2.13.0\n" in capsys.readouterr().out
    _no_skip(check_golden, _Session(tmp_path, _gen(TOKENS), update=False), "ds", _case_with("older"))
    assert line + "deepspeed 0.18.0 -> 0.20.0, torch 2.12.0 -> 2.13.0\n" in capsys.readouterr().out
    _no_skip(check_golden_perplexity, _PerplexitySession(tmp_path, 20, update=False), "ds")
    assert line + "deepspeed 0.18.0 -> 0.20.0, torch 2.12.0 -> 2.13.0\n" in capsys.readouterr().out


def test_skips_for_missing_golden_outputs_give_the_command_of_this_very_run(tmp_path, monkeypatch):
    """The how-to in a skip is the invocation that skipped plus --neox-update-baselines (quoted for a shell),
    not the bare flag."""
    monkeypatch.chdir(tmp_path)
    request = _request("tests/acceptance", "--neox-model=pythia-14m", "-k", "golden and ds")
    command = (f"{os.path.basename(sys.executable)} -m pytest tests/acceptance --neox-model=pythia-14m "
               "-k 'golden and ds' --neox-update-baselines")
    where = "pythia-14m/synthetic-seed0-v2/ds-fp16-tp1.json"
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden(_Session(tmp_path, _gen(TOKENS), update=False), "ds", _case(), request)
    assert str(skip.value) == f"no golden outputs (greedy ids) in {where}; create them with: {command}"
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden_perplexity(_PerplexitySession(tmp_path, 20, update=False), "ds", request)
    assert str(skip.value) == f"no golden outputs (perplexity) in {where}; create them with: {command}"
    check_golden(_Session(tmp_path, _gen(TOKENS), update=True), "ds", _case())
    with pytest.raises(pytest.skip.Exception) as skip:
        check_golden(_Session(tmp_path, _gen(TOKENS), update=False), "ds", _case_with("other-case"), request)
    assert str(skip.value) == (f"no golden output for case other-case in {where}, GPU class cpu; create it with: "
                               f"{command}")


def test_this_machines_gpu_class_is_preferred_and_a_fallback_is_named(tmp_path, capsys):
    """Golden outputs of another GPU class are used only when this machine's class has none, and the summary
    says so; once this class has its own, they are the ones compared."""
    store = BaselineStore(tmp_path)
    store.put_golden(KEY, OTHER_CLASS, {"cases": {"short-b2-len3": _golden()}, "perplexity": 30.0})
    _no_skip(check_golden, _Session(tmp_path, _gen(TOKENS), update=False), "ds", _case())
    assert f"GPU class {OTHER_CLASS}, this machine is cpu): 1/1 cases unchanged" in capsys.readouterr().out

    moved = [[11, 12, 77, 78], TOKENS[1]]                  # "changed" against the other class's outputs
    check_golden(_Session(tmp_path, _gen(moved), update=True), "ds", _case())
    check_golden_perplexity(_PerplexitySession(tmp_path, 20, update=True), "ds")
    capsys.readouterr()
    assert _no_skip(check_golden, _Session(tmp_path, _gen(moved), update=False), "ds", _case()).status == "unchanged"
    assert "GPU class cpu): 1/1 cases unchanged" in capsys.readouterr().out
    assert _no_skip(check_golden_perplexity, _PerplexitySession(tmp_path, 20, update=False), "ds").golden == \
        pytest.approx(20.0)


class _ReferenceSession(_Session):
    """A session whose "hf" is the fp32 HF reference, which is not one of the backends."""

    def __init__(self, tmp_path, generation, update):
        super().__init__(tmp_path, generation, update)
        self._backend.info.backend, self._backend.info.dtype = "hf", "fp32"

    def backend(self, name):
        raise AssertionError(f"the HF reference was asked for as a backend: {name}")

    def reference(self):
        return self._backend


def test_golden_outputs_are_filed_by_backend_dtype_and_tensor_parallel_degree(tmp_path):
    """"hf" is the session's fp32 reference, filed as hf-fp32; a tensor-parallel backend gets its own file."""
    check_golden(_ReferenceSession(tmp_path, _gen(TOKENS), update=True), "hf", _case())
    tp2 = _Session(tmp_path, _gen(TOKENS), update=True)
    tp2._backend.info.tensor_parallel = 2
    check_golden(tp2, "ds", _case())
    assert sorted(p.name for p in tmp_path.rglob("*.json")) == ["ds-fp16-tp2.json", "hf-fp32-tp1.json"]


def test_a_case_the_serving_config_cannot_hold_says_so_first_in_the_failure(tmp_path):
    """--neox-ds-config with max_tokens below prompt + new tokens: the case runs anyway, and its failure and
    record carry why it may not be comparable to what the config serves."""
    from pathlib import Path

    from pytest_neoxmii.serving_config import ServingConfig
    config = {"ds": ServingConfig("ds", Path("ds.json"), {"max_tokens": 6})}
    case = _case_with()
    case.plan.lengths = (3, 3)
    recording = _Session(tmp_path, _gen(TOKENS), update=True)
    recording.serving_configs = config
    check_golden(recording, "ds", case)
    session = _Session(tmp_path, _gen([[11, 12, 77, 78], TOKENS[1]]), update=False)
    session.serving_configs = config
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden(session, "ds", case)
    note = ("the ds config does not fit this case: max_tokens 6 < prompt 3 + 4 new = 7 tokens (ds.json); run "
            "anyway, as deployed")
    assert str(failed.value).startswith(f"NOTE: {note}\ngolden outputs of ds fp16 (")
    assert session.records[-1].metrics["config_misfit"] == note


def test_a_changed_case_fails_without_traceback_with_the_summary_then_the_parity_report(tmp_path, capsys):
    check_golden(_Session(tmp_path, _gen(TOKENS), update=True), "ds", _case())
    capsys.readouterr()
    session = _Session(tmp_path, _gen([[11, 12, 77, 78], TOKENS[1]]), update=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden(session, "ds", _case())
    assert failed.value.pytrace is False
    summary = capsys.readouterr().out.rstrip("\n")
    assert summary.startswith("golden outputs of ds fp16")
    assert str(failed.value).startswith(summary + "\ngreedy parity FAILED (near-tie rule: top-5)\n")
    [rec] = session.records
    assert (rec.check, rec.backend, rec.case, rec.passed, rec.known_issue) == (
        "golden", "ds", "short-b2-len3", False, None)
    assert rec.summary.startswith("short-b2-len3: changed (row 0: step 2 token 13 -> 77")


def test_a_case_that_is_not_comparable_is_recorded_without_a_verdict(tmp_path):
    check_golden(_Session(tmp_path, _gen(TOKENS), update=True), "ds", _case())
    session = _Session(tmp_path, _gen(TOKENS), update=False)
    with pytest.raises(pytest.skip.Exception):
        check_golden(session, "ds", _case_with(max_new_tokens=5))
    [rec] = session.records
    assert rec.passed is None and rec.metrics["status"] == "not-comparable"


def test_a_known_issue_is_named_in_the_record_of_a_failure_and_of_a_comparison(tmp_path):
    """Under a known decode defect the record carries the issue's key (the report shows `xfail [key]`), whether
    the output was non-finite when recording or was compared."""
    import types
    case = _case_with()
    case.plan.lengths = (3, 2)                  # left-padded: the condition of ds-left-padded-decode
    request = types.SimpleNamespace(node=types.SimpleNamespace(user_properties=[]), applymarker=lambda m: None)
    nan = _gen(TOKENS)
    nan.top_logprobs[0][1][0] = (12, float("nan"))
    # (what the backend generates, --neox-update-baselines, what the check raises, the record's known issue)
    runs = ((nan, True, pytest.fail.Exception, "ds-left-padded-decode"),     # non-finite: not recorded
            (_gen(TOKENS), True, None, None),                               # recorded: no verdict to excuse
            (_gen(TOKENS), False, None, "ds-left-padded-decode"))           # compared
    for generation, update, raises, known in runs:
        session = _Session(tmp_path, generation, update=update)
        session._backend.info.kernels = "injected 6/6 layers"
        if raises is None:
            check_golden(session, "ds", case, request)
        else:
            with pytest.raises(raises):
                check_golden(session, "ds", case, request)
        assert session.records[-1].known_issue == known


def test_perplexity_failures_have_no_traceback_and_records_say_what_was_compared(tmp_path):
    check_golden_perplexity(_PerplexitySession(tmp_path, 20, update=True), "ds")
    session = _PerplexitySession(tmp_path, 21, update=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden_perplexity(session, "ds")
    assert failed.value.pytrace is False
    [rec] = session.records
    assert (rec.check, rec.backend, rec.case, rec.passed) == ("golden-perplexity", "ds", "fixed-text", False)
    assert rec.summary == ("perplexity 20.0000 -> 21.0000 (+5.000%): relative change 0.05 > limit 0.001 "
                           "(10 x max(noise floor 0, 0.0001))")
    nan = _PerplexitySession(tmp_path, 20, update=False)
    nan._scores["ds"] = Scores(torch.full((2, 3, 32), math.nan), nan._scores["ds"].mask)
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden_perplexity(nan, "ds")
    assert failed.value.pytrace is False


def _next_token_probability(p: float, batch=BATCH) -> Scores:
    """A model that gives every next token of the batch probability `p`: perplexity exactly 1 / p."""
    ids, mask = batch.padded()
    lp = torch.full((batch.batch_size, batch.max_len, 32), -math.inf)
    for b in range(batch.batch_size):
        for i in range(batch.max_len - 1):
            lp[b, i, ids[b, i + 1]] = math.log(p)
    return Scores(lp, mask.bool())


def test_the_noise_floor_is_defined_for_any_positive_reference_perplexity(tmp_path):
    """Perplexity is >= 1 for a real model; a reference certain of every token (exactly 1) still gives a floor:
    a peer at perplexity 2 is 100 % away from it."""
    session = _PerplexitySession(tmp_path, 20, update=False)
    session._scores["ref"], session._scores["peer"] = _next_token_probability(1.0), _next_token_probability(0.5)
    assert perplexity(session._scores["ref"], BATCH) == (1.0, 4)
    assert session_floor(session, session.case(session._plan)) == pytest.approx(1.0)


def test_perplexity_message_states_the_verdict_and_the_floor_it_used():
    assert PerplexityChange(20.0, 20.1, 1e-3, 10).message() == (
        "perplexity 20.0000 -> 20.1000 (+0.500%): relative change 0.005 <= limit 0.01 "
        "(10 x max(noise floor 0.001, 0.0001))")
    # no floor measured (the session had no reference at low precision): shown as "-", the epsilon applies
    assert PerplexityChange(20.0, 20.0, None, 10).message() == (
        "perplexity 20.0000 -> 20.0000 (+0.000%): relative change 0 <= limit 0.001 "
        "(10 x max(noise floor -, 0.0001))")
    # a zero golden perplexity (a hand-edited file) is an infinite change, not a ZeroDivisionError
    zero = PerplexityChange(0.0, 20.0, 1e-3, 10)
    assert not zero.passed and zero.message().startswith("perplexity 0.0000 -> 20.0000 (+inf%): relative change "
                                                         "inf > limit 0.01")


def test_summary_text_exactly():
    assert GoldenSummary("ds fp16").text() == "golden outputs of ds fp16: nothing compared"
    changed = compare_case("batch-b2", _golden(), _gen([[11, 12, 77, 78], TOKENS[1]]), BATCH, 4, 5)
    s = GoldenSummary("ds fp16", [compare_case("short", _golden(), _gen(TOKENS), BATCH, 4, 5), changed],
                      versions=["deepspeed 0.19.8 -> 0.20.0", "torch 2.12.0 -> 2.13.0"], source="x.json")
    assert s.text() == ("golden outputs of ds fp16 (x.json): 1/2 cases unchanged, 1 changed\n"
                        "versions since the golden outputs were recorded: deepspeed 0.19.8 -> 0.20.0, "
                        "torch 2.12.0 -> 2.13.0\n"
                        f"  {changed.line()}")


def test_case_lines_say_near_tie_or_changed_and_an_unchanged_case_has_no_detail():
    tie = compare_case("c", _golden(), _gen([[11, 12, 14, 15], TOKENS[1]], alt=[[12, 13, 13, 16], [22, 23, 24, 25]]),
                       BATCH, 4, 5)
    reason = tie.report.rows[0].reason
    assert tie.detail == f"row 0: step 2 token 13 -> 14 after 2 identical (near-tie: {reason})"
    changed = compare_case("c", _golden(), _gen([[11, 12, 77, 78], TOKENS[1]]), BATCH, 4, 5)
    assert changed.detail == f"row 0: step 2 token 13 -> 77 after 2 identical (changed: {changed.report.rows[0].reason})"
    assert CaseChange("c", "unchanged", "").line() == "c: unchanged"
    assert CaseChange("c", "changed", "why").line() == "c: changed (why)"


def test_a_package_removed_since_recording_is_shown_as_not_installed():
    assert version_changes({"deepspeed-mii": "0.3.3"}, {}) == ["deepspeed-mii 0.3.3 -> not installed"]


def test_every_structural_error_of_a_case_is_in_its_detail():
    both = _gen(TOKENS)
    both.top_logprobs[0][0][1] = (12, float("nan"))
    golden = _golden()
    golden["top_logprobs"][1][1][0] = [22, float("inf")]
    change = compare_case("c", golden, both, BATCH, 4, 5)
    assert change.status == "changed"
    assert change.detail == "; ".join(change.report.errors) and len(change.report.errors) == 2
    assert change.detail.startswith("reference generation: 1 non-finite") and "; candidate generation: " in change.detail


def test_perplexity_without_targets_counts_none():
    batch = PromptBatch(rows=((7,), (8,)), pad_token_id=0)
    _, mask = batch.padded()
    assert perplexity(Scores(torch.zeros(2, 1, 10), mask.bool()), batch) == (None, 0)


def test_perplexity_is_accumulated_in_float64():
    """A small NLL next to a large one is not rounded away: float32 would lose 2**-30 next to 1.0."""
    batch = PromptBatch(rows=((1, 2, 3),), pad_token_id=0)
    _, mask = batch.padded()
    lp = torch.zeros(1, 3, 4)
    lp[0, 0, 2], lp[0, 1, 3] = -1.0, -2.0 ** -30
    ppl, n = perplexity(Scores(lp, mask.bool()), batch)
    assert n == 2 and ppl == pytest.approx(math.exp((1.0 + 2.0 ** -30) / 2), rel=1e-13)
    assert ppl != pytest.approx(math.exp(0.5), rel=1e-13)
