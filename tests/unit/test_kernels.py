"""Where DeepSpeed's JIT ops are kept (TORCH_EXTENSIONS_DIR: the user's, else the plugin's per-stack default)
and whether this run finds them built, before anything deploys."""
from __future__ import annotations

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
