"""The one baseline policy of the checks (checks/baseline_policy.py), on a real store in a temporary
directory: record under --neox-update-baselines, compare otherwise, skip with the command that records, and
one-line failures for unusable files and failed writes, which leave the old file whole and no debris."""
from __future__ import annotations

import errno
import json
import os
import sys
import types
from pathlib import Path

import pytest

from pytest_neoxmii.checks.baseline_policy import UPDATE_FLAG, BaselinePolicy, key_for, update_command
from pytest_neoxmii.hardware import Gpu, Hardware
from pytest_neoxmii.registry import lookup
from pytest_neoxmii.storage import BaselineKey, BaselineStore
from pytest_neoxmii.storage import store as store_mod

KEY = BaselineKey(model="pythia-14m", weights="synthetic-seed0-v3", dtype="fp32", backend="ds", tp=1)
FILE = "baselines/pythia-14m/synthetic-seed0-v3/ds-fp32-tp1.json"
SAMPLES = [0.010, 0.011, 0.012, 0.0105, 0.0115]


@pytest.fixture
def store(tmp_path, monkeypatch) -> BaselineStore:
    monkeypatch.chdir(tmp_path)           # messages show the file relative to the working directory
    return BaselineStore(Path("baselines"))


def policy(store, recording: bool, request=None) -> BaselinePolicy:
    return BaselinePolicy(store, KEY, "cpu", recording=recording, request=request)


def request_for(*args: str):
    """A stand-in for pytest's request: the invocation the record command repeats."""
    config = types.SimpleNamespace(invocation_params=types.SimpleNamespace(args=args))
    return types.SimpleNamespace(config=config)


def read_latency(store: BaselineStore):
    return store.latency(KEY, "cpu", "gen")


def write_latency(store: BaselineStore) -> Path:
    return store.put_latency(KEY, "cpu", "gen", {"samples": SAMPLES})


# --- record ---------------------------------------------------------------------------------------------------

def test_recording_reads_nothing_and_writes_through_the_store(store):
    path = Path(FILE)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")          # never read while recording: the write below reports it instead
    recording = policy(store, recording=True)
    assert recording.expected(read_latency, "latency baseline") is None
    with pytest.raises(pytest.fail.Exception) as failed:
        recording.record(write_latency)
    assert str(failed.value) == (f"cannot write baseline: {FILE}: not valid JSON: Expecting property name enclosed "
                                 "in double quotes at line 1 column 2")
    assert path.read_text() == "{not json"
    path.unlink()
    assert recording.record(write_latency) == path
    assert store.latency(KEY, "cpu", "gen")["samples"] == SAMPLES


def test_record_only_while_recording(store):
    with pytest.raises(RuntimeError, match="only under --neox-update-baselines"):
        policy(store, recording=False).record(write_latency)
    assert not Path(FILE).exists()


def test_a_refused_write_fails_in_one_line_and_writes_nothing(store):
    with pytest.raises(pytest.fail.Exception) as failed:
        policy(store, recording=True).record(lambda s: s.put_latency(KEY, "cpu", "gen", {"samples": [-1.0]}))
    assert str(failed.value) == (f'cannot write baseline: {FILE}: refusing to write: $.gpu_classes.cpu.latency.gen.'
                                 'samples[0]: expected a finite number >= 0, got number -1.0')
    assert not failed.value.pytrace and not Path(FILE).exists()


@pytest.mark.parametrize("broken_call", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_whole_and_no_debris(store, monkeypatch, broken_call):
    """The disk fills up while the new file is written (fsync) or swapped in (replace)."""
    recording = policy(store, recording=True)
    path = recording.record(write_latency)
    before = path.read_bytes()
    real = getattr(os, broken_call)
    calls = []

    def full_disk(*args):
        calls.append(args)
        if len(calls) == 1:               # the new file's own call; the directory's fsync after it is fine
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(store_mod.os, broken_call, full_disk)
    with pytest.raises(pytest.fail.Exception) as failed:
        recording.record(lambda s: s.put_latency(KEY, "cpu", "gen2", {"samples": [1.0, 2.0, 3.0]}))
    assert calls, f"os.{broken_call} was never called: the test does not test the write"
    assert str(failed.value) == f"cannot write baseline: {FILE}: cannot write: No space left on device"
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]
    assert json.loads(before)["gpu_classes"]["cpu"]["latency"].keys() == {"gen"}


# --- compare --------------------------------------------------------------------------------------------------

def test_comparing_reads_the_stored_baseline(store):
    policy(store, recording=True).record(write_latency)
    assert policy(store, recording=False).expected(read_latency, "latency baseline")["samples"] == SAMPLES


def test_an_unusable_file_fails_in_one_line_naming_it(store):
    path = Path(FILE)
    path.parent.mkdir(parents=True)
    path.write_text('{"schema": "pytest-neoxmii/baseline", "schema": 2}')
    comparing = policy(store, recording=False)
    for call in (lambda: comparing.expected(read_latency, "latency baseline"), lambda: comparing.read(read_latency)):
        with pytest.raises(pytest.fail.Exception) as failed:
            call()
        assert str(failed.value) == (f'unusable baseline: {FILE}: not valid JSON: key "schema" appears twice in one '
                                     "object")
        assert not failed.value.pytrace and failed.value.__cause__ is None and failed.value.__context__ is None


# --- skip -----------------------------------------------------------------------------------------------------

def test_nothing_to_compare_with_skips_with_the_command_that_records_it(store):
    comparing = policy(store, recording=False, request=request_for("tests/acceptance", "--neox-model=pythia-14m"))
    command = f"{os.path.basename(sys.executable)} -m pytest tests/acceptance --neox-model=pythia-14m {UPDATE_FLAG}"
    assert comparing.record_command == command
    with pytest.raises(pytest.skip.Exception) as skipped:
        comparing.expected(read_latency, "latency baseline gen")
    assert str(skipped.value) == f"no latency baseline gen in {FILE}; create it with: {command}"
    with pytest.raises(pytest.skip.Exception) as skipped:
        comparing.expected(read_latency, "golden outputs (greedy ids)", plural=True)
    assert str(skipped.value) == f"no golden outputs (greedy ids) in {FILE}; create them with: {command}"
    with pytest.raises(pytest.skip.Exception) as skipped:
        comparing.skip_missing("golden output for case c", f"{FILE}, GPU class cpu")
    assert str(skipped.value) == f"no golden output for case c in {FILE}, GPU class cpu; create it with: {command}"


def test_without_a_request_the_command_is_the_flag(store):
    assert policy(store, recording=False).missing("x") == f"no x in {FILE}; create it with: {UPDATE_FLAG}"
    with pytest.raises(pytest.skip.Exception) as skipped:
        policy(store, recording=False).skip_stale("recorded with 4 new tokens, this run generates 5")
    assert str(skipped.value) == f"recorded with 4 new tokens, this run generates 5; re-record it with {UPDATE_FLAG}"


def test_the_command_repeats_the_invocation_once_with_the_flag_quoted_as_a_shell_needs():
    config = request_for("-k", "bs1 and ds", UPDATE_FLAG, "tests").config
    assert update_command(config) == (f"{os.path.basename(sys.executable)} -m pytest -k 'bs1 and ds' tests "
                                      f"{UPDATE_FLAG}")


# --- where a session files its baselines ------------------------------------------------------------------------

def _session(tmp_path, update=False, configs=None, gpus=()):
    return types.SimpleNamespace(
        options=types.SimpleNamespace(baseline_dir=tmp_path / "b", update_baselines=update),
        model=types.SimpleNamespace(spec=lookup("pythia-14m"), weights_key="synthetic-seed0-v3"),
        hardware=Hardware(gpus=gpus), serving_configs=configs or {})


def test_a_session_files_by_model_weights_dtype_backend_tp_and_gpu_class(tmp_path):
    info = types.SimpleNamespace(dtype="bf16", tensor_parallel=2)
    h100 = Gpu(index=0, name="NVIDIA H100 80GB HBM3", total_memory=85_045_870_592, capability=(9, 0))
    got = BaselinePolicy.of(_session(tmp_path, update=True, gpus=(h100,)), "mii", info)
    assert got.key == BaselineKey(model="pythia-14m", weights="synthetic-seed0-v3", dtype="bf16", backend="mii", tp=2)
    assert got.store.root == tmp_path / "b" and got.recording is True
    assert got.gpu_class == Hardware(gpus=(h100,)).gpu_class != Hardware(gpus=()).gpu_class
    assert BaselinePolicy.of(_session(tmp_path), "mii", info).recording is False


def test_a_users_serving_config_gets_its_own_baselines(tmp_path):
    configs = {"ds": types.SimpleNamespace(digest="0123456789")}
    session = _session(tmp_path, configs=configs)
    assert key_for(session, "ds", "fp32").backend == "ds-config-0123456789"
    assert key_for(session, "mii", "fp32").backend == "mii"


def test_a_key_without_a_tensor_parallel_degree_is_tp1(tmp_path):
    """A caller that does not say (a single-GPU engine) files under tp1, never beside a tp2 deployment."""
    assert key_for(_session(tmp_path), "ds", "fp16").tp == 1
