"""Tensor parallel across GPUs (--neox-tp >= 2): the fp32 HF reference against `ds` run under the
DeepSpeed launcher (one process per GPU, rank 0 answering the session) and `mii` as MII's LOCAL gRPC
deployment, under the parity engine's rules; their latency against tp=1 in the same session; and a
teardown that leaves no process and no GPU memory behind. Backends keep their names at every tp: the
session's --neox-tp decides which deployment `ds` and `mii` are.

    pytest pytest_neoxmii/suite/test_multi_gpu.py --neox-model=pythia-1b --neox-weights=synthetic \\
        --neox-tp=2 --neox-backends=ds,mii

The mii server returns text only: it is compared on greedy token ids, and its teacher-forced cases skip
(teacher-forced parity at tp=2 is checked on ds). gpt-neox-20b runs where the registry's memory
arithmetic says it fits (one 80 GB GPU, or tp=2 on 40 GB GPUs)."""
from __future__ import annotations

import statistics
import time

import pytest

from pytest_neoxmii.checks import check_greedy, check_teacher_forced
from pytest_neoxmii.session import Record

TP_BACKENDS = ("ds", "mii")
LATENCY_PROMPT_TOKENS, WARMUP, RUNS = 64, 2, 7


@pytest.fixture(params=TP_BACKENDS)
def tp_name(request, neox):
    """ds or mii as deployed at the session's --neox-tp (>= 2)."""
    name = request.param
    if neox.options.tp < 2:
        pytest.skip(f"tensor-parallel test: needs --neox-tp >= 2, got {neox.options.tp}")
    if name not in neox.options.backends:
        pytest.skip(f"backend {name} not selected (--neox-backends={','.join(neox.options.backends)})")
    return name


@pytest.mark.multi_gpu(2)
def test_tp_kernels_injected_on_every_rank(neox, tp_name, record_property):
    backend = neox.backend(tp_name)
    layers = neox.model.spec.num_hidden_layers
    record_property("info", backend.info.describe())
    assert backend.info.tensor_parallel == neox.options.tp, backend.info.describe()
    assert backend.info.kernels == f"injected {layers}/{layers} layers", backend.info.describe()


@pytest.mark.multi_gpu(2)
def test_tp_greedy_parity(neox, tp_name, neox_generation_case, request):
    check_greedy(neox, tp_name, neox_generation_case, request)


@pytest.mark.multi_gpu(2)
def test_tp_teacher_forced_parity(neox, tp_name, neox_case, request):
    backend = neox.backend(tp_name)
    if not getattr(backend, "can_score", True):
        from pytest_neoxmii.backends.mii_server import NO_SCORES
        pytest.skip(NO_SCORES)
    check_teacher_forced(neox, tp_name, neox_case, request)


def _latencies(call) -> list[float]:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def _timed_call(backend, batch, new_tokens: int):
    """What a user of the backend waits for: MII's query (text in, text out), DS's generate."""
    if hasattr(backend, "query_texts"):
        text = backend.tokenizer.decode(list(batch.rows[0]))
        return lambda: backend.query_texts([text], new_tokens)
    return lambda: backend.generate(batch, new_tokens, 1)


@pytest.mark.multi_gpu(2)
def test_tp_latency_against_tp1(neox, tp_name, record_property):
    """Batch 1, a 64-token prompt, --neox-max-new-tokens greedy tokens; median of 7 after 2 warm-ups, the
    tp deployment and a private tp=1 deployment of the same backend, in this session, on these GPUs."""
    from pytest_neoxmii.backends import load_backend
    from pytest_neoxmii.cases import text_tokens
    from pytest_neoxmii.outputs import PromptBatch

    tp, dtype, n = neox.options.tp, neox.dtype, neox.options.max_new_tokens
    backend = neox.backend(tp_name)
    fits, reason = neox.model.spec.fits(dtype, 1, [neox.hardware.gpus[0].total_memory])
    if not fits:
        pytest.skip(f"no tp=1 comparison: {reason}")
    pad = neox.tokenizer.pad_token_id or 0
    batch = PromptBatch(rows=(tuple(text_tokens(neox.tokenizer)[:LATENCY_PROMPT_TOKENS]),), pad_token_id=pad)
    times_tp = _latencies(_timed_call(backend, batch, n))
    single = load_backend(tp_name, path=neox.model.path, dtype=dtype, device=neox.device, tp=1,
                          max_tokens=neox.max_tokens, spec=neox.model.spec, max_batch=neox.max_batch)
    try:
        times_1 = _latencies(_timed_call(single, batch, n))
    finally:
        single.close()
    med_tp, med_1 = statistics.median(times_tp), statistics.median(times_1)
    metrics = {"median_s_tp": med_tp, "median_s_tp1": med_1, "ratio_tp_over_tp1": med_tp / med_1,
               "samples_tp": times_tp, "samples_tp1": times_1, "tp": tp, "new_tokens": n,
               "prompt_tokens": len(batch.rows[0]), "deploy_s_tp": getattr(backend, "deploy_seconds", None)}
    for k, v in metrics.items():
        record_property(f"latency_{k}", v)
    summary = (f"{tp_name} tp={tp}: {med_tp:.3f} s median ({med_tp / n * 1e3:.1f} ms/token), tp=1: {med_1:.3f} s "
               f"({med_1 / n * 1e3:.1f} ms/token), ratio {med_tp / med_1:.2f}")
    neox.record(Record("latency", f"{tp_name}-tp{tp}", f"latency-b1-len{len(batch.rows[0])}", None, metrics, summary))
    print(summary)


@pytest.mark.a100_40g
def test_gpt_neox_20b_deploys_where_the_registry_says_it_fits(neox, record_property):
    """The configuration the DeepSpeed-MII GPT-NeoX notes lead with: gpt-neox-20b in fp16 with
    tensor_parallel 2 and load_with_sys_mem on two 40 GB GPUs (or one 80 GB GPU at tp=1). The registry's
    arithmetic decides; the deployment must load, inject every layer and answer."""
    spec = neox.model.spec
    if spec.name != "gpt-neox-20b":
        pytest.skip(f"the session's model is {spec.name}: run with --neox-model=gpt-neox-20b "
                    "(--neox-weights=synthetic where the hub cannot be reached)")
    tp, dtype = neox.options.tp, neox.dtype
    fits, reason = spec.fits(dtype, tp, [g.total_memory for g in neox.hardware.gpus])
    record_property("fit", reason)
    if not fits:
        pytest.skip(reason)
    name = "mii" if "mii" in neox.options.backends else "ds"
    backend = neox.backend(name)
    layers = spec.num_hidden_layers
    assert backend.info.tensor_parallel == tp
    assert backend.info.kernels == f"injected {layers}/{layers} layers", backend.info.describe()
    plan = next(p for p in neox.plans() if p.generate)
    generation = neox.generation(backend, neox.case(plan))
    assert [len(row) for row in generation.tokens] == [plan.max_new_tokens] * len(plan.lengths)
    per_gpu = spec.weight_bytes(dtype) / tp
    held = backend.info.gpu_memory_bytes
    record_property("gpu_memory_bytes", held)
    record_property("weights_per_gpu_bytes", per_gpu)
    print(f"{backend.info.describe()}; weights per GPU {per_gpu / 1e9:.1f} GB; {reason}")


@pytest.mark.multi_gpu(2)
def test_tp_teardown_leaves_nothing_behind(neox, tp_name, record_property):
    """Closes the session's deployment (a later test that needs it deploys it again): MII's terminate or
    the workers' shutdown, then every process of the tree ended, then GPU memory back within the
    tolerance (100 MiB) of where it was before the deployment."""
    from pytest_neoxmii.deploy import processes
    backend = neox.backend(tp_name)
    neox.close_backend(tp_name)
    report = backend.teardown_report
    for k, v in report.as_dict().items():
        record_property(f"teardown_{k}", v)
    print(report.describe())
    assert not report.leaked, report.describe()
    assert processes.tagged(backend.tag) == set()
