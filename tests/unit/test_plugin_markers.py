"""The GPU markers (gpu, a100_40g, multi_gpu(n)), driven through pytester with the GPUs faked: registered
(usable under --strict-markers), skipping with what was needed and what was found, running where the
hardware is there, and a usage error for an invalid multi_gpu(n)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("preloaded")

MARKED = """
import pytest

@pytest.mark.gpu
def test_gpu():
    pass

@pytest.mark.a100_40g
def test_a100():
    pass

@pytest.mark.multi_gpu
def test_multi():
    pass

@pytest.mark.multi_gpu(4)
def test_multi4():
    pass

@pytest.mark.multi_gpu(n=2)
def test_multi_kw():
    pass

@pytest.mark.gpu
class TestOnGpu:
    def test_in_class(self):
        pass

def test_plain():
    pass
"""

RUN = ("passed", None)
NO_40G = "needs a GPU with at least 40 GB (a100_40g), "

SCENARIOS = {
    # no GPU at all
    "none": ((), {
        "test_gpu": ("skipped", "needs a CUDA GPU, found none"),
        "test_a100": ("skipped", NO_40G + "found none"),
        "test_multi": ("skipped", "needs 2 GPUs, found 0"),
        "test_multi4": ("skipped", "needs 4 GPUs, found 0"),
        "test_multi_kw": ("skipped", "needs 2 GPUs, found 0"),
        "TestOnGpu::test_in_class": ("skipped", "needs a CUDA GPU, found none"),
        "test_plain": RUN,
    }),
    # one 16 GB T4-like GPU
    "t4": (("t4",), {
        "test_gpu": RUN,
        "test_a100": ("skipped", NO_40G + "found 1: Tesla T4 15.8 GB"),
        "test_multi": ("skipped", "needs 2 GPUs, found 1"),
        "test_multi4": ("skipped", "needs 4 GPUs, found 1"),
        "test_multi_kw": ("skipped", "needs 2 GPUs, found 1"),
        "TestOnGpu::test_in_class": RUN,
        "test_plain": RUN,
    }),
    # one 80 GB GPU
    "h100": (("h100",), {
        "test_gpu": RUN,
        "test_a100": RUN,
        "test_multi": ("skipped", "needs 2 GPUs, found 1"),
        "test_multi4": ("skipped", "needs 4 GPUs, found 1"),
        "test_multi_kw": ("skipped", "needs 2 GPUs, found 1"),
        "TestOnGpu::test_in_class": RUN,
        "test_plain": RUN,
    }),
    # two 40 GB GPUs
    "2xa100-40g": (("a100-40g", "a100-40g"), {
        "test_gpu": RUN,
        "test_a100": RUN,
        "test_multi": RUN,
        "test_multi4": ("skipped", "needs 4 GPUs, found 2"),
        "test_multi_kw": RUN,
        "TestOnGpu::test_in_class": RUN,
        "test_plain": RUN,
    }),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_markers_skip_or_run(pytester, fake_gpus, outcomes, scenario):
    gpus, expected = SCENARIOS[scenario]
    fake_gpus(*gpus)
    pytester.makepyfile(test_marked=MARKED)
    reprec = pytester.inline_run("--strict-markers", "-p", "no:cacheprovider")
    assert outcomes(reprec) == expected
    assert reprec.ret == 0


def test_skip_reasons_in_the_short_summary(pytester, fake_gpus):
    fake_gpus()
    pytester.makepyfile(test_marked=MARKED)
    result = pytester.runpytest("--strict-markers", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=6)
    result.stdout.fnmatch_lines([
        "SKIPPED [[]1[]] test_marked.py:*: needs a CUDA GPU, found none",
        "SKIPPED [[]1[]] test_marked.py:*: needs a GPU with at least 40 GB (a100_40g), found none",
        "SKIPPED [[]1[]] test_marked.py:*: needs 2 GPUs, found 0",
        "SKIPPED [[]1[]] test_marked.py:*: needs 4 GPUs, found 0",
    ], consecutive=False)


def test_markers_are_registered(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines([
        "@pytest.mark.gpu: needs a CUDA GPU*",
        "@pytest.mark.a100_40g: needs a CUDA GPU with at least 40 GB*",
        "@pytest.mark.multi_gpu(n=2): needs at least n CUDA GPUs*",
    ], consecutive=False)


@pytest.mark.parametrize("marker", ["gpu", "a100_40g", "multi_gpu(2)"])
def test_strict_markers_accepts_the_markers_because_the_plugin_registers_them(pytester, fake_gpus, marker):
    """Under --strict-markers each marker is accepted with the plugin and an error without it: the
    registration is the plugin's (not something the test files or pytest provide)."""
    fake_gpus("h100", "h100")
    pytester.makepyfile(f"import pytest\n\n@pytest.mark.{marker}\ndef test_x():\n    pass\n")
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    name = marker.split("(")[0]
    # a subprocess: in-process, pytest.mark remembers markers registered by earlier runs
    without = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider", "-p", "no:neoxmii")
    assert without.ret != 0
    without.stdout.fnmatch_lines([f"*'{name}' not found in `markers` configuration option*"])


@pytest.mark.parametrize("marker, shown", [
    ("multi_gpu(1)", "1"),
    ("multi_gpu('x')", "'x'"),
    ("multi_gpu(n=0)", "0"),
    ("multi_gpu(2.0)", "2.0"),
    ("multi_gpu(True)", "True"),
    # The bad n is reported even when another marker already decides the skip (no GPU here).
    ("gpu\n@pytest.mark.multi_gpu(1)", "1"),
])
def test_invalid_multi_gpu_is_a_usage_error(pytester, fake_gpus, assert_usage_error, marker, shown):
    fake_gpus()
    pytester.makepyfile(test_bad=f"import pytest\n\n@pytest.mark.{marker}\ndef test_bad():\n    pass\n")
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    assert_usage_error(result, f"test_bad.py::test_bad: multi_gpu(n) needs an integer n >= 2, got {shown}")


def test_invalid_multi_gpu_with_gpus_present(pytester, fake_gpus, assert_usage_error):
    fake_gpus("a100-40g", "a100-40g")
    pytester.makepyfile(test_bad="import pytest\n\n@pytest.mark.multi_gpu(1)\ndef test_bad():\n    pass\n")
    assert_usage_error(pytester.runpytest("-p", "no:cacheprovider"),
                       "test_bad.py::test_bad: multi_gpu(n) needs an integer n >= 2, got 1")


def test_real_detection_on_a_machine_without_cuda(pytester, outcomes):
    """No faking: what hardware.detect() finds here decides (on a CUDA machine the gpu test runs)."""
    torch = pytest.importorskip("torch")
    from pytest_neoxmii import hardware

    pytester.makepyfile(test_marked=MARKED)
    got = outcomes(pytester.inline_run("--strict-markers", "-p", "no:cacheprovider"))
    if torch.cuda.is_available():
        assert hardware.detect().count == torch.cuda.device_count()
        assert got["test_gpu"] == RUN
    else:
        assert hardware.detect().gpus == ()
        assert got["test_gpu"] == ("skipped", "needs a CUDA GPU, found none")



ALONE = """
import pytest

@pytest.mark.neox_alone
def test_timed():
    pass

def test_parity():
    pass

@pytest.mark.neox_alone
class TestMemory:
    def test_teardown(self):
        pass

def test_reference():
    pass

@pytest.mark.neox_last
def test_closes_a_deployment():
    pass

@pytest.mark.neox_alone
def test_timed_again():
    pass
"""


def test_tests_that_need_the_machine_alone_run_after_the_others(pytester, fake_gpus):
    """neox_alone (registered: --strict-markers accepts it) moves a test behind every unmarked one, in
    collection order otherwise, so that the test process judges what is ready while workers still work;
    neox_last (a teardown test closing a shared deployment) goes behind those too."""
    fake_gpus()
    pytester.makepyfile(test_alone=ALONE)
    result = pytester.runpytest("--strict-markers", "-v")
    result.assert_outcomes(passed=6)
    assert [ln.split("::", 1)[1].split()[0] for ln in result.outlines if " PASSED" in ln] == \
        ["test_parity", "test_reference", "test_timed", "TestMemory::test_teardown", "test_timed_again",
         "test_closes_a_deployment"]


def test_working_ahead_the_tests_of_engines_ready_first_run_first():
    from types import SimpleNamespace
    from pytest_neoxmii.plugin import run_order

    def item(name, engine=None, marker=None, param="neox_backend_name"):
        params = {param: engine} if engine else {}
        return SimpleNamespace(name=name, callspec=SimpleNamespace(params=params),
                               get_closest_marker=lambda m: m if m == marker else None)

    items = [item("latency-ds", "ds", "neox_alone"), item("kernels-ds", "ds", param="name"), item("parity-zero", "zero"),
             item("golden-hf", "hf"), item("parity-ds", "ds"), item("looks-back"), item("teardown", "ds", "neox_last"),
             item("parity-mii", "mii")]
    names = [i.name for i in run_order(items, {"zero": 1, "ds": 2, "mii": 3})]
    assert names == ["golden-hf", "parity-zero", "kernels-ds", "parity-ds", "looks-back", "parity-mii",
                     "latency-ds", "teardown"]
    # nothing works ahead: only the timed and closing tests move
    assert [i.name for i in run_order(items, {})] == ["kernels-ds", "parity-zero", "golden-hf", "parity-ds",
                                                      "looks-back", "parity-mii", "latency-ds", "teardown"]


def test_where_engines_take_turns_each_engines_tests_run_in_one_block():
    """On a GPU that holds one engine at a time, each engine's timed and closing tests run in its own block, so
    that it deploys once: run after every other test, each timing deployed its engine again (one H200 with
    5.0 GiB free, pythia-160m: 8 deployments). The reference's timed tests come after every block, its tests
    alone (neox_engines()) in its own block, before any engine deploys and has the HF models released; a test
    whose neox_engines marker names one engine runs in that engine's block, and a test of no engine stays
    after the engine tests collected before it."""
    from types import SimpleNamespace
    from pytest_neoxmii.plugin import run_order

    def item(name, engine=None, marker=None, marks_engine=None):
        markers = {marker: SimpleNamespace(args=(), kwargs={})} if marker else {}
        if marks_engine:
            markers["neox_engines"] = SimpleNamespace(args=() if marks_engine == "reference alone" else (marks_engine,),
                                                      kwargs={})
        return SimpleNamespace(name=name, nodeid=f"test_x.py::{name}",
                               callspec=SimpleNamespace(params={"neox_backend_name": engine} if engine else {}),
                               get_closest_marker=markers.get)

    items = [item("latency-ds", "ds", "neox_alone"), item("latency-hf", "hf", "neox_alone"), item("kernels-ds", "ds"),
             item("parity-zero", "zero"), item("golden-hf", "hf"), item("parity-ds", "ds"), item("looks-back"),
             item("teardown-ds", "ds", "neox_last"), item("teardown-zero", "zero", "neox_last"),
             item("weights-off", marks_engine="zero"), item("parity-mii", "mii"), item("latency-zero", "zero", "neox_alone"),
             item("determinism", marks_engine="reference alone")]
    ready = {"zero": 1, "ds": 2, "mii": 3}
    assert [i.name for i in run_order(items, ready, by_engine=True)] == [
        "golden-hf", "determinism", "parity-zero", "weights-off", "latency-zero", "teardown-zero", "kernels-ds",
        "parity-ds", "looks-back", "latency-ds", "teardown-ds", "parity-mii", "latency-hf"]
    # a marker that names no engine by a string orders nothing (the session's usage error names it)
    odd = [item("odd", marks_engine=["ds"]), item("parity-ds", "ds")]
    assert [i.name for i in run_order(odd, ready, by_engine=True)] == ["odd", "parity-ds"]
    # engines deployed side by side: every timed test after the others, every closing test last
    assert [i.name for i in run_order(items, ready)] == [
        "golden-hf", "parity-zero", "weights-off", "kernels-ds", "parity-ds", "looks-back", "parity-mii",
        "determinism", "latency-ds", "latency-hf", "latency-zero", "teardown-ds", "teardown-zero"]
