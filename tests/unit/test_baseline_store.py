"""Tests for pytest_neoxmii.storage: the JSON baseline store and its write guarantees."""
from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from pytest_neoxmii.errors import BaselineError
from pytest_neoxmii.storage import SCHEMA_NAME, BaselineKey, BaselineStore, sanitize_component
from pytest_neoxmii.storage import store as store_mod

KEY = BaselineKey(model="EleutherAI/pythia-70m", weights="hub@a1b2c3", dtype="float16", backend="deepspeed", tp=1)
H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-40GB"

GOLDEN = {
    "versions": {"torch": "2.3.0", "transformers": "4.41.0", "deepspeed": None},
    "recorded_at": "2024-05-01T12:00:00+00:00",
    "perplexity": 23.5,
    "cases": {
        "greedy/bs2": {
            "tokens": [[11, 12], [21, 22]],
            "top_logprobs": [
                [[[11, -0.1], [5, -2.5]], [[12, -0.2], [7, -3.0]]],
                [[[21, -0.3], [9, -1.9]], [[22, -0.4], [3, -4.1]]],
            ],
        }
    },
}


def lat(samples=(0.010, 0.011, 0.012, 0.0105, 0.0115), **extra) -> dict:
    return {"samples": list(samples), "versions": {"torch": "2.3.0"}, "machine": {"host": "n1"}, **extra}


@pytest.fixture
def store(tmp_path: Path) -> BaselineStore:
    return BaselineStore(tmp_path / "baselines")


def leftovers(directory: Path) -> list[str]:
    """Temp files the writer might have left next to the baseline."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def write_raw(store: BaselineStore, text: str) -> Path:
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def valid_doc() -> dict:
    return {
        "schema": SCHEMA_NAME,
        "schema_version": 1,
        "key": KEY.as_json(),
        "gpu_classes": {H100: {"latency": {"gen": lat()}, "golden": json.loads(json.dumps(GOLDEN))}},
    }


# ---------------------------------------------------------------- paths

def test_path_layout_and_sanitizing(tmp_path: Path):
    store = BaselineStore(tmp_path)
    assert store.path_for(KEY) == tmp_path / "EleutherAI_pythia-70m" / "hub_a1b2c3" / "deepspeed-float16-tp1.json"
    odd = BaselineKey(model="../../etc", weights="local@sha 1/2", dtype="bf16", backend="ds mii", tp=2)
    path = store.path_for(odd)
    assert path == tmp_path / ".._.._etc" / "local_sha_1_2" / "ds_mii-bf16-tp2.json"
    assert tmp_path in path.parents
    assert sanitize_component("..") == "__" and sanitize_component(".") == "_"
    assert sanitize_component("ok-Name_1.2") == "ok-Name_1.2"
    assert sanitize_component("a/b\\c:d é") == "a_b_c_d__"


def test_key_validation():
    with pytest.raises(ValueError):
        BaselineKey(model="", weights="w", dtype="d", backend="b", tp=1)
    with pytest.raises(ValueError):
        BaselineKey(model="m", weights="w", dtype="d", backend="b", tp=0)
    with pytest.raises(ValueError):
        BaselineKey(model="m", weights="w", dtype="d", backend="b", tp=True)


# ---------------------------------------------------------------- round trips and format

def test_missing_file_reads_as_none(store: BaselineStore):
    assert store.load(KEY) is None
    assert store.latency(KEY, H100, "gen") is None
    assert store.latency_other_classes(KEY, "gen") == []
    assert store.golden(KEY, H100) is None


def test_latency_round_trip(store: BaselineStore):
    samples = np.array([0.010, 0.011, 0.012, 0.0105, 0.0115], dtype=np.float64)  # numpy in, plain JSON out
    path = store.put_latency(KEY, H100, "gen/bs1", {"samples": samples, "extra": {"rounds": np.int64(5)}})
    assert path == store.path_for(KEY) and path.is_file()
    entry = store.latency(KEY, H100, "gen/bs1")
    assert entry["samples"] == pytest.approx(samples.tolist())
    assert entry["stats"]["n"] == 5 and entry["stats"]["median"] == pytest.approx(0.011)
    assert entry["extra"] == {"rounds": 5}
    assert entry["versions"] == {} and entry["machine"] == {}
    assert entry["recorded_at"].endswith("+00:00")
    assert store.latency(KEY, H100, "other") is None
    assert store.latency(KEY, A100, "gen/bs1") is None
    doc = store.load(KEY)
    assert doc["schema"] == SCHEMA_NAME and doc["schema_version"] == 1 and doc["key"] == KEY.as_json()

    # Replacing an entry keeps the caller's own stats/recorded_at when given.
    store.put_latency(KEY, H100, "gen/bs1", lat(stats={"n": 5}, recorded_at="2024-01-01T00:00:00Z"))
    entry = store.latency(KEY, H100, "gen/bs1")
    assert entry["stats"] == {"n": 5} and entry["recorded_at"] == "2024-01-01T00:00:00Z"


def test_golden_round_trip_and_fallback(store: BaselineStore):
    golden = json.loads(json.dumps(GOLDEN))
    golden["cases"]["greedy/bs2"]["top_logprobs"][0][0][0] = (11, -0.1)  # tuples, as outputs.Generation has them
    store.put_golden(KEY, A100, golden)
    cls, got = store.golden(KEY, A100)
    assert cls == A100 and got == GOLDEN
    # No golden for the H100: the A100's is returned, and says so.
    store.put_latency(KEY, H100, "gen", lat())
    cls, got = store.golden(KEY, H100)
    assert cls == A100 and got == GOLDEN
    # Once the H100 has its own, that one wins.
    own = dict(GOLDEN, perplexity=24.0)
    store.put_golden(KEY, H100, own)
    assert store.golden(KEY, H100) == (H100, own)
    assert store.golden(KEY, A100) == (A100, GOLDEN)
    # Defaults for optional fields.
    store.put_golden(KEY, "cpu", {"cases": {}})
    cls, got = store.golden(KEY, "cpu")
    assert got["perplexity"] is None and got["versions"] == {} and got["recorded_at"]


def test_latency_other_classes(store: BaselineStore):
    store.put_latency(KEY, A100, "gen", lat())
    store.put_latency(KEY, "cpu", "gen", lat())
    store.put_latency(KEY, H100, "other", lat())
    assert store.latency_other_classes(KEY, "gen", H100) == [A100, "cpu"]  # sorted
    assert store.latency_other_classes(KEY, "gen", A100) == ["cpu"]
    assert store.latency_other_classes(KEY, "gen") == [A100, "cpu"]
    assert store.latency_other_classes(KEY, "missing", H100) == []
    store.put_golden(KEY, "golden-only", GOLDEN)          # a class with golden outputs and no latency at all
    assert store.latency_other_classes(KEY, "gen", H100) == [A100, "cpu"]


def test_file_is_sorted_indented_with_trailing_newline(store: BaselineStore):
    path = store.put_latency(KEY, H100, "gen", lat())
    store.put_golden(KEY, H100, GOLDEN)
    text = path.read_text()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True) + "\n"
    assert text.splitlines()[1].startswith('  "gpu_classes"')  # indent=2, keys sorted


def test_update_of_one_gpu_class_leaves_others_untouched(store: BaselineStore):
    path = store.put_latency(KEY, A100, "gen", lat())
    store.put_golden(KEY, A100, GOLDEN)
    before = json.loads(path.read_text())["gpu_classes"][A100]
    store.put_latency(KEY, H100, "gen", lat(samples=[1.0, 2.0, 3.0, 4.0, 5.0]))
    store.put_golden(KEY, H100, dict(GOLDEN, perplexity=99.0))
    store.put_latency(KEY, H100, "gen", lat(samples=[2.0, 3.0, 4.0, 5.0, 6.0]))
    doc = json.loads(path.read_text())
    assert doc["gpu_classes"][A100] == before
    assert doc["gpu_classes"][H100]["latency"]["gen"]["samples"] == [2.0, 3.0, 4.0, 5.0, 6.0]
    # Another bench in the same class is kept, too.
    store.put_latency(KEY, H100, "gen2", lat())
    assert set(store.load(KEY)["gpu_classes"][H100]["latency"]) == {"gen", "gen2"}


def test_permissions_follow_umask(store: BaselineStore):
    path = store.put_latency(KEY, H100, "gen", lat())
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------- concurrency

def _writer(root: str, worker: int, rounds: int) -> None:
    store = BaselineStore(Path(root))
    for i in range(rounds):
        store.put_latency(KEY, H100 if worker % 2 else A100, f"bench-{worker}",
                          {"samples": [0.01 + 1e-4 * i] * 5, "extra": {"round": i}})


def test_concurrent_writers_lose_nothing(tmp_path: Path):
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    workers, rounds = 6, 25
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, rounds)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    store = BaselineStore(tmp_path)
    path = store.path_for(KEY)
    json.loads(path.read_text())  # valid JSON
    for w in range(workers):
        entry = store.latency(KEY, H100 if w % 2 else A100, f"bench-{w}")
        assert entry is not None, w
        assert entry["extra"] == {"round": rounds - 1}  # each worker's last write is the one kept
    assert leftovers(path.parent) == []


# ---------------------------------------------------------------- crashes during a write

def test_crash_in_replace_keeps_old_file_and_no_temp(store: BaselineStore, monkeypatch):
    path = store.put_latency(KEY, H100, "gen", lat())
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(BaselineError, match="No space left on device") as exc:
        store.put_latency(KEY, H100, "gen2", lat())
    assert str(exc.value).endswith(f"{path.name}: cannot write: No space left on device")    # the OS's words
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftovers(path.parent) == []


def test_crash_mid_dump_keeps_old_file_and_no_temp(store: BaselineStore, monkeypatch):
    path = store.put_latency(KEY, H100, "gen", lat())
    before = path.read_bytes()
    real_dump = json.dump

    def dies_halfway(obj, fp, **kw):
        fp.write('{"schema": "pytest-neoxmii/basel')  # a partial document reaches the temp file...
        fp.flush()
        raise KeyboardInterrupt  # ...then the process is interrupted

    monkeypatch.setattr(store_mod.json, "dump", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        store.put_latency(KEY, H100, "gen2", lat())
    monkeypatch.setattr(store_mod.json, "dump", real_dump)
    assert path.read_bytes() == before
    assert leftovers(path.parent) == []
    # And the store still works afterwards (the lock was released).
    store.put_latency(KEY, H100, "gen2", lat())
    assert store.latency(KEY, H100, "gen2") is not None


def test_crash_on_first_write_leaves_nothing(store: BaselineStore, monkeypatch):
    monkeypatch.setattr(store_mod.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(BaselineError):
        store.put_latency(KEY, H100, "gen", lat())
    path = store.path_for(KEY)
    assert not path.exists() and leftovers(path.parent) == []


# ---------------------------------------------------------------- broken files

def _mutated(edit) -> str:
    doc = valid_doc()
    edit(doc)
    return json.dumps(doc, indent=2)


BROKEN = {
    "not-json": ('{"schema": "pytest-neoxmii/baseline",', "not valid JSON"),
    "empty": ("", "empty"),
    "merge-conflict": ("<<<<<<< HEAD\n{}\n=======\n{}\n>>>>>>> other\n", "merge conflict"),
    "duplicate-key": ('{"schema": 1, "schema": 2}', 'not valid JSON: key "schema" appears twice in one object'),
    "nan": (json.dumps(valid_doc()).replace("0.011", "NaN"), "NaN is not valid JSON"),
    "not-object": ("[1, 2, 3]", "$: expected an object, got array"),
    "wrong-schema-name": (_mutated(lambda d: d.update(schema="something-else")), "$.schema: expected"),
    "no-schema": (_mutated(lambda d: d.pop("schema")), 'missing "schema"'),
    "newer-version": (_mutated(lambda d: d.update(schema_version=2)), "upgrade pytest-neoxmii"),
    "version-string": (_mutated(lambda d: d.update(schema_version="1")), '$.schema_version: expected 1, got string'),
    "key-mismatch": (_mutated(lambda d: d["key"].update(model="EleutherAI_pythia-70m")), "$.key.model: key mismatch"),
    "tp-mismatch": (_mutated(lambda d: d["key"].update(tp=2)), "$.key.tp: key mismatch"),
    "tp-type": (_mutated(lambda d: d["key"].update(tp="1")), "$.key.tp: expected an integer >= 1, got string"),
    "gpu-classes-type": (_mutated(lambda d: d.update(gpu_classes=[])), "$.gpu_classes: expected an object"),
    "sample-type": (
        _mutated(lambda d: d["gpu_classes"][H100]["latency"]["gen"]["samples"].__setitem__(2, "fast")),
        f'$.gpu_classes["{H100}"].latency.gen.samples[2]: expected a finite number >= 0, got string "fast"',
    ),
    "samples-missing": (
        _mutated(lambda d: d["gpu_classes"][H100]["latency"]["gen"].pop("samples")),
        'latency.gen: missing required field "samples"',
    ),
    "recorded-at": (
        _mutated(lambda d: d["gpu_classes"][H100]["latency"]["gen"].update(recorded_at="yesterday")),
        "recorded_at: expected an ISO-8601 timestamp",
    ),
    "token-type": (
        _mutated(lambda d: d["gpu_classes"][H100]["golden"]["cases"]["greedy/bs2"]["tokens"][1].__setitem__(0, 2.5)),
        f'$.gpu_classes["{H100}"].golden.cases["greedy/bs2"].tokens[1][0]: expected an integer >= 0, got number 2.5',
    ),
    "logprob-pair": (
        _mutated(lambda d: d["gpu_classes"][H100]["golden"]["cases"]["greedy/bs2"]["top_logprobs"][0][1]
                 .__setitem__(0, [12])),
        "top_logprobs[0][1][0]: expected a [token id, logprob] pair, got array",
    ),
    "perplexity-type": (
        _mutated(lambda d: d["gpu_classes"][H100]["golden"].update(perplexity="low")),
        "golden.perplexity: expected a finite number >= 0",
    ),
    "versions-type": (
        _mutated(lambda d: d["gpu_classes"][H100]["golden"]["versions"].update(torch=2.3)),
        "golden.versions.torch: expected a version string or null",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_gives_one_line_error_naming_file(store: BaselineStore, case: str, monkeypatch, tmp_path):
    text, expected = BROKEN[case]
    path = write_raw(store, text)
    monkeypatch.chdir(tmp_path)  # messages show the path relative to the working directory
    with pytest.raises(BaselineError) as exc:
        store.load(KEY)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("baselines/EleutherAI_pythia-70m/hub_a1b2c3/deepspeed-float16-tp1.json: "), msg
    assert expected in msg, msg
    # Every reader surfaces the same error rather than pretending there is no baseline.
    for read in (lambda: store.latency(KEY, H100, "gen"), lambda: store.golden(KEY, H100),
                 lambda: store.latency_other_classes(KEY, "gen")):
        with pytest.raises(BaselineError):
            read()
    # And a write refuses to replace the file, saying why as a read does: the user must look at it.
    with pytest.raises(BaselineError) as exc:
        store.put_latency(KEY, H100, "gen", lat())
    assert str(exc.value) == msg
    with pytest.raises(BaselineError):
        store.put_golden(KEY, A100, GOLDEN)
    assert path.read_text() == text
    assert leftovers(path.parent) == []


SHOWN = "baselines/EleutherAI_pythia-70m/hub_a1b2c3/deepspeed-float16-tp1.json"


def _unreadable_by_permissions(path: Path) -> str:
    path.write_text(json.dumps(valid_doc()))
    path.chmod(0)
    return "Permission denied"


def _a_directory_in_its_place(path: Path) -> str:
    path.mkdir()
    return "Is a directory"


@pytest.mark.parametrize("make_unreadable", [
    pytest.param(_unreadable_by_permissions, id="no-read-permission",
                 marks=pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                                          reason="root (or a non-POSIX system) reads a file whatever its mode")),
    pytest.param(_a_directory_in_its_place, id="a-directory"),
])
def test_a_file_that_cannot_be_read_is_a_one_line_error_with_the_os_reason(store: BaselineStore, tmp_path: Path,
                                                                             monkeypatch, make_unreadable):
    """An existing baseline the OS refuses to read is not "no baseline": every reader and writer says so, with
    the OS's reason, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True)
    reason = make_unreadable(path)
    try:
        for call in (lambda: store.load(KEY), lambda: store.golden(KEY, H100),
                     lambda: store.put_latency(KEY, H100, "gen", lat())):
            with pytest.raises(BaselineError) as exc:
                call()
            assert str(exc.value) == f"{SHOWN}: cannot read: {reason}"
        assert leftovers(path.parent) == []
    finally:
        if path.is_file():
            path.chmod(0o644)


def test_a_file_that_is_not_utf8_says_where_the_bad_byte_is(store: BaselineStore, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True)
    raw = b'{"schema": "pytest-neoxmii/baseline", "note": "caf\xe9"}'       # Latin-1, as an editor may save it
    path.write_bytes(raw)
    with pytest.raises(BaselineError) as exc:
        store.load(KEY)
    assert str(exc.value) == f"{SHOWN}: not UTF-8 text (bad byte at offset {raw.index(0xE9)})"
    with pytest.raises(BaselineError, match="not UTF-8 text"):
        store.put_golden(KEY, H100, GOLDEN)
    assert path.read_bytes() == raw


def test_a_directory_that_cannot_be_created_is_a_one_line_error(store: BaselineStore, tmp_path: Path, monkeypatch):
    """A file where the model's directory should be: the write names the directory and the OS's reason."""
    monkeypatch.chdir(tmp_path)
    blocker = store.root / "EleutherAI_pythia-70m"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")
    for call in (lambda: store.put_latency(KEY, H100, "gen", lat()), lambda: store.put_golden(KEY, H100, GOLDEN)):
        with pytest.raises(BaselineError) as exc:
            call()
        assert str(exc.value) == (f"{SHOWN}: cannot create directory baselines/EleutherAI_pythia-70m/hub_a1b2c3: "
                                  "Not a directory")
    assert blocker.read_text() == "not a directory"


def test_valid_hand_written_file_loads(store: BaselineStore):
    write_raw(store, json.dumps(valid_doc()))
    assert store.latency(KEY, H100, "gen")["samples"] == lat()["samples"]
    assert store.golden(KEY, A100) == (H100, GOLDEN)


def test_invalid_entries_are_refused_before_writing(store: BaselineStore):
    path = store.put_latency(KEY, H100, "gen", lat())
    before = path.read_bytes()
    bad = [
        (lambda: store.put_latency(KEY, H100, "x", {"samples": []}), "samples: expected at least one"),
        (lambda: store.put_latency(KEY, H100, "x", {"samples": [0.1, float("inf")]}), "samples[1]"),
        (lambda: store.put_latency(KEY, H100, "x", {"samples": [0.1], "extra": {"obj": object()}}),
         "extra.obj: expected a JSON value"),
        (lambda: store.put_latency(KEY, H100, "x", {"samples": [-1.0]}), ">= 0"),
        (lambda: store.put_golden(KEY, H100, {"cases": {"c": {"tokens": [[1]], "top_logprobs": [[], []]}}}),
         "one entry per row"),
        (lambda: store.put_golden(KEY, H100, {"perplexity": 1.0}), 'missing required field "cases"'),
    ]
    for call, expected in bad:
        with pytest.raises(BaselineError, match="refusing to write") as exc:
            call()
        assert expected in str(exc.value) and "\n" not in str(exc.value)
    assert path.read_bytes() == before
    with pytest.raises(ValueError):
        store.put_latency(KEY, "", "x", lat())


def test_lock_timeout_gives_clear_error(store: BaselineStore):
    path = store.put_latency(KEY, H100, "gen", lat())
    impatient = BaselineStore(store.root, lock_timeout=0.2)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(path) + ".lock", held, release))
    holder.start()
    try:
        assert held.wait(10)
        with pytest.raises(BaselineError, match="timed out after 0.2 s waiting for"):
            impatient.put_latency(KEY, H100, "gen2", lat())
    finally:
        release.set()
        holder.join(10)
    impatient.put_latency(KEY, H100, "gen2", lat())


def _hold_lock(lock_path: str, held, release) -> None:
    from filelock import FileLock

    with FileLock(lock_path):
        held.set()
        release.wait(10)


# ---------------------------------------------------------------- caller data, defaults, names

def test_numpy_and_torch_values_are_stored_as_plain_json_types(store: BaselineStore):
    """What latency code hands the store (numpy/torch scalars and arrays, tuples) is written as JSON numbers,
    booleans and lists of the right type: a bool stays a bool, an integer an integer."""
    import torch

    extra = {"n": np.int64(3), "ok": np.bool_(True), "flag": False, "shape": (1, 2), "t": torch.tensor(0.5),
             "arr": torch.tensor([1, 2]), "grid": np.array([[1.5], [2.5]]), "none": None, "name": "x",
             "zero_d": np.array(7)}
    store.put_latency(KEY, H100, "gen", {"samples": np.array([0.01, 0.02]), "extra": extra,
                                         "stats": {"median": np.float32(0.25)}})
    got = store.latency(KEY, H100, "gen")
    assert got["samples"] == [0.01, 0.02] and all(type(s) is float for s in got["samples"])
    assert got["stats"] == {"median": 0.25}
    want = {"n": 3, "ok": True, "flag": False, "shape": [1, 2], "t": 0.5, "arr": [1, 2], "grid": [[1.5], [2.5]],
            "none": None, "name": "x", "zero_d": 7}
    assert got["extra"] == want
    assert {k: type(v) for k, v in got["extra"].items()} == {k: type(v) for k, v in want.items()}


def test_missing_optional_fields_get_their_defaults(store: BaselineStore):
    store.put_latency(KEY, H100, "gen", {"samples": [0.01, 0.03, 0.02]})
    got = store.latency(KEY, H100, "gen")
    assert got["stats"]["median"] == 0.02 and got["stats"]["n"] == 3
    assert (got["extra"], got["versions"], got["machine"]) == ({}, {}, {})
    assert got["recorded_at"].endswith("+00:00") and got["recorded_at"][:2] == "20"
    store.put_golden(KEY, H100, {"cases": {}})
    cls, golden = store.golden(KEY, H100)
    assert cls == H100 and golden["perplexity"] is None and golden["versions"] == {}
    assert golden["recorded_at"].endswith("+00:00")
    # given fields are kept as given
    store.put_latency(KEY, H100, "gen", lat(stats={"median": 1.0}, recorded_at="2026-01-01T00:00:00+00:00"))
    got = store.latency(KEY, H100, "gen")
    assert got["stats"] == {"median": 1.0} and got["recorded_at"] == "2026-01-01T00:00:00+00:00"


@pytest.mark.parametrize("gpu_class,bench,message", [
    ("", "gen", "gpu_class must be a non-empty string, got ''"),
    (None, "gen", "gpu_class must be a non-empty string, got None"),
    (H100, "", "bench must be a non-empty string, got ''"),
    (H100, 3, "bench must be a non-empty string, got 3"),
])
def test_names_must_be_non_empty_strings(store: BaselineStore, gpu_class, bench, message):
    with pytest.raises(ValueError) as exc:
        store.put_latency(KEY, gpu_class, bench, lat())
    assert str(exc.value) == message
    if bench == "gen":
        with pytest.raises(ValueError, match="gpu_class must be"):
            store.put_golden(KEY, gpu_class, GOLDEN)
    assert not store.path_for(KEY).exists()


def test_golden_outputs_that_are_not_an_object_are_refused_not_crashed_on(store: BaselineStore):
    with pytest.raises(BaselineError) as exc:
        store.put_golden(KEY, H100, [GOLDEN])
    assert str(exc.value).endswith(f'refusing to write: $.gpu_classes["{H100}"].golden: expected an object, got array')
    assert not store.path_for(KEY).exists()


def test_a_merge_that_breaks_the_document_is_refused_whole(store: BaselineStore, tmp_path: Path, monkeypatch):
    """put_golden edits the document under the lock through _update, which validates the result
    as a whole: a bad merge is one line naming what is wrong, and the file stays as it was."""
    monkeypatch.chdir(tmp_path)
    path = store.put_latency(KEY, H100, "gen", lat())
    before = path.read_bytes()
    with pytest.raises(BaselineError) as exc:
        store._update(KEY, lambda doc: doc["gpu_classes"][H100].update(golden={"cases": {"c": {"tokens": 3}}}))
    assert str(exc.value) == ("baselines/EleutherAI_pythia-70m/hub_a1b2c3/deepspeed-float16-tp1.json: refusing to "
                              f'write: $.gpu_classes["{H100}"].golden.cases.c.tokens: expected an array, got integer 3')
    assert path.read_bytes() == before


def test_refused_entries_say_where_and_what(store: BaselineStore, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BaselineError) as exc:
        store.put_latency(KEY, H100, "gen", {"samples": [0.01, -1.0]})
    assert str(exc.value) == ("baselines/EleutherAI_pythia-70m/hub_a1b2c3/deepspeed-float16-tp1.json: refusing to "
                              'write: $.gpu_classes["NVIDIA-H100-80GB-HBM3"].latency.gen.samples[1]: expected a '
                              "finite number >= 0, got number -1.0")
    with pytest.raises(BaselineError) as exc:
        store.put_golden(KEY, H100, {"cases": {"a": {}}})
    assert str(exc.value).endswith('refusing to write: $.gpu_classes["NVIDIA-H100-80GB-HBM3"].golden.cases.a: '
                                   'missing required field "tokens"')


@pytest.mark.parametrize("text,safe", [("a/b c", "a_b_c"), ("..", "__"), (".", "_"), ("", "_"), ("x.y-z_1", "x.y-z_1"),
                                       ("...", "___"), ("XX", "XX"), ("X.X", "X.X")])
def test_sanitize_component(text, safe):
    assert sanitize_component(text) == safe
