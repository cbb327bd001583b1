"""What an engine generated, recorded next to it (MII's ranks) and read back by the session; and the
planted fault that proves the judges catch a defect on the real stack."""
from __future__ import annotations

import json
import re
import types

import pytest
import torch

from pytest_neoxmii.backends import generation_capture as capture
from pytest_neoxmii.backends import planted_fault
from pytest_neoxmii.backends.torch_model import TorchModelBackend
from pytest_neoxmii.outputs import PromptBatch


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).eval()


class _InProcess(TorchModelBackend):
    def close(self) -> None:
        pass


def _reference(model, batch, n, top_k):
    backend = _InProcess()
    backend.model, backend.device = model, "cpu"
    return backend.generate(batch, n, top_k)


def test_the_record_is_what_the_reference_path_computes(tiny_model):
    """The pipeline's call (input_ids, attention_mask, generation kwargs) through the wrapper: the caller still
    gets the plain sequences, and each row's record holds the unpadded prompt, the new ids and the top-k
    logprobs of every step, equal to what TorchModelBackend.generate (the reference's path) reports."""
    import copy
    model = copy.deepcopy(tiny_model)
    records = []
    capture.capture_generate(model, records.append, top_k=3)
    batch = PromptBatch(rows=((5, 6, 7, 8), (9, 10)), pad_token_id=0)
    ids, mask = batch.padded()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8)
    expected = _reference(tiny_model, batch, 4, 3)
    assert [r["prompt"] for r in records] == [[5, 6, 7, 8], [9, 10]]
    assert [r["tokens"] for r in records] == expected.tokens == out[:, 4:].tolist()
    for record, top in zip(records, expected.top_logprobs):
        assert [[t for t, _ in step] for step in record["top"]] == [[t for t, _ in step] for step in top]
        torch.testing.assert_close(torch.tensor([[lp for _, lp in step] for step in record["top"]]),
                                   torch.tensor([[lp for _, lp in step] for step in top]), rtol=0, atol=1e-6)


def test_file_sink_and_reader_take_only_what_came_after_the_offset(tmp_path):
    path = tmp_path / capture.CAPTURE_FILE
    assert capture.read_records(path, 0) == ([], 0)          # nothing written yet
    sink = capture.file_sink(path)
    sink({"prompt": [1], "tokens": [2], "top": [[[2, -0.1]]]})
    first, offset = capture.read_records(path, 0)
    sink({"prompt": [3], "tokens": [4], "top": [[[4, -0.2]]]})
    second, end = capture.read_records(path, offset)
    assert [r["prompt"] for r in first] == [[1]]
    assert [r["prompt"] for r in second] == [[3]]
    assert end == path.stat().st_size > offset


def _record(prompt, tokens, lp=-0.5):
    return {"prompt": prompt, "tokens": tokens, "top": [[[t, lp]] for t in tokens]}


def test_rows_are_matched_by_prompt_ids_the_latest_record_winning():
    records = [_record([1, 2], [7, 8], -1.0), _record([3], [9, 9]), _record([1, 2], [5, 6], -0.25)]
    tokens, top = capture.match_rows(records, [[3], [1, 2]], 2)
    assert tokens == [[9, 9], [5, 6]]
    assert top[1] == [[(5, -0.25)], [(6, -0.25)]]


def test_a_row_without_its_record_or_of_another_length_is_a_mismatch():
    with pytest.raises(capture.CaptureMismatch, match=r"no record .* row 1 \(3 prompt tokens\) among the 1"):
        capture.match_rows([_record([1], [2, 2])], [[1], [4, 5, 6]], 2)
    with pytest.raises(capture.CaptureMismatch, match="row 0: the engine recorded 1 tokens and 1 steps, 2 were"):
        capture.match_rows([_record([1], [2])], [[1]], 2)


# --- planted fault ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("attention-output-scale:8", "expected attention-output-scale:LAYER:FACTOR"),
    ("mlp-scale:1:1.05", "expected attention-output-scale:LAYER:FACTOR"),
    ("attention-output-scale:x:1.05", "LAYER must be an integer and FACTOR a number"),
])
def test_a_malformed_fault_is_refused_with_its_form(monkeypatch, text, message):
    monkeypatch.setenv(planted_fault.PLANT_FAULT_ENV, text)
    with pytest.raises(planted_fault.FaultSpecError, match=message):
        planted_fault.planted()


def test_no_fault_unless_asked(monkeypatch, tiny_model):
    monkeypatch.delenv(planted_fault.PLANT_FAULT_ENV, raising=False)
    assert planted_fault.planted() is None
    assert planted_fault.plant(tiny_model) is None


def test_the_named_layer_output_weight_is_scaled_and_nothing_else(monkeypatch, tiny_model):
    import copy
    model = copy.deepcopy(tiny_model)
    monkeypatch.setenv(planted_fault.PLANT_FAULT_ENV, "attention-output-scale:1:1.05")
    assert planted_fault.planted() == "layer 1's attention output weight x1.05 in every DeepSpeed engine"
    assert planted_fault.plant(model) == "attention.dense.weight of layer 1 x1.05"
    before, after = dict(tiny_model.named_parameters()), dict(model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == ["gpt_neox.layers.1.attention.dense.weight"]
    torch.testing.assert_close(after[changed[0]], before[changed[0]] * 1.05)


def test_an_injected_layer_has_its_deepspeed_output_projection_scaled(monkeypatch):
    """After kernel injection the output projection is DeepSpeed's attn_ow (this rank's shard)."""
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_ow = torch.nn.Parameter(torch.ones(2, 2))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt_neox = torch.nn.Module()
            self.gpt_neox.layers = torch.nn.ModuleList([Layer(), Layer()])

    model = Model()
    monkeypatch.setenv(planted_fault.PLANT_FAULT_ENV, "attention-output-scale:0:2")
    assert planted_fault.plant(model) == "attn_ow of layer 0 x2"
    assert torch.equal(model.gpt_neox.layers[0].attention.attn_ow, torch.full((2, 2), 2.0))
    assert torch.equal(model.gpt_neox.layers[1].attention.attn_ow, torch.ones(2, 2))
    monkeypatch.setenv(planted_fault.PLANT_FAULT_ENV, "attention-output-scale:2:2")
    with pytest.raises(planted_fault.FaultSpecError, match="layer 2 does not exist \\(2 layers\\)"):
        planted_fault.plant(model)


def test_the_ranks_planted_faults_are_one_notes_line_naming_ranks_that_differ():
    same = [{"rank": r, "planted_fault": "attn_ow of layer 2 x1.05"} for r in (0, 1)]
    assert planted_fault.ranks_note(same) == ["PLANTED FAULT: attn_ow of layer 2 x1.05 in each of 2 ranks' shards"]
    differ = [{"rank": 0, "planted_fault": "attn_ow of layer 2 x1.05"}, {"rank": 1, "planted_fault": None}]
    assert planted_fault.ranks_note(differ) == ["PLANTED FAULT: rank 0: attn_ow of layer 2 x1.05; rank 1: nothing"]
    assert planted_fault.ranks_note([{"rank": 0, "planted_fault": None}, {"rank": 1}]) == []


def test_a_multi_rank_deployment_says_in_its_notes_what_its_ranks_planted():
    """At tp >= 2 each rank plants in its shard and says so in its report; the deployment's notes (what a
    failure message and the report show) carry it, for ds under the launcher and for MII's gRPC server."""
    from pytest_neoxmii.backends.ds_launcher import DsLauncherBackend
    from pytest_neoxmii.backends.mii_server import MiiServerBackend
    reports = [{"rank": r, "kernels": "injected", "layers": 6, "injected": 6,
                "planted_fault": "attn_ow of layer 2 x1.05"} for r in (0, 1)]
    ds = DsLauncherBackend.__new__(DsLauncherBackend)
    ds.rank_infos, ds.name, ds.dtype, ds.device, ds.gpus, ds.tp = reports, "ds", "fp16", "cuda", [0, 1], 2
    ds.engine_config, ds.max_tokens, ds.max_batch, ds.deploy_seconds = None, 2048, 4, 9.0
    mii = MiiServerBackend.__new__(MiiServerBackend)
    mii.rank_reports, mii._probe, mii.dtype, mii.gpus, mii.tp = reports, None, "fp16", [0, 1], 2
    mii.engine_config, mii.max_tokens, mii.deploy_seconds = None, 2048, 9.0
    mii.tag, mii._probe_attributes = "mii-server-test-no-such-tag", False
    for backend in (ds, mii):
        assert backend._describe().notes[-1] == "PLANTED FAULT: attn_ow of layer 2 x1.05 in each of 2 ranks' shards"
        for report in reports:
            report["planted_fault"] = None
        assert not any("PLANTED" in n for n in backend._describe().notes)
        for report in reports:
            report["planted_fault"] = "attn_ow of layer 2 x1.05"
    # ds's ranks measure their workspace as the in-process engines do; a rank whose readings spread says so
    mib = 2**20
    reports[1]["workspace_readings"] = [792 * mib, 772 * mib, 792 * mib]
    assert [n for n in ds._describe().notes if "workspace readings" in n] == [
        "rank 1: DeepSpeed workspace readings 772-792 MiB (the GPU's other processes moved the driver's figure "
        "meanwhile; the median is taken)"]


def test_the_header_names_a_planted_fault_and_a_bad_one_is_a_usage_error(pytester, monkeypatch, synthetic_14m,
                                                                          assert_usage_error):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    monkeypatch.setenv(planted_fault.PLANT_FAULT_ENV, "attention-output-scale:3:1.05")
    result = pytester.runpytest(*synthetic_14m)
    assert result.ret == 0
    assert ("neoxmii: PLANTED FAULT (NEOXMII_PLANT_FAULT): layer 3's attention output weight x1.05 in every "
            "DeepSpeed engine; these results prove the judges, they say nothing of the stack") in result.outlines
    monkeypatch.setenv(planted_fault.PLANT_FAULT_ENV, "attention-output-scale:3")
    assert_usage_error(pytester.runpytest(*synthetic_14m),
                       "NEOXMII_PLANT_FAULT='attention-output-scale:3': expected attention-output-scale:LAYER:FACTOR")
    monkeypatch.setenv(planted_fault.PLANT_FAULT_ENV, "attention-output-scale:6:1.05")     # pythia-14m: 6 layers
    assert_usage_error(pytester.runpytest(*synthetic_14m),
                       "NEOXMII_PLANT_FAULT: layer 6 does not exist (6 layers)")


# --- the MII server backend reads what rank 0 recorded ----------------------------------------------------

class _WordTokenizer:
    """Ids as words: round-trips any prompt through text, as prompt_texts requires."""

    def decode(self, ids):
        return " ".join(str(i) for i in ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) for w in text.split()]}


def _server(tmp_path, rank0_writes):
    """A MiiServerBackend without processes: its query goes to a stand-in that writes what rank 0 would."""
    from pytest_neoxmii.backends.mii_server import MiiServerBackend
    backend = MiiServerBackend.__new__(MiiServerBackend)
    backend.name, backend.tokenizer = "neoxmii-test", _WordTokenizer()
    backend.run_dir = tmp_path
    backend._capture_path, backend._capture_at = tmp_path / capture.CAPTURE_FILE, 0
    sink = capture.file_sink(backend._capture_path)

    def query_texts(texts, max_new_tokens):
        if not (tmp_path / capture.CAPTURE_ON_FILE).exists():      # rank 0 records only when asked
            return ["(text)"] * len(texts)
        for record in rank0_writes(texts, max_new_tokens):
            sink(record)
        return ["(text)"] * len(texts)
    backend.query_texts = query_texts
    return backend


def test_mii_server_generation_is_rank0s_record_cut_to_the_sessions_top_k(tmp_path):
    def rank0(texts, n):
        for text in texts:
            prompt = [int(w) for w in text.split()]
            yield {"prompt": prompt, "tokens": [prompt[-1] + 1] * n,
                   "top": [[[prompt[-1] + 1, -0.1], [0, -2.0], [1, -3.0]] for _ in range(n)]}
    backend = _server(tmp_path, rank0)
    gen = backend.generate(PromptBatch(rows=((4, 5), (7,))), 2, top_k=2)
    assert gen.tokens == [[6, 6], [8, 8]]
    assert gen.top_logprobs[1] == [[(8, -0.1), (0, -2.0)], [(8, -0.1), (0, -2.0)]]
    again = backend.generate(PromptBatch(rows=((9,),)), 1, top_k=1)     # only the new query's records
    assert again.tokens == [[10]] and again.top_logprobs == [[[(10, -0.1)]]]
    assert not (tmp_path / capture.CAPTURE_ON_FILE).exists()             # recording is off between queries


def test_mii_server_without_rank0s_record_is_a_deployment_error_naming_it(tmp_path):
    from pytest_neoxmii.deploy.processes import DeploymentError
    backend = _server(tmp_path, lambda texts, n: [])
    with pytest.raises(DeploymentError, match="MII deployment neoxmii-test: no record of what the engine "
                                              "generated for row 0"):
        backend.generate(PromptBatch(rows=((4, 5),)), 2, top_k=2)


def _in_process_mii(model, lossy_text: str):
    """An in-process MiiBackend (tp = 1) without MII: its query runs the model's generate for each prompt, one
    after another, as MII's pipeline does, and answers with text that does not re-tokenize to what was
    generated (the pipeline's clean-up of tokenization spaces can do that)."""
    import types
    from pytest_neoxmii.backends.mii_legacy import MiiBackend
    backend = MiiBackend.__new__(MiiBackend)
    backend.name, backend.tokenizer = "neoxmii-test", _WordTokenizer()
    backend.model = types.SimpleNamespace(module=model)
    backend._records = None
    capture.capture_generate(model, backend._record, capture.CAPTURE_TOP_K,
                             enabled=lambda: backend._records is not None)
    calls = []

    def query_texts(texts, max_new_tokens):
        for text in texts:
            ids = torch.tensor([[int(w) for w in text.split()]])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=0)
            calls.append(type(out).__name__)
        return [lossy_text] * len(texts)
    backend.query_texts = query_texts
    return backend, calls


def test_in_process_mii_is_judged_on_what_its_engine_generated_not_on_its_text_read_back(tiny_model):
    import copy
    model = copy.deepcopy(tiny_model)
    backend, calls = _in_process_mii(model, lossy_text="1")       # the text reads back as one unknown token
    batch = PromptBatch(rows=((5, 6, 7, 8), (9, 10)), pad_token_id=0)
    gen = backend.generate(batch, 4, top_k=3)
    expected = _reference(tiny_model, PromptBatch(rows=((5, 6, 7, 8),), pad_token_id=0), 4, 3)
    assert gen.tokens[0] == expected.tokens[0] and len(gen.tokens[1]) == 4
    assert [[t for t, _ in step] for step in gen.top_logprobs[0]] == \
        [[t for t, _ in step] for step in expected.top_logprobs[0]]
    assert calls == ["Tensor", "Tensor"]           # the pipeline still got plain sequences
    assert backend._records is None                # and the capture is off again


def test_a_timed_mii_query_records_nothing_and_asks_for_no_logits(tiny_model):
    """latency.py times query_texts: it must pay for no per-step logits; generate() asks for them."""
    import copy
    model = copy.deepcopy(tiny_model)
    seen, original = [], model.generate

    def spy(*args, **kwargs):              # what the model itself is asked, under the capture's wrapper
        seen.append(sorted(k for k in kwargs if k.startswith(("output_", "return_dict"))))
        return original(*args, **kwargs)
    model.generate = spy
    backend, _ = _in_process_mii(model, lossy_text="1")
    backend.query_texts(["5 6 7"], 2)
    assert seen == [[]] and backend._records is None
    backend.generate(PromptBatch(rows=((5, 6, 7),), pad_token_id=0), 2, top_k=2)
    assert seen[1] == ["output_logits", "return_dict_in_generate"]


def test_a_query_whose_prompt_the_engine_never_saw_is_an_error_naming_the_row(tiny_model):
    import copy
    backend, _ = _in_process_mii(copy.deepcopy(tiny_model), lossy_text="1")
    backend.query_texts = lambda texts, n: ["x"] * len(texts)        # answered without calling the model
    with pytest.raises(RuntimeError, match="MII deployment neoxmii-test: no record of what the engine generated "
                                           "for row 0"):
        backend.generate(PromptBatch(rows=((5, 6),), pad_token_id=0), 2)


def test_more_logprobs_a_step_than_recorded_is_a_skip_reason_naming_both():
    from pytest_neoxmii.errors import BackendUnavailable
    record = {"prompt": [4, 5], "tokens": [6], "top": [[[6, -0.1]]]}
    gen = capture.generation([record], PromptBatch(rows=((4, 5),)), 1, top_k=1)
    assert gen.tokens == [[6]] and gen.top_logprobs == [[[(6, -0.1)]]]
    with pytest.raises(BackendUnavailable, match=f"recorded with their top-{capture.CAPTURE_TOP_K} logprobs "
                                                 r"\(MII returns text only\), top-21 was asked"):
        capture.generation([record], PromptBatch(rows=((4, 5),)), 1, top_k=capture.CAPTURE_TOP_K + 1)


def _failure_sections(text: str) -> dict[str, str]:
    """A pytest run's FAILURES part, as each test's own section by test name (the short summary left out)."""
    failures = text.split(" short test summary info ")[0]
    parts = re.split(r"^_{2,} (\S+) _{2,}$", failures, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.usefixtures("on_the_cpu")
def test_a_planted_fault_is_in_every_engine_at_tp_1_and_each_one_fails_parity_at_that_layer(
        pytester, monkeypatch, synthetic_14m, tmp_path):
    """The header says the fault is planted "in every DeepSpeed engine": at tp = 1 too, where ds and MII run in
    one process and ZeRO partitions the weight. The real engines on synthetic pythia-14m (CPU, fp32): each
    one's teacher-forced parity fails, its localisation names the planted layer, and its notes say what was
    planted. (The same tests pass without the fault: the acceptance suite, CI's main job.)"""
    pytest.importorskip("deepspeed")
    pytest.importorskip("mii")
    monkeypatch.setenv(planted_fault.PLANT_FAULT_ENV, "attention-output-scale:2:1.05")
    args = [a for a in synthetic_14m if not a.startswith("--neox-backends")]
    result = pytester.runpytest_subprocess(
        *args, "--neox-backends=ds,mii,zero", "--neox-dtype=fp32", "--pyargs", "pytest_neoxmii.suite.test_parity",
        "-k", "teacher_forced_parity and short-b1-len16", "--neox-report", str(tmp_path / "report"))
    text = "\n".join(result.outlines)
    result.assert_outcomes(failed=3)
    # Each engine's localisation: layers 0 and 1 identical to the reference (0 error), layer 2 departs. Looked
    # for in each test's own failure section: with CI set, pytest's short summary repeats whole messages.
    sections = _failure_sections(text)
    for engine in ("ds", "mii", "zero"):
        name = f"test_teacher_forced_parity[short-b1-len16-{engine}]"
        assert name in sections, (sorted(sections), text)
        section = sections[name]
        assert "divergence starts at gpt_neox.layers.2 (hidden_states[3])" in section, section
    summary = json.loads((tmp_path / "report" / "neoxmii-summary.json").read_text())
    failed = {r["backend"] for r in summary["records"] if r["check"] == "teacher-forced" and not r["passed"]}
    assert failed == {"ds", "mii", "zero"}, summary["records"]
    for engine in ("ds", "mii", "zero"):
        assert "PLANTED FAULT: attention.dense.weight of layer 2 x1.05" in summary["backends"][f"{engine}:fp32"], \
            summary["backends"]


@pytest.mark.parametrize("attributed", [True, False])
def test_the_mii_servers_gpu_memory_is_its_own_processes_where_nvidia_smi_attributes_it(monkeypatch, attributed):
    """The server is deployed from inside the mii worker, which knows nothing of the session's other
    deployments: its device-wide difference since the launch counted ds's ranks loading meanwhile (two H100s:
    3859 MiB in one session, 9854 MiB in the next). Where nvidia-smi attributes memory to processes, the
    figure is what the server's own processes hold; elsewhere the device-wide one, and the notes say which."""
    from pytest_neoxmii.backends.mii_server import MiiServerBackend
    from pytest_neoxmii.deploy import gpumem, processes
    asked = []
    monkeypatch.setattr(processes, "tagged", lambda tag: {11, 12} if tag == "mii-tag" else set())
    monkeypatch.setattr(gpumem, "held_by", lambda pids: (
        asked.append(set(pids)) or ({0: 1000.0, 1: 1001.0} if attributed else {})))
    mii = MiiServerBackend.__new__(MiiServerBackend)
    mii._trees = [types.SimpleNamespace(pids=lambda: {31, 32})]     # the launcher's tree as walked
    mii.rank_reports = [{"rank": r, "kernels": "injected 12/12 layers", "layers": 12, "injected": 12} for r in (0, 1)]
    mii.dtype, mii.gpus, mii.tp, mii.engine_config, mii.max_tokens, mii.deploy_seconds = "fp16", [0, 1], 2, None, 2048, 9.0
    mii.tag, mii._probe_attributes = "mii-tag", True
    mii._baseline = {0: 500.0, 1: 500.0}
    mii._probe = lambda: {0: 7500.0, 1: 7501.0}      # another deployment's 5 GiB a GPU loaded meanwhile
    info = mii._describe()
    if attributed:
        assert asked == [{11, 12, 31, 32}]           # the trees' processes and every process with its tag
        assert info.gpu_memory_bytes == 2001 * 2**20
        assert "GPU memory of its processes (nvidia-smi)" in info.notes
    else:
        assert info.gpu_memory_bytes == 14001 * 2**20
        assert "GPU memory device-wide since its launch, other loads meanwhile included" in info.notes
    mii._probe_attributes = False                     # a custom probe: nvidia-smi's figures do not apply
    asked.clear()
    assert mii._describe().gpu_memory_bytes == 14001 * 2**20 and asked == []
