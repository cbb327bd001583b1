"""The baseline store: one human-diffable JSON file per BaselineKey, entries inside it per GPU class.

Several writers may update the same file at once (pytest-xdist workers, two sessions on one checkout), and
the file is part of the user's repository, so every write:

1. holds a file lock (<file>.lock) so read-modify-write cycles never interleave;
2. reloads the file under that lock, so entries another writer added in the meantime are kept;
3. validates the result before writing;
4. writes a temporary file in the same directory, fsyncs it and os.replace()s it over the target, so readers
   and crashes only ever see the old or the new complete file;
5. changes only the given GPU class's entries;
6. refuses to touch an existing file it cannot parse or validate: the user must look at it.

Readers take no lock: thanks to (4) they always see a complete file.
"""
from __future__ import annotations

import json
import numbers
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock, Timeout

from ..errors import BaselineError
from ..files import write_whole
from ..samples import summarize
from .schema import (
    BaselineKey,
    SchemaError,
    new_document,
    validate_document,
    validate_golden,
    validate_latency_entry,
)

DEFAULT_LOCK_TIMEOUT_S = 60.0

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# A line starting a git conflict hunk: a merge left the file half-resolved.
_CONFLICT = re.compile(r"^(<{7}|>{7})( |$)", re.MULTILINE)


def sanitize_component(text: str) -> str:
    """One safe path component: only [A-Za-z0-9._-]; "", "." and ".." (which would escape or collapse the
    directory) become underscores."""
    safe = _UNSAFE.sub("_", text)
    if safe.strip(".") == "":
        safe = "_" * max(len(safe), 1)
    return safe


def _shown(path: Path) -> str:
    """The path as users want to see it in an error: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """A JSON-ready deep copy of caller data: tuples and arrays -> lists, numpy/torch scalars -> int/float/bool.
    Anything else is left as is for the validator to reject with a precise path."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    ndim = getattr(value, "ndim", None)
    if ndim == 0 and callable(getattr(value, "item", None)):  # numpy.bool_, 0-d array or tensor
        return _plain(value.item())
    if isinstance(ndim, int) and ndim > 0 and callable(getattr(value, "tolist", None)):  # numpy array, tensor
        return _plain(value.tolist())
    return value


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads silently keeps the last duplicate; in a baseline that usually means a bad manual merge.
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable. Not possible on every platform/filesystem; best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, doc: dict) -> None:
    """Write doc to path so that the file is always either the old or the new complete content."""
    def dump(f) -> None:
        json.dump(doc, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    write_whole(path, dump)
    _fsync_dir(path.parent)


class BaselineStore:
    """Baselines under `root` (usually <repo>/baselines), one file per key:
    <root>/<model>/<weights>/<backend>-<dtype>-tp<tp>.json, path components sanitized."""

    def __init__(self, root: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S):
        self.root = Path(root)
        self.lock_timeout = lock_timeout

    # ------------------------------------------------------------ reading

    def path_for(self, key: BaselineKey) -> Path:
        name = f"{sanitize_component(key.backend)}-{sanitize_component(key.dtype)}-tp{int(key.tp)}.json"
        return self.root / sanitize_component(key.model) / sanitize_component(key.weights) / name

    def shown_path(self, key: BaselineKey) -> str:
        """The key's file as messages show it: relative to the working directory when inside it."""
        return _shown(self.path_for(key))

    def load(self, key: BaselineKey) -> Optional[dict]:
        """The whole validated document, or None when the file does not exist.
        Raises BaselineError ("<file>: <problem>", one line) when it exists but is unusable."""
        return self._read(self.path_for(key), key)

    def latency(self, key: BaselineKey, gpu_class: str, bench: str) -> Optional[dict]:
        doc = self.load(key)
        if doc is None:
            return None
        return doc["gpu_classes"].get(gpu_class, {}).get("latency", {}).get(bench)

    def latency_other_classes(self, key: BaselineKey, bench: str, gpu_class: Optional[str] = None) -> list[str]:
        """GPU classes (sorted) that have a latency baseline for `bench`, other than `gpu_class`; lets the
        caller say "baseline exists for NVIDIA-A100 only"."""
        doc = self.load(key)
        if doc is None:
            return []
        return sorted(
            cls for cls, entry in doc["gpu_classes"].items()
            if cls != gpu_class and bench in entry.get("latency", {})
        )

    def golden(self, key: BaselineKey, gpu_class: str) -> Optional[tuple[str, dict]]:
        """(class it came from, golden outputs): this GPU class's if recorded, else another class's (the first
        in sorted order, so the choice is stable). Golden answers are not expected to be bit-identical across
        GPU classes; the caller compares with tolerances and reports where the reference came from."""
        doc = self.load(key)
        if doc is None:
            return None
        classes = doc["gpu_classes"]
        if "golden" in classes.get(gpu_class, {}):
            return gpu_class, classes[gpu_class]["golden"]
        for cls in sorted(classes):
            if "golden" in classes[cls]:
                return cls, classes[cls]["golden"]
        return None

    def _read(self, path: Path, key: BaselineKey) -> Optional[dict]:
        shown = _shown(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise BaselineError(f"{shown}: cannot read: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BaselineError(f"{shown}: not UTF-8 text (bad byte at offset {e.start})") from None
        if not text.strip():
            raise BaselineError(f"{shown}: file is empty, not a baseline; delete it or restore it from git")
        if _CONFLICT.search(text):
            raise BaselineError(f"{shown}: contains unresolved git merge conflict markers; resolve them first")
        try:
            doc = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
        except _DuplicateKey as e:
            raise BaselineError(f"{shown}: not valid JSON: key {json.dumps(str(e))} appears twice in one object") \
                from None
        except json.JSONDecodeError as e:
            raise BaselineError(f"{shown}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except ValueError as e:  # NaN / Infinity
            raise BaselineError(f"{shown}: not valid JSON: {e}") from None
        try:
            validate_document(doc, key)
        except SchemaError as e:
            raise BaselineError(f"{shown}: {e}") from None
        return doc

    # ------------------------------------------------------------ writing

    def put_latency(self, key: BaselineKey, gpu_class: str, bench: str, entry: dict) -> Path:
        """Record (replace) the latency baseline of `bench` for `gpu_class`. `entry` needs "samples"
        (seconds); "stats" (default: summarize(samples)), "recorded_at" (default: now, UTC), "extra",
        "versions" and "machine" (default: {}) are filled in when missing. Returns the file written."""
        _check_name("gpu_class", gpu_class)
        _check_name("bench", bench)
        entry = _plain(entry)
        where = ("gpu_classes", gpu_class, "latency", bench)
        # Check before filling defaults: summarize() needs valid samples, and the error should point at them.
        self._check_new(key, lambda: validate_latency_entry(entry, where))
        entry.setdefault("stats", summarize(entry["samples"]))
        entry.setdefault("extra", {})
        entry.setdefault("versions", {})
        entry.setdefault("machine", {})
        entry.setdefault("recorded_at", _now_iso())

        def mutate(doc: dict) -> None:
            cls = doc["gpu_classes"].setdefault(gpu_class, {})
            cls.setdefault("latency", {})[bench] = entry

        return self._update(key, mutate)

    def put_golden(self, key: BaselineKey, gpu_class: str, golden: dict) -> Path:
        """Record golden outputs of `gpu_class`: {"cases": {...}, "perplexity", "perplexity_detail",
        "versions", "recorded_at"}. Each given case is added or replaced, case by case; the cases already
        stored (written by other tests, or pytest-xdist workers, of the same backend) are kept. A given
        perplexity (with its detail) and given versions replace the stored ones; missing, the stored ones
        stay (defaults: null / {}). recorded_at is the given one, else now. Returns the file written."""
        _check_name("gpu_class", gpu_class)
        golden = _plain(golden)
        where = ("gpu_classes", gpu_class, "golden")
        self._check_new(key, lambda: validate_golden(golden, where))
        recorded_at = golden.get("recorded_at") or _now_iso()

        def mutate(doc: dict) -> None:
            stored = doc["gpu_classes"].setdefault(gpu_class, {}).setdefault("golden", {"cases": {}})
            stored.setdefault("cases", {}).update(golden["cases"])
            if "perplexity" in golden:     # its detail belongs to it: never keep an older one beside it
                stored["perplexity"] = golden["perplexity"]
                stored.pop("perplexity_detail", None)
            if "perplexity_detail" in golden:
                stored["perplexity_detail"] = golden["perplexity_detail"]
            if "versions" in golden:
                stored["versions"] = golden["versions"]
            stored.setdefault("perplexity", None)
            stored.setdefault("versions", {})
            stored["recorded_at"] = recorded_at

        return self._update(key, mutate)

    def _check_new(self, key: BaselineKey, check: Callable[[], None]) -> None:
        try:
            check()
        except SchemaError as e:
            raise BaselineError(f"{_shown(self.path_for(key))}: refusing to write: {e}") from None

    def _update(self, key: BaselineKey, mutate: Callable[[dict], None]) -> Path:
        """Locked read-modify-validate-atomic-write of the key's file."""
        path = self.path_for(key)
        shown = _shown(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BaselineError(f"{shown}: cannot create directory {_shown(path.parent)}: {e.strerror or e}") \
                from None
        lock = FileLock(str(path) + ".lock", timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise BaselineError(
                f"{shown}: timed out after {self.lock_timeout:g} s waiting for {_shown(Path(lock.lock_file))}; "
                f"another pytest process is writing this baseline"
            ) from None
        try:
            # Re-read under the lock: another writer may have added entries since anyone last looked.
            # A corrupt or invalid file raises here, so it is never overwritten.
            doc = self._read(path, key)
            if doc is None:
                doc = new_document(key)
            mutate(doc)
            try:
                validate_document(doc, key)
            except SchemaError as e:
                raise BaselineError(f"{shown}: refusing to write: {e}") from None
            try:
                _atomic_write_json(path, doc)
            except OSError as e:
                raise BaselineError(f"{shown}: cannot write: {e.strerror or e}") from e
        finally:
            lock.release()
        return path


def _check_name(what: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
