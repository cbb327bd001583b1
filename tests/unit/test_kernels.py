"""Where DeepSpeed's JIT ops are kept (TORCH_EXTENSIONS_DIR: the user's, else the plugin's per-stack default)
and whether this run finds them built, before anything deploys."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import sys

import pytest

from pytest_neoxmii import kernels

pytestmark = pytest.mark.usefixtures("preloaded")


def _lib(directory, folder, name):
    (directory / folder).mkdir(parents=True, exist_ok=True)
    path = directory / folder / name
    path.write_bytes(b"\x7fELF")
    return path


def test_the_default_is_set_for_every_child_and_names_the_stack(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env = {}
    cache = kernels.prepare("cuda:0", env)
    torch_v, ds_v = importlib.metadata.version("torch"), importlib.metadata.version("deepspeed")
    expected = tmp_path / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch_v}-deepspeed{ds_v}"
    assert cache.directory == expected and env["TORCH_EXTENSIONS_DIR"] == str(expected)
    assert not cache.from_env and cache.found == {"transformer_inference": None}
    assert cache.describe() == (f"kernels: DeepSpeed JIT ops in {expected} (TORCH_EXTENSIONS_DIR, default of the "
                                "plugin): transformer_inference not built yet: built on first use")


def test_a_users_directory_is_honoured_and_built_ops_are_found(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    so = _lib(tmp_path, "transformer_inference", "transformer_inference.so")
    cache = kernels.prepare("cuda:1", env)
    assert env == {"TORCH_EXTENSIONS_DIR": str(tmp_path)} and cache.from_env
    assert cache.found == {"transformer_inference": so}
    assert cache.as_json() == {"directory": str(tmp_path), "from_env": True, "device": "cuda",
                               "cached": {"transformer_inference": True}}
    # a build folder without the library (an interrupted build) is not a cache hit; torch's versioned
    # rebuild after a source change is
    (tmp_path / "fused_op").mkdir()
    (tmp_path / "fused_op" / "build.ninja").write_text("")
    assert kernels.built_library(tmp_path, "fused_op") is None
    so_v1 = _lib(tmp_path, "fused_op_v1", "fused_op_v1.so")
    assert kernels.built_library(tmp_path, "fused_op") == so_v1


def test_the_cpu_needs_no_op_and_says_so(tmp_path):
    cache = kernels.prepare("cpu", {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert cache.found == {}
    assert cache.describe().endswith("(TORCH_EXTENSIONS_DIR): none needed on the cpu")


def test_the_default_lasts_one_session(pytester, synthetic_14m, fake_gpus, monkeypatch):
    """An in-process run (pytester) sets the default for its session only: the next session decides again."""
    import os
    fake_gpus()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    pytester.makepyfile("import os\n\ndef test_env():\n"
                        "    assert '-deepspeed' in os.environ['TORCH_EXTENSIONS_DIR']\n")
    result = pytester.runpytest(*synthetic_14m, "--neox-dtype=fp32")
    assert result.ret == 0, result.outlines
    assert "TORCH_EXTENSIONS_DIR" not in os.environ


# -- the background build of a cold session -------------------------------------------------------------

class SleepingBuild(kernels.BackgroundBuild):
    """A 'build' that runs until it is stopped, as a compiler cut short by the session's end would."""
    command = [sys.executable, "-c", "import time, sys; print('building', sys.argv[1:], flush=True); "
                                     "time.sleep(120)"]


class QuickBuild(kernels.BackgroundBuild):
    command = [sys.executable, "-c", "import sys; print('built', sys.argv[1:])"]


def test_a_build_cut_short_by_the_sessions_end_is_stopped_and_leaves_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOXMII_RUN_DIR", str(tmp_path / "runs"))
    build = SleepingBuild(["transformer_inference"])
    lock = _lib(tmp_path, "transformer_inference", "lock")       # torch's baton, held by the build
    assert build.running
    build.close(tmp_path)
    assert build.tree.popen.poll() is not None, "the build outlived the session"
    assert not lock.exists(), "a lock left behind makes every later build wait for it forever"
    assert build.describe() == ("kernels: transformer_inference built in the background from the end of "
                                "collection: stopped when the session ended")


def test_a_finished_build_is_said_with_its_time_and_leaves_other_builds_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOXMII_RUN_DIR", str(tmp_path / "runs"))
    build = QuickBuild(["transformer_inference"])
    build.wait()
    lock = _lib(tmp_path, "transformer_inference", "lock")       # another session's build, going on
    build.close(tmp_path)
    assert lock.exists()
    assert not build.log_path.parent.exists(), "the log of a build that succeeded is kept"
    assert build.describe().startswith("kernels: transformer_inference built in the background from the end "
                                       "of collection: done in ")


def _session_for_build(monkeypatch, fake_gpus, gpus, found, backends=("hf", "ds")):
    from pathlib import Path
    from types import SimpleNamespace
    from pytest_neoxmii.options import NeoxOptions
    from pytest_neoxmii.registry import lookup
    from pytest_neoxmii.session import NeoxSession
    fake_gpus(*gpus)
    options = NeoxOptions(model="pythia-160m", revision="main", weights="synthetic", dtype="fp16", tp=1,
                          backends=backends, baseline_dir=Path("baselines"), update_baselines=False,
                          max_new_tokens=2, seed=0, top_k=2, parity_multiple=10.0, cases="default",
                          cache_dir=None, zero_nvme=None, latency_threshold=0.1, report_dir=None)
    session = NeoxSession(options, SimpleNamespace(spec=lookup("pythia-160m"), path=None))
    device = "cuda" if gpus else "cpu"
    session.kernels = kernels.KernelCache(Path("unused"), False, device, found)
    started = []
    monkeypatch.setattr(kernels, "BackgroundBuild", lambda ops: started.append(ops) or SimpleNamespace(ops=ops))
    return session, started


@pytest.mark.parametrize("gpus, found, backends, uses_neox, builds", [
    (("h100",), {"transformer_inference": None}, ("hf", "ds"), True, True),
    (("h100",), {"transformer_inference": "/cache/x.so"}, ("hf", "ds"), True, False),    # built already
    (("h100",), {"transformer_inference": None}, ("hf", "zero"), True, False),   # nothing injects kernels
    (("h100",), {"transformer_inference": None}, ("hf", "ds"), False, False),    # no selected test deploys
    ((), {}, ("hf", "ds"), True, False),                                         # the CPU builds no op
], ids=["cold", "cached", "no-injecting-engine", "no-test-uses-the-session", "cpu"])
def test_a_cold_gpu_session_starts_the_kernel_build_at_collection(monkeypatch, fake_gpus, gpus, found, backends,
                                                                   uses_neox, builds):
    from types import SimpleNamespace
    session, started = _session_for_build(monkeypatch, fake_gpus, gpus, found, backends)
    item = SimpleNamespace(fixturenames=["neox", "request"] if uses_neox else ["tmp_path"])
    session.start_kernel_build([item])
    session.start_kernel_build([item])                 # (once per session)
    assert started == ([["transformer_inference"]] if builds else [])


@pytest.mark.parametrize("found, expected", [
    ({"transformer_inference": None}, {"zero": 1, "ds": 2, "mii": 3}),           # cold: the compiler comes first
    ({"transformer_inference": "/cache/x.so"}, {"ds": 1, "mii": 2, "zero": 3}),  # warm: streaming is slowest
], ids=["cold", "warm"])
def test_working_ahead_the_engines_expected_ready_first_come_first(monkeypatch, fake_gpus, found, expected):
    session, _ = _session_for_build(monkeypatch, fake_gpus, ("h100",), found, ("hf", "ds", "mii", "zero"))
    assert session.expected_ready_order() == expected
    session.options = dataclasses.replace(session.options, work_ahead="never")
    assert session.expected_ready_order() == {}                  # nothing works ahead: the order stays
    assert session.expected_ready_order(by_engine=True) == expected   # unless the engines take turns
