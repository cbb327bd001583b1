"""Fixtures shared by the plugin's unit tests (test_plugin_*.py, test_weights.py).

The plugin is driven through pytest's `pytester` (enabled in the repository's root conftest.py). Runs that
need a model use pythia-14m with synthetic weights from ONE cache directory for the whole test session, so
the model is built once; in-process runs fake the GPUs by replacing `pytest_neoxmii.hardware.detect`
(the plugin calls it through the module, and the real one is lru_cached)."""
from __future__ import annotations

import gc
import os
import time

import pytest

from pytest_neoxmii import hardware, kernels, precision
from pytest_neoxmii.hardware import Gpu, Hardware

# pytester points HOME at each test's own folder, so the plugin's default TORCH_EXTENSIONS_DIR (under
# ~/.cache) would be a new, empty folder in every test, and a DeepSpeed op a run needs would be compiled in
# each again (deepspeed_shm_comm: 23-62 s on two cores). One folder for the whole run: the one a user's run
# on this machine uses.
os.environ.setdefault(kernels.ENV, str(kernels.default_dir()))


def cores_per_xdist_worker(cpus: int | None, workers: str | None) -> int | None:
    """The share of the cores each pytest-xdist worker gets (None outside xdist)."""
    if not workers or not workers.isdigit():
        return None
    return max(1, (cpus or 1) // max(int(workers), 1))


def pytest_configure(config):
    # Under pytest-xdist every worker is a torch process, and so is each engine worker it starts: with
    # torch's default of one OpenMP thread per core each, two xdist workers ask for twice the cores, and
    # OpenMP's barriers then wait on preempted threads. On the 2-core CI machine the unit suite took 248.6 s
    # under -n 2 that way and 165.2 s with one thread per xdist worker (OMP_NUM_THREADS=1); one test that takes
    # 3.8 s alone took 36.4 s beside the other worker. Each xdist worker (and what it starts) gets its share of
    # the cores, unless the environment already says how many threads to use.
    share = cores_per_xdist_worker(os.cpu_count(), os.environ.get("PYTEST_XDIST_WORKER_COUNT"))
    if share is None:
        return
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(share))
    threads = os.environ["OMP_NUM_THREADS"]
    if not (threads.isdigit() and int(threads) > 0):    # the user's own value, and not a count: torch decides
        return
    import torch
    torch.set_num_threads(int(threads))


def pytest_collection_finish(session):
    # What collection imported (torch, the plugin, the test modules) is never garbage. pytest collects the
    # garbage when each config it made ends (its unraisable-exception cleanup), and the configs of pytester's
    # parseconfig end about two hundred times here: each walk of that whole object graph took 40-110 ms, 8 CPU-s
    # of the suite under -n 2 on the 2-core EPYC (1 s frozen). Frozen, a collection walks what tests made since.
    gc.collect()
    gc.freeze()


# Realistic devices, as torch.cuda.get_device_properties reports them (bytes), by a short key.
GPUS = {
    "t4": Gpu(index=0, name="Tesla T4", total_memory=15_828_320_256, capability=(7, 5)),
    "h100": Gpu(index=0, name="NVIDIA H100 80GB HBM3", total_memory=85_045_870_592, capability=(9, 0)),
    "a100-40g": Gpu(index=0, name="NVIDIA A100-SXM4-40GB", total_memory=42_298_834_944, capability=(8, 0)),
}


@pytest.fixture(scope="session")
def neox_cache_dir(tmp_path_factory):
    """The --neox-cache-dir of every pytester run here, with synthetic pythia-14m (seed 0) built once."""
    from pytest_neoxmii.registry import lookup
    from pytest_neoxmii.weights import build_synthetic

    cache = tmp_path_factory.mktemp("neoxmii-cache")
    build_synthetic(lookup("pythia-14m"), 0, cache)
    return cache


@pytest.fixture(scope="session")
def preloaded(neox_cache_dir):
    """Import, once and outside any pytester test, everything an in-process run of the plugin imports.

    pytester drops the modules first imported during a test when the test ends; importing torch's
    distributed and transformers' modeling modules a second time fails (torch.library refuses to register
    an operator namespace twice). Loading the synthetic model, its tokenizer and config here imports them
    for good. The test modules that run pytester in-process use this fixture (pytestmark)."""
    import huggingface_hub  # noqa: F401
    import safetensors.torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pytest_neoxmii.registry import lookup
    from pytest_neoxmii.weights import synthetic_directory

    path = str(synthetic_directory(lookup("pythia-14m"), 0, neox_cache_dir))
    AutoConfig.from_pretrained(path)
    AutoTokenizer.from_pretrained(path)
    AutoModelForCausalLM.from_pretrained(path)
    # Every pytester run ends with pytest's gc.collect() calls (unraisableexception plugin), which walk
    # the whole torch/transformers object graph: freezing what exists now keeps each under a few ms.
    gc.collect()
    gc.freeze()
    return neox_cache_dir


@pytest.fixture
def synthetic_14m(neox_cache_dir):
    """Command-line arguments for a run on synthetic pythia-14m from the shared cache (ds on CPU loads fast).

    Four new tokens a case, not the default 32: what these runs test is the plugin's machinery, which is the
    same for any count, and the reference's greedy decoding of every default case, the 2016-token prompt's
    included, was most of an in-process run's CPU time (a test that needs another count gives it after these,
    and the last one counts)."""
    return ["--neox-model=pythia-14m", "--neox-weights=synthetic", "--neox-backends=ds",
            f"--neox-cache-dir={neox_cache_dir}", "--neox-max-new-tokens=4", "-p", "no:cacheprovider"]


@pytest.fixture
def fake_gpus(monkeypatch):
    """fake_gpus("t4", ...) makes in-process runs see exactly these GPUs (none when called without any);
    returns the Hardware the plugin will see. uuids=True names them GPU-fake-0, ... (a fake nvidia-smi's)."""
    def install(*keys: str, uuids: bool = False) -> Hardware:
        gpus = [GPUS[k] for k in keys]
        hw = Hardware(gpus=tuple(Gpu(i, g.name, g.total_memory, g.capability, f"GPU-fake-{i}" if uuids else None)
                                 for i, g in enumerate(gpus)),
                      cuda_version="12.8" if gpus else None, driver_version="570.1" if gpus else None)
        monkeypatch.setattr(hardware, "detect", lambda: hw)
        return hw
    return install


@pytest.fixture
def own_fork_server(monkeypatch):
    """The workers this test starts get a fork server of their own, which has imported nothing for earlier
    tests: an environment setting that no server of this process has imported under (the idle one is replaced,
    deploy/forkserver.py, server_for)."""
    monkeypatch.setenv("OWN_FORK_SERVER", f"{os.getpid()}-{time.monotonic_ns()}")


@pytest.fixture
def on_the_cpu(fake_gpus, monkeypatch):
    """A CPU session, as on the CI machines, on any machine: for the tests whose expectations are a CPU
    session's (the reference on cpu, ds in fp32, no work ahead by default). In-process runs see no GPU
    (fake_gpus); on a machine with GPUs, the processes started from here (pytest subprocesses, engine
    workers) see none either, so that DeepSpeed takes its CPU accelerator. On a machine without GPUs the
    environment is left as it is (a fork server's imports read it: deploy/forkserver.py)."""
    if hardware.detect().gpus:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return fake_gpus()


@pytest.fixture
def assert_usage_error():
    return _assert_usage_error


@pytest.fixture
def outcomes():
    return _outcomes


def _assert_usage_error(result, error_line: str) -> None:
    """A one-line usage error: exit code 4, the ERROR line(s) given, no traceback, nothing from the
    plugin's internals."""
    text = "\n".join(result.outlines + result.errlines)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text
    assert f"ERROR: {error_line}" in result.errlines, text
    assert "Traceback" not in text
    assert "pytest_neoxmii/" not in text
    assert "INTERNALERROR" not in text
    errors = [ln for ln in result.errlines if ln.startswith("ERROR")]
    assert len(errors) == 1, text


def _outcomes(reprec) -> dict[str, tuple[str, str | None]]:
    """{test name: (outcome, skip reason)} from pytester.inline_run's recorder."""
    found: dict[str, tuple[str, str | None]] = {}
    for rep in reprec.getreports("pytest_runtest_logreport"):
        name = rep.nodeid.split("::", 1)[-1]
        if rep.when == "call" or (rep.when == "setup" and not rep.passed):
            if rep.skipped:
                reason = rep.longrepr[2]
                found[name] = ("skipped", reason.removeprefix("Skipped: "))
            else:
                found[name] = (rep.outcome, None)
    return found


@pytest.fixture
def deepspeed_cpu_offers(monkeypatch):
    """Stands in for what DeepSpeed's CPU accelerator offers, so that in-process runs do not depend on the
    CPU make: deepspeed_cpu_offers("fp32", "bf16") is a CPU without fp16 (an AMD EPYC, say), computing bf16
    natively; deepspeed_cpu_offers("fp32", "bf16", native=("fp32",)) one that only emulates it (AVX2 alone)."""
    def offer(*dtypes: str, native: tuple[str, ...] | None = None) -> None:
        monkeypatch.setattr(precision, "deepspeed_cpu_dtypes", lambda cache_dir=None: tuple(dtypes))
        # the CPU computes what DeepSpeed offers, unless told otherwise (an AVX2-only CPU emulates bf16)
        monkeypatch.setattr(precision, "native_cpu_dtypes",
                            lambda cache_dir=None: tuple(dtypes) if native is None else native)
    return offer


@pytest.fixture(autouse=True)
def _inner_sessions_are_not_xdist_workers(monkeypatch):
    """Under pytest-xdist (-n) the worker's PYTEST_XDIST_* variables would make every in-process pytester
    session believe it is a worker too: pytest-benchmark then disables itself and the latency tests skip."""
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(var, raising=False)
