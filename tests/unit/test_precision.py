"""The session's dtype on CPUs whose DeepSpeed accelerator lacks fp16 (AMD EPYC, many CI machines): the
default falls back to bf16 (else fp32) for every backend, the HF peer included, and says why; an explicit
dtype the accelerator cannot run skips the DeepSpeed backends with one line; CUDA is unchanged.

DeepSpeed's answer is stubbed (deepspeed_cpu_offers), so these run the same on a CPU with fp16; one test
asks the real accelerator."""
from __future__ import annotations

import json

import pytest

from pytest_neoxmii import precision
from pytest_neoxmii.precision import DtypeChoice, choose

ALL = ("ds", "mii", "zero")


def _never_asked():
    raise AssertionError("DeepSpeed's CPU accelerator must not be asked here")


@pytest.mark.parametrize("requested, expected", [(None, "fp16"), ("bf16", "bf16"), ("fp32", "fp32")])
def test_cuda_runs_what_was_asked_without_asking_the_cpu_accelerator(requested, expected):
    choice = choose(requested, on_cuda=True, backends=("hf",) + ALL, probe=_never_asked)
    assert choice == DtypeChoice(expected, requested)
    assert choice.describe() == expected and choice.refusal("ds", "fp16") is None


def test_hf_alone_on_cpu_keeps_fp16_without_asking_deepspeed():
    assert choose(None, on_cuda=False, backends=("hf",), probe=_never_asked).dtype == "fp16"


@pytest.mark.parametrize("offered, expected", [
    (("fp32", "bf16", "fp16"), "fp16"),      # an Intel CPU with AVX512-FP16: nothing changes
    (("fp32", "bf16"), "bf16"),              # AMD EPYC with avx512_bf16, no fp16
    (("fp32",), "fp32"),                     # neither
])
def test_cpu_default_is_the_first_of_fp16_bf16_fp32_that_deepspeed_offers(offered, expected):
    choice = choose(None, on_cuda=False, backends=("hf", "ds"), probe=lambda: offered, native=lambda: offered)
    assert choice.dtype == expected
    if expected == "fp16":
        assert choice.reason == "" and choice.describe() == "fp16"
    else:
        assert choice.describe() == (f"{expected} (DeepSpeed's CPU accelerator here offers "
                                     f"{', '.join(offered)}, not fp16)")
    assert all(choice.refusal(b, expected) is None for b in ALL)


def test_bf16_that_this_cpu_only_emulates_is_not_the_default_fp32_is_and_the_header_says_why():
    """An AMD EPYC with AVX2 alone: DeepSpeed offers bf16, oneDNN computes it by emulation (a matmul 90x slower
    than fp32 there, the acceptance suite 548 s instead of about 130 s)."""
    choice = choose(None, on_cuda=False, backends=("hf", "ds"), probe=lambda: ("fp32", "bf16"),
                    native=lambda: ("fp32",))
    assert (choice.dtype, choice.native) == ("fp32", ("fp32",))
    assert choice.describe() == ("fp32 (DeepSpeed's CPU accelerator here offers fp32, bf16, not fp16; this CPU "
                                 "computes bf16 only by emulation, far slower than fp32)")
    assert all(choice.refusal(b, "fp32") is None for b in ALL)


def test_a_dtype_asked_for_is_kept_even_where_the_cpu_only_emulates_it():
    choice = choose("bf16", on_cuda=False, backends=("hf", "ds"), probe=lambda: ("fp32", "bf16"),
                    native=_never_asked)
    assert (choice.dtype, choice.reason) == ("bf16", "") and choice.refusal("ds", "bf16") is None


def test_an_explicit_dtype_the_cpu_lacks_is_kept_and_refused_for_deepspeed_backends_only():
    choice = choose("fp16", on_cuda=False, backends=("hf",) + ALL, probe=lambda: ("fp32", "bf16"))
    assert choice.dtype == "fp16" and choice.reason == ""
    for backend in ALL:
        assert choice.refusal(backend, "fp16") == (
            "DeepSpeed's CPU accelerator on this CPU offers fp32, bf16, not fp16; pass --neox-dtype=bf16, or "
            "leave --neox-dtype unset to choose automatically")
    assert choice.refusal("hf", "fp16") is None          # torch runs fp16 on any CPU
    assert choice.refusal("ds", "bf16") is None and choice.refusal("ds", "fp32") is None


def test_deepspeed_that_cannot_be_asked_leaves_the_default():
    """Without an answer (deepspeed missing), fp16 stays; the backends then skip with their own reason."""
    choice = choose(None, on_cuda=False, backends=("ds",), probe=lambda: None)
    assert choice == DtypeChoice("fp16", None, None) and choice.refusal("ds", "fp16") is None


def test_the_real_cpu_accelerator_is_asked_in_a_child_process():
    pytest.importorskip("deepspeed")
    offered = precision.deepspeed_cpu_dtypes()
    assert offered is not None and {"fp32", "bf16"} <= set(offered) <= {"fp16", "bf16", "fp32"}
    native = precision.native_cpu_dtypes()
    assert native is not None and "fp32" in native and set(native) <= {"fp16", "bf16", "fp32"}


@pytest.fixture
def asked(monkeypatch):
    """Counts the probe's child processes (the real one imports torch and DeepSpeed: 3.2 s on two cores)."""
    calls = []

    def ask():
        calls.append(1)
        return {"offered": ["torch.float32", "torch.bfloat16"], "native": ["fp32"]}
    monkeypatch.setattr(precision, "_ask_deepspeed", ask)
    precision.forget()
    yield calls
    precision.forget()


def test_the_probes_answer_is_kept_in_the_cache_dir_for_the_next_session(asked, tmp_path):
    assert precision.deepspeed_cpu_dtypes(tmp_path) == ("fp32", "bf16")
    assert precision.native_cpu_dtypes(tmp_path) == ("fp32",)
    assert len(asked) == 1
    kept = list((tmp_path / precision.PROBE_CACHE).iterdir())
    assert [p.name for p in kept] == [f"{precision.probe_key()}.json"]
    precision.forget()              # the next session: a new process
    assert precision.deepspeed_cpu_dtypes(tmp_path) == ("fp32", "bf16") and len(asked) == 1
    choice = choose(None, on_cuda=False, backends=("ds",), cache_dir=tmp_path)
    assert (choice.dtype, choice.offered, choice.native) == ("fp32", ("fp32", "bf16"), ("fp32",))
    assert len(asked) == 1
    # The answer is the machine's: the same process asks nothing again for another directory, or none, and
    # keeps it in the other directory too (for the sessions started from there)
    other = tmp_path / "other"
    assert precision.deepspeed_cpu_dtypes(other) == ("fp32", "bf16") == precision.deepspeed_cpu_dtypes(None)
    assert len(asked) == 1
    assert (other / precision.PROBE_CACHE / f"{precision.probe_key()}.json").is_file()


def test_an_unreadable_kept_answer_is_asked_again_and_rewritten(asked, tmp_path):
    path = tmp_path / precision.PROBE_CACHE / f"{precision.probe_key()}.json"
    for damaged in ('{"offered": ["torch.float32"', '{"offered": "torch.float32", "native": []}', "[]"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(damaged)
        precision.forget()
        assert precision.deepspeed_cpu_dtypes(tmp_path) == ("fp32", "bf16")
        assert json.loads(path.read_text()) == {"offered": ["torch.float32", "torch.bfloat16"], "native": ["fp32"]}
    assert len(asked) == 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]       # no temporary file left behind


def test_a_failed_probe_is_not_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "_ask_deepspeed", lambda: None)
    precision.forget()
    try:
        assert precision.deepspeed_cpu_dtypes(tmp_path) is None
    finally:
        precision.forget()
    assert not (tmp_path / precision.PROBE_CACHE).exists()


def test_where_the_cpu_cannot_be_told_apart_nothing_is_kept(asked, monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "CPUINFO", str(tmp_path / "no-cpuinfo"))
    assert precision.probe_key() is None
    assert precision.deepspeed_cpu_dtypes(tmp_path) == ("fp32", "bf16") and len(asked) == 1
    assert not (tmp_path / precision.PROBE_CACHE).exists()


def test_the_kept_answer_belongs_to_the_cpu_its_isa_cap_and_the_installed_versions(monkeypatch):
    from importlib import metadata
    first = precision.probe_key()
    assert precision.probe_key() == first
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")        # oneDNN told to use less: its answer may change
    capped = precision.probe_key()
    assert capped != first
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda dist: "0.0.1" if dist == "deepspeed" else real_version(dist))
    assert precision.probe_key() not in (first, capped)


# -- in a session: the header, the peer, the backends, the skip line ---------------------------------------

SESSION_TEST = '''
def test_every_backend_and_the_peer_run_the_session_dtype(neox):
    ds = neox.backend("ds")
    assert neox.dtype == "bf16"
    assert (ds.info.dtype, neox.peer().info.dtype, neox.reference().info.dtype) == ("bf16", "bf16", "fp32")
'''


@pytest.fixture
def run_on_a_cpu_without_fp16(pytester, fake_gpus, synthetic_14m, deepspeed_cpu_offers, preloaded):
    """run(name, source, *args): a pytester session on synthetic pythia-14m, no GPU, DeepSpeed's CPU
    accelerator offering fp32 and bf16 only (an AMD EPYC, say)."""
    fake_gpus()
    deepspeed_cpu_offers("fp32", "bf16")

    def run(name: str, source: str, *args: str):
        pytester.makepyfile(**{name: source})
        return pytester.runpytest(*synthetic_14m, *args)
    return run


def test_a_cpu_without_fp16_runs_ds_and_the_peer_in_bf16_and_says_why(pytester, run_on_a_cpu_without_fp16):
    result = run_on_a_cpu_without_fp16("test_session", SESSION_TEST, "--neox-report=rep")
    result.assert_outcomes(passed=1)
    why = "bf16 (DeepSpeed's CPU accelerator here offers fp32, bf16, not fp16)"
    assert any(ln.startswith("neoxmii: weights source synthetic") and f"dtype {why}," in ln
               for ln in result.outlines), result.outlines
    assert f"dtype: {why}" in result.outlines                        # the neoxmii summary
    summary = json.loads((pytester.path / "rep" / "neoxmii-summary.json").read_text())
    assert (summary["dtype"], summary["dtype_reason"]) == (
        "bf16", "DeepSpeed's CPU accelerator here offers fp32, bf16, not fp16")


SKIP_TEST = '''
import pytest

@pytest.mark.parametrize("name", ["ds", "mii", "zero"])
def test_backend(neox, name):
    neox.backend(name)
'''


def test_explicit_fp16_on_a_cpu_without_it_skips_deepspeed_backends_with_one_line(run_on_a_cpu_without_fp16):
    result = run_on_a_cpu_without_fp16("test_skip", SKIP_TEST, "--neox-backends=ds,mii,zero",
                                       "--neox-dtype=fp16", "-rs")
    result.assert_outcomes(skipped=3)
    reason = ("DeepSpeed's CPU accelerator on this CPU offers fp32, bf16, not fp16; pass --neox-dtype=bf16, "
              "or leave --neox-dtype unset to choose automatically")
    skipped = sorted(ln for ln in result.outlines if ln.startswith("SKIPPED"))
    assert skipped == sorted(f"SKIPPED [1] test_skip.py:3: {b} (fp16): {reason}" for b in ("ds", "mii", "zero"))
    assert "Traceback" not in result.stdout.str()


def test_a_cpu_that_only_emulates_bf16_runs_the_session_in_fp32_and_says_why(pytester, fake_gpus, synthetic_14m,
                                                                             deepspeed_cpu_offers, preloaded):
    fake_gpus()
    deepspeed_cpu_offers("fp32", "bf16", native=("fp32",))
    pytester.makepyfile(test_session='''
def test_every_backend_and_the_peer_run_fp32(neox):
    assert neox.dtype == "fp32"
    assert (neox.backend("ds").info.dtype, neox.peer().info.dtype) == ("fp32", "fp32")
''')
    result = pytester.runpytest(*synthetic_14m)
    result.assert_outcomes(passed=1)
    assert ("dtype: fp32 (DeepSpeed's CPU accelerator here offers fp32, bf16, not fp16; this CPU computes bf16 "
            "only by emulation, far slower than fp32)") in result.outlines
