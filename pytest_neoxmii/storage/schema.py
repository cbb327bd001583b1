"""The baseline file format (schema "pytest-neoxmii/baseline", version 1) and its hand-written validator.

Baseline files live in the user's repository and get edited, merged and reviewed by people, so every check
reports the JSON path of the problem (e.g. $.gpu_classes.cpu.latency["gen/bs1"].samples[3]) in one line.
No jsonschema dependency: the format is small and the checks are simple.

Layout::

    {"schema": "pytest-neoxmii/baseline", "schema_version": 1,
     "key": {"model", "weights", "dtype", "backend", "tp"},
     "gpu_classes": {"<gpu class>": {"latency": {"<bench>": LATENCY_ENTRY}, "golden": GOLDEN}}}

Unknown extra fields are tolerated (so a newer writer of the same version can add informational fields);
known fields must have the documented type.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Union

SCHEMA_NAME = "pytest-neoxmii/baseline"
SCHEMA_VERSION = 1

PathPart = Union[str, int]


@dataclass(frozen=True)
class BaselineKey:
    """Identifies one baseline file. `weights` is built by the caller ("synthetic-seed0", "hub@<revision>",
    "local@<sha-of-config>"); the store only uses it."""

    model: str
    weights: str
    dtype: str
    backend: str
    tp: int

    def __post_init__(self) -> None:
        for name in ("model", "weights", "dtype", "backend"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"BaselineKey.{name} must be a non-empty string, got {value!r}")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"BaselineKey.tp must be an integer >= 1, got {self.tp!r}")

    def as_json(self) -> dict:
        return asdict(self)


class SchemaError(Exception):
    """One validation problem: `path` is the JSON path, str(self) is '<path>: <problem>'."""

    def __init__(self, path: tuple[PathPart, ...], problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{json_path(path)}: {problem}")


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def json_path(path: tuple[PathPart, ...]) -> str:
    """$.a.b[3]["name with/odd chars"]; keys are JSON-quoted so the result stays on one line."""
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def new_document(key: BaselineKey) -> dict:
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "key": key.as_json(), "gpu_classes": {}}


# ---------------------------------------------------------------- type helpers

# JSON's names of Python's types, first match wins: bool before int (True is an int to isinstance).
_JSON_TYPE_NAMES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                    (list, "array"), (dict, "object"))


def _type_name(value: Any) -> str:
    for python_type, name in _JSON_TYPE_NAMES:
        if isinstance(value, python_type):
            return name
    return f"non-JSON value of Python type {type(value).__name__}"


def _got(value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
        if len(text) > 40:
            text = text[:37] + "..."
        return f"{_type_name(value)} {text}"
    return _type_name(value)


def _fail(path: tuple[PathPart, ...], expected: str, value: Any) -> None:
    raise SchemaError(path, f"expected {expected}, got {_got(value)}")


def _obj(value: Any, path: tuple[PathPart, ...]) -> dict:
    if not isinstance(value, dict):
        _fail(path, "an object", value)
    return value


def _arr(value: Any, path: tuple[PathPart, ...]) -> list:
    if not isinstance(value, list):
        _fail(path, "an array", value)
    return value


def _str(value: Any, path: tuple[PathPart, ...], nonempty: bool = True) -> str:
    if not isinstance(value, str) or (nonempty and not value):
        _fail(path, "a non-empty string" if nonempty else "a string", value)
    return value


def _int(value: Any, path: tuple[PathPart, ...], minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        _fail(path, "an integer" if minimum is None else f"an integer >= {minimum}", value)
    return value


def _num(value: Any, path: tuple[PathPart, ...], nonnegative: bool = False) -> float:
    # JSON itself has no NaN/Infinity; rejecting them keeps the files standard JSON.
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (nonnegative and value < 0):
        _fail(path, "a finite number >= 0" if nonnegative else "a finite number", value)
    return value


def _timestamp(value: Any, path: tuple[PathPart, ...]) -> None:
    _str(value, path)
    try:
        # Python < 3.11 does not accept the "Z" suffix that other tools write.
        datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise SchemaError(path, f"expected an ISO-8601 timestamp, got {_got(value)}") from None


def _plain_json(value: Any, path: tuple[PathPart, ...]) -> None:
    """Free-form fields (extra, machine) may hold anything JSON can represent, nothing else."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(path, f"object keys must be strings, got {_type_name(k)} {k!r}")
            _plain_json(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain_json(v, path + (i,))
    elif isinstance(value, float):
        _num(value, path)
    elif value is not None and not isinstance(value, (str, int, bool)):
        _fail(path, "a JSON value", value)


def _versions(value: Any, path: tuple[PathPart, ...]) -> None:
    # {"torch": "2.3.0", "deepspeed": null (not installed), ...}
    for name, ver in _obj(value, path).items():
        if ver is not None and not isinstance(ver, str):
            _fail(path + (name,), "a version string or null", ver)


# ---------------------------------------------------------------- the format

def validate_latency_entry(entry: Any, path: tuple[PathPart, ...]) -> None:
    entry = _obj(entry, path)
    if "samples" not in entry:
        raise SchemaError(path, 'missing required field "samples"')
    samples = _arr(entry["samples"], path + ("samples",))
    if not samples:
        raise SchemaError(path + ("samples",), "expected at least one latency sample")
    for i, s in enumerate(samples):
        _num(s, path + ("samples", i), nonnegative=True)
    if "stats" in entry:
        for name, v in _obj(entry["stats"], path + ("stats",)).items():
            if v is not None:
                _num(v, path + ("stats", name))
    if "extra" in entry:
        _plain_json(_obj(entry["extra"], path + ("extra",)), path + ("extra",))
    if "machine" in entry:
        _plain_json(_obj(entry["machine"], path + ("machine",)), path + ("machine",))
    if "versions" in entry:
        _versions(entry["versions"], path + ("versions",))
    if "recorded_at" in entry:
        _timestamp(entry["recorded_at"], path + ("recorded_at",))


def validate_golden(golden: Any, path: tuple[PathPart, ...]) -> None:
    golden = _obj(golden, path)
    if "cases" not in golden:
        raise SchemaError(path, 'missing required field "cases"')
    if "versions" in golden:
        _versions(golden["versions"], path + ("versions",))
    if "recorded_at" in golden:
        _timestamp(golden["recorded_at"], path + ("recorded_at",))
    if golden.get("perplexity") is not None:
        _num(golden["perplexity"], path + ("perplexity",), nonnegative=True)
    for case_id, case in _obj(golden["cases"], path + ("cases",)).items():
        cpath = path + ("cases", case_id)
        case = _obj(case, cpath)
        if "tokens" not in case:
            raise SchemaError(cpath, 'missing required field "tokens"')
        tokens = _arr(case["tokens"], cpath + ("tokens",))
        if "max_new_tokens" in case:        # what the recording asked for (golden.compare_case reads it)
            _int(case["max_new_tokens"], cpath + ("max_new_tokens",), minimum=1)
        for r, row in enumerate(tokens):
            for t, tok in enumerate(_arr(row, cpath + ("tokens", r))):
                _int(tok, cpath + ("tokens", r, t), minimum=0)
        # top_logprobs[row][step] = [[token id, logprob], ...], highest first; may be empty (not recorded).
        top = _arr(case.get("top_logprobs", []), cpath + ("top_logprobs",))
        if top and len(top) != len(tokens):
            raise SchemaError(cpath + ("top_logprobs",),
                              f"expected one entry per row of tokens ({len(tokens)}), got {len(top)}")
        for r, row in enumerate(top):
            for s, step in enumerate(_arr(row, cpath + ("top_logprobs", r))):
                for j, pair in enumerate(_arr(step, cpath + ("top_logprobs", r, s))):
                    ppath = cpath + ("top_logprobs", r, s, j)
                    if not isinstance(pair, list) or len(pair) != 2:
                        _fail(ppath, "a [token id, logprob] pair", pair)
                    _int(pair[0], ppath + (0,), minimum=0)
                    _num(pair[1], ppath + (1,))


def validate_document(doc: Any, expected_key: BaselineKey | None = None) -> None:
    """Raise SchemaError for the first problem found in a whole baseline document."""
    doc = _obj(doc, ())
    if doc.get("schema") != SCHEMA_NAME:
        if "schema" not in doc:
            raise SchemaError((), f'missing "schema": {json.dumps(SCHEMA_NAME)}; not a pytest-neoxmii baseline file')
        raise SchemaError(("schema",), f"expected {json.dumps(SCHEMA_NAME)}, got {_got(doc['schema'])}")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise SchemaError(("schema_version",), f"version {version} is newer than this pytest-neoxmii "
                                                   f"supports ({SCHEMA_VERSION}); upgrade pytest-neoxmii")
        raise SchemaError(("schema_version",), f"expected {SCHEMA_VERSION}, got {_got(version)}")

    if "key" not in doc:
        raise SchemaError((), 'missing required field "key"')
    key = _obj(doc["key"], ("key",))
    for name in ("model", "weights", "dtype", "backend", "tp"):
        if name not in key:
            raise SchemaError(("key",), f"missing required field {json.dumps(name)}")
        if name == "tp":
            _int(key[name], ("key", name), minimum=1)
        else:
            _str(key[name], ("key", name))
    if expected_key is not None:
        for name, want in expected_key.as_json().items():
            if key[name] != want:
                # Two keys that sanitize to the same file name end up here too.
                raise SchemaError(("key", name), f"key mismatch: file is for {json.dumps(key[name])}, "
                                                 f"expected {json.dumps(want)}")

    if "gpu_classes" not in doc:
        raise SchemaError((), 'missing required field "gpu_classes"')
    for gpu_class, entry in _obj(doc["gpu_classes"], ("gpu_classes",)).items():
        gpath = ("gpu_classes", gpu_class)
        if not gpu_class:
            raise SchemaError(gpath, "GPU class names must be non-empty")
        entry = _obj(entry, gpath)
        if "latency" in entry:
            for bench, lat in _obj(entry["latency"], gpath + ("latency",)).items():
                validate_latency_entry(lat, gpath + ("latency", bench))
        if "golden" in entry:
            validate_golden(entry["golden"], gpath + ("golden",))
