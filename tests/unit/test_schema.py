"""The baseline file validator (storage/schema.py) on its own: each rule, with the exact one-line message a
person editing a baseline file gets (JSON path, what was expected, what was found)."""
from __future__ import annotations

import math

import pytest

from pytest_neoxmii.storage.schema import BaselineKey, SchemaError, json_path, new_document, validate_document

KEY = BaselineKey(model="m", weights="w", dtype="fp16", backend="ds", tp=1)


def doc() -> dict:
    d = new_document(KEY)
    d["gpu_classes"]["H100"] = {
        "latency": {"gen/bs1": {"samples": [0.01, 0.02], "stats": {"median": 0.015, "p99": None},
                                "extra": {"tokens": 32, "nested": [1, "a", None, True, 0.5]},
                                "machine": {"cpu": "x"}, "versions": {"torch": "2.13.0", "mii": None},
                                "recorded_at": "2026-11-26T20:00:00Z"}},
        "golden": {"cases": {"short": {"tokens": [[1, 2], [0, 3]],
                                        "top_logprobs": [[[[1, -0.1], [5, -2.0]], [[2, -0.2]]], [[], []]]}},
                   "versions": {"torch": "2.13.0"}, "recorded_at": "2026-11-26T20:00:00+00:00",
                   "perplexity": 0.0},
    }
    return d


def message(edit, expected_key=KEY) -> str:
    d = doc()
    edit(d)
    with pytest.raises(SchemaError) as exc:
        validate_document(d, expected_key)
    return str(exc.value)


def test_a_complete_document_with_every_optional_field_is_valid():
    validate_document(doc(), KEY)
    validate_document(doc())
    empty_top = doc()
    del empty_top["gpu_classes"]["H100"]["golden"]["cases"]["short"]["top_logprobs"]
    validate_document(empty_top, KEY)


LAT = ("gpu_classes", "H100", "latency", "gen/bs1")
GOLD = ("gpu_classes", "H100", "golden")
CASE = GOLD + ("cases", "short")


def at(d, path):
    for p in path:
        d = d[p]
    return d


CASES = [
    # (edit, exact message)
    (lambda d: d.update(schema="other"), '$.schema: expected "pytest-neoxmii/baseline", got string "other"'),
    (lambda d: d.pop("schema"), '$: missing "schema": "pytest-neoxmii/baseline"; not a pytest-neoxmii baseline file'),
    (lambda d: d.update(schema_version=2),
     "$.schema_version: version 2 is newer than this pytest-neoxmii supports (1); upgrade pytest-neoxmii"),
    (lambda d: d.update(schema_version=0), "$.schema_version: expected 1, got integer 0"),
    (lambda d: d.update(schema_version=True), "$.schema_version: expected 1, got boolean"),
    (lambda d: d.pop("schema_version"), "$.schema_version: expected 1, got null"),
    (lambda d: d.pop("key"), '$: missing required field "key"'),
    (lambda d: d["key"].pop("dtype"), '$.key: missing required field "dtype"'),
    (lambda d: d["key"].update(tp=0), "$.key.tp: expected an integer >= 1, got integer 0"),
    (lambda d: d["key"].update(tp=True), "$.key.tp: expected an integer >= 1, got boolean"),
    (lambda d: d["key"].update(backend=""), '$.key.backend: expected a non-empty string, got string ""'),
    (lambda d: d["key"].update(weights="v"), '$.key.weights: key mismatch: file is for "v", expected "w"'),
    (lambda d: d.pop("gpu_classes"), '$: missing required field "gpu_classes"'),
    (lambda d: d["gpu_classes"].update({"": {}}), '$.gpu_classes[""]: GPU class names must be non-empty'),
    (lambda d: d["gpu_classes"].update(A100=[]), "$.gpu_classes.A100: expected an object, got array"),
    (lambda d: at(d, LAT).update(samples=[]), '$.gpu_classes.H100.latency["gen/bs1"].samples: expected at least '
                                             'one latency sample'),
    (lambda d: at(d, LAT).update(samples=[0.01, -0.5]),
     '$.gpu_classes.H100.latency["gen/bs1"].samples[1]: expected a finite number >= 0, got number -0.5'),
    (lambda d: at(d, LAT).update(samples=[math.inf]),
     '$.gpu_classes.H100.latency["gen/bs1"].samples[0]: expected a finite number >= 0, got number inf'),
    (lambda d: at(d, LAT).update(samples=[False]),
     '$.gpu_classes.H100.latency["gen/bs1"].samples[0]: expected a finite number >= 0, got boolean'),
    (lambda d: at(d, LAT).update(samples="0.01"),
     '$.gpu_classes.H100.latency["gen/bs1"].samples: expected an array, got string "0.01"'),
    (lambda d: at(d, LAT)["stats"].update(median="fast"),
     '$.gpu_classes.H100.latency["gen/bs1"].stats.median: expected a finite number, got string "fast"'),
    (lambda d: at(d, LAT)["stats"].update(delta=-1.0), None),        # stats may be negative (a change)
    (lambda d: at(d, LAT)["extra"].update(bad=math.nan),
     '$.gpu_classes.H100.latency["gen/bs1"].extra.bad: expected a finite number, got number nan'),
    (lambda d: at(d, LAT)["extra"]["nested"].append({1: 2}),
     '$.gpu_classes.H100.latency["gen/bs1"].extra.nested[5]: object keys must be strings, got integer 1'),
    (lambda d: at(d, LAT)["machine"].update(gpu=(1, 2)),
     '$.gpu_classes.H100.latency["gen/bs1"].machine.gpu: expected a JSON value, got non-JSON value of Python '
     'type tuple'),
    (lambda d: at(d, LAT)["versions"].update(torch=2),
     '$.gpu_classes.H100.latency["gen/bs1"].versions.torch: expected a version string or null, got integer 2'),
    (lambda d: at(d, LAT).update(recorded_at="2026-13-01"),
     '$.gpu_classes.H100.latency["gen/bs1"].recorded_at: expected an ISO-8601 timestamp, got string "2026-13-01"'),
    (lambda d: at(d, LAT).update(recorded_at="x" * 50),
     '$.gpu_classes.H100.latency["gen/bs1"].recorded_at: expected an ISO-8601 timestamp, got string "'
     + "x" * 36 + "..."),                 # long values are cut to 40 characters
    # a value of exactly 40 characters (the string 38 and its quotes) is shown whole, 41 are cut
    (lambda d: at(d, LAT).update(recorded_at="y" * 38),
     '$.gpu_classes.H100.latency["gen/bs1"].recorded_at: expected an ISO-8601 timestamp, got string "'
     + "y" * 38 + '"'),
    (lambda d: at(d, LAT).update(recorded_at="y" * 39),
     '$.gpu_classes.H100.latency["gen/bs1"].recorded_at: expected an ISO-8601 timestamp, got string "'
     + "y" * 36 + "..."),
    (lambda d: at(d, GOLD).pop("cases"), '$.gpu_classes.H100.golden: missing required field "cases"'),
    (lambda d: at(d, GOLD).update(perplexity=-1.0),
     "$.gpu_classes.H100.golden.perplexity: expected a finite number >= 0, got number -1.0"),
    (lambda d: at(d, GOLD).update(perplexity=None), None),
    (lambda d: at(d, GOLD).update(recorded_at=20261126),
     "$.gpu_classes.H100.golden.recorded_at: expected a non-empty string, got integer 20261126"),
    (lambda d: at(d, GOLD)["versions"].update(torch=[2]),
     "$.gpu_classes.H100.golden.versions.torch: expected a version string or null, got array"),
    (lambda d: at(d, CASE).pop("tokens"), '$.gpu_classes.H100.golden.cases.short: missing required field "tokens"'),
    (lambda d: at(d, CASE)["tokens"][1].__setitem__(0, -1),
     "$.gpu_classes.H100.golden.cases.short.tokens[1][0]: expected an integer >= 0, got integer -1"),
    (lambda d: at(d, CASE).update(max_new_tokens="32"),
     '$.gpu_classes.H100.golden.cases.short.max_new_tokens: expected an integer >= 1, got string "32"'),
    (lambda d: at(d, CASE).update(max_new_tokens=0),
     "$.gpu_classes.H100.golden.cases.short.max_new_tokens: expected an integer >= 1, got integer 0"),
    (lambda d: at(d, CASE).update(max_new_tokens=32), None),
    (lambda d: at(d, CASE)["tokens"].__setitem__(0, 7),
     "$.gpu_classes.H100.golden.cases.short.tokens[0]: expected an array, got integer 7"),
    (lambda d: at(d, CASE)["top_logprobs"].pop(),
     "$.gpu_classes.H100.golden.cases.short.top_logprobs: expected one entry per row of tokens (2), got 1"),
    (lambda d: at(d, CASE)["top_logprobs"][0][0].__setitem__(1, [5, -2.0, 0]),
     "$.gpu_classes.H100.golden.cases.short.top_logprobs[0][0][1]: expected a [token id, logprob] pair, got array"),
    (lambda d: at(d, CASE)["top_logprobs"][0][0].__setitem__(1, [-5, -2.0]),
     "$.gpu_classes.H100.golden.cases.short.top_logprobs[0][0][1][0]: expected an integer >= 0, got integer -5"),
    (lambda d: at(d, CASE)["top_logprobs"][0][0].__setitem__(1, [5, None]),
     "$.gpu_classes.H100.golden.cases.short.top_logprobs[0][0][1][1]: expected a finite number, got null"),
    (lambda d: at(d, CASE)["top_logprobs"][0][0].__setitem__(1, [0, 3]), None),   # an int logprob is a number
]


@pytest.mark.parametrize("edit,expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_each_rule_with_its_exact_message(edit, expected):
    if expected is None:
        d = doc()
        edit(d)
        validate_document(d, KEY)
    else:
        assert message(edit) == expected


# Every container of the format given as the wrong JSON type: refused, and the message names that container's
# own path (a person fixing a hand-edited file goes there), not its parent's or a sibling's.
WRONG_CONTAINERS = [
    (("key",), "x", '$.key: expected an object, got string "x"'),
    (("gpu_classes",), [], "$.gpu_classes: expected an object, got array"),
    (("gpu_classes", "H100"), 3, "$.gpu_classes.H100: expected an object, got integer 3"),
    (("gpu_classes", "H100", "latency"), [], "$.gpu_classes.H100.latency: expected an object, got array"),
    (LAT, None, '$.gpu_classes.H100.latency["gen/bs1"]: expected an object, got null'),
    (LAT + ("stats",), [0.1], '$.gpu_classes.H100.latency["gen/bs1"].stats: expected an object, got array'),
    (LAT + ("extra",), "x", '$.gpu_classes.H100.latency["gen/bs1"].extra: expected an object, got string "x"'),
    (LAT + ("machine",), [], '$.gpu_classes.H100.latency["gen/bs1"].machine: expected an object, got array'),
    (LAT + ("versions",), "2.13", '$.gpu_classes.H100.latency["gen/bs1"].versions: expected an object, got '
                                  'string "2.13"'),
    (GOLD, [], "$.gpu_classes.H100.golden: expected an object, got array"),
    (GOLD + ("versions",), [], "$.gpu_classes.H100.golden.versions: expected an object, got array"),
    (GOLD + ("cases",), [], "$.gpu_classes.H100.golden.cases: expected an object, got array"),
    (CASE, [[1]], "$.gpu_classes.H100.golden.cases.short: expected an object, got array"),
    (CASE + ("tokens",), {}, "$.gpu_classes.H100.golden.cases.short.tokens: expected an array, got object"),
    (CASE + ("top_logprobs",), {"0": []},
     "$.gpu_classes.H100.golden.cases.short.top_logprobs: expected an array, got object"),
    (CASE + ("top_logprobs", 1), {}, "$.gpu_classes.H100.golden.cases.short.top_logprobs[1]: expected an array, "
                                     "got object"),
    (CASE + ("top_logprobs", 0, 1), 2, "$.gpu_classes.H100.golden.cases.short.top_logprobs[0][1]: expected an "
                                       "array, got integer 2"),
    (CASE + ("top_logprobs", 0, 0, 0), {"token": 1}, "$.gpu_classes.H100.golden.cases.short.top_logprobs[0][0][0]: "
                                                     "expected a [token id, logprob] pair, got object"),
]


@pytest.mark.parametrize("path,value,expected", WRONG_CONTAINERS, ids=[json_path(p) for p, _, _ in WRONG_CONTAINERS])
def test_a_container_of_the_wrong_type_is_refused_at_its_own_path(path, value, expected):
    def edit(d):
        at(d, path[:-1])[path[-1]] = value
    assert message(edit) == expected


def test_not_an_object_and_no_expected_key():
    with pytest.raises(SchemaError) as exc:
        validate_document([1, 2])
    assert str(exc.value) == "$: expected an object, got array" and exc.value.path == ()
    d = doc()
    d["key"]["weights"] = "v"
    validate_document(d)                    # without an expected key, any valid key is accepted


def test_schema_error_carries_path_and_problem():
    err = SchemaError(("a", 0, "b c"), "broken")
    assert (err.path, err.problem, str(err)) == (("a", 0, "b c"), "broken", '$.a[0]["b c"]: broken')


def test_json_path():
    assert json_path(()) == "$"
    assert json_path(("gpu_classes", "NVIDIA-H100", "latency", "gen/bs1", "samples", 3)) == \
        '$.gpu_classes["NVIDIA-H100"].latency["gen/bs1"].samples[3]'
    assert json_path(("_a1", "1a", "é")) == '$._a1["1a"]["\\u00e9"]'


@pytest.mark.parametrize("field,value,problem", [
    ("model", "", "BaselineKey.model must be a non-empty string, got ''"),
    ("weights", None, "BaselineKey.weights must be a non-empty string, got None"),
    ("tp", 0, "BaselineKey.tp must be an integer >= 1, got 0"),
    ("tp", True, "BaselineKey.tp must be an integer >= 1, got True"),
    ("tp", 1.0, "BaselineKey.tp must be an integer >= 1, got 1.0"),
])
def test_baseline_key_validation(field, value, problem):
    args = dict(KEY.as_json(), **{field: value})
    with pytest.raises(ValueError) as exc:
        BaselineKey(**args)
    assert str(exc.value) == problem


def test_the_smallest_valid_key_is_accepted():
    """tp=1 (one GPU, every CPU run) is the smallest degree, and one-character names are names."""
    key = BaselineKey(model="m", weights="w", dtype="d", backend="b", tp=1)
    assert key.tp == 1 and key.as_json() == {"model": "m", "weights": "w", "dtype": "d", "backend": "b", "tp": 1}


def test_new_document():
    assert new_document(KEY) == {"schema": "pytest-neoxmii/baseline", "schema_version": 1,
                                 "key": {"model": "m", "weights": "w", "dtype": "fp16", "backend": "ds", "tp": 1},
                                 "gpu_classes": {}}
    assert new_document(KEY) is not new_document(KEY)
