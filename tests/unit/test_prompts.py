"""Users' own prompts (--neox-prompts): the file's validation (one-line errors naming the line), the cases
made from it (ids, token ids, context limit) and, through pytester, the tests they add."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_neoxmii.errors import NeoxUsageError
from pytest_neoxmii.prompts import prompt_plans, read_prompt_file

pytestmark = pytest.mark.usefixtures("preloaded")


def write(tmp_path, *lines: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class WordTokenizer:
    """Splits on spaces, one id per word (its length), enough to count tokens."""
    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [len(w) for w in text.split()]}


def plans(path, context=64, vocab=100, default_new=8):
    return prompt_plans(read_prompt_file(path), path, tokenizer=WordTokenizer(), context_length=context,
                        vocab_size=vocab, default_max_new_tokens=default_new)


def test_each_line_is_a_batch1_generating_case_with_its_id(tmp_path):
    path = write(tmp_path, json.dumps({"id": "greeting", "prompt": "hello my name is", "max_new_tokens": 3}),
                 "", json.dumps({"input_ids": [5, 6, 7]}))
    got = plans(path)
    assert [p.id for p in got] == ["prompt-greeting", "prompt-line3"]      # blank lines keep their number
    assert got[0].rows == ((5, 2, 4, 2),) and got[0].max_new_tokens == 3 and got[0].generate
    assert got[1].rows == ((5, 6, 7),) and got[1].max_new_tokens == 8 and got[1].lengths == (3,)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a b"', "line 2: not valid JSON (Expecting ',' delimiter at column 17)"),
    ('["a", "b"]', "line 2: expected a JSON object with 'prompt' or 'input_ids', got list"),
    ('{"prompt": "a b", "input_ids": [1, 2]}', "line 2: give exactly one of 'prompt' (text) or 'input_ids'"),
    ('{"id": "x"}', "line 2: give exactly one of 'prompt' (text) or 'input_ids'"),
    ('{"prompt": "a b", "max_tokens": 4}', "line 2: unknown key 'max_tokens' (allowed: id, prompt, input_ids, "
                                          "max_new_tokens)"),
    ('{"prompt": "  "}', "line 2: 'prompt' must be non-empty text"),
    ('{"input_ids": [1, -2]}', "line 2: 'input_ids' must be a non-empty list of non-negative integers"),
    ('{"input_ids": [1, 2], "max_new_tokens": 0}', "line 2: 'max_new_tokens' must be an integer >= 1, got 0"),
    ('{"input_ids": [1, 2], "id": "has space"}', "line 2: 'id' must be a non-empty string"),
    ('{"input_ids": [1, 2], "id": "a"}', "line 2: id 'a' is already used on line 1"),
])
def test_a_bad_line_is_an_error_naming_its_number(tmp_path, line, message):
    path = write(tmp_path, '{"input_ids": [1, 2], "id": "a"}', line)
    with pytest.raises(NeoxUsageError) as exc:
        plans(path)
    assert str(exc.value).startswith(f"--neox-prompts {path} {message}"), str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_byte_order_mark_is_read_past_and_crlf_lines_are_lines(tmp_path):
    """Windows editors write both; with the mark, line 1 was "not valid JSON (Unexpected UTF-8 BOM ...)"."""
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "input_ids": [5, 6]}\r\n{"input_ids": [7, 8]}\r\n')
    assert [(p.id, p.rows) for p in plans(path)] == [("prompt-a", ((5, 6),)), ("prompt-line2", ((7, 8),))]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(NeoxUsageError, match="prompts.jsonl: no such file$"):
        read_prompt_file(tmp_path / "prompts.jsonl")
    with pytest.raises(NeoxUsageError, match="no prompts in the file"):
        read_prompt_file(write(tmp_path, "", "  "))


def test_too_long_for_the_context_is_refused_with_the_numbers(tmp_path):
    path = write(tmp_path, json.dumps({"id": "long", "input_ids": list(range(60)), "max_new_tokens": 8}))
    with pytest.raises(NeoxUsageError) as exc:
        plans(path, context=64)
    assert str(exc.value) == (f"--neox-prompts {path} line 1 (long): prompt of 60 tokens + 8 new tokens = 68 "
                              "does not fit the model's context of 64 tokens")
    assert plans(path, context=68)[0].total_tokens == 68


def test_ids_outside_the_vocabulary_and_one_token_prompts_are_refused(tmp_path):
    with pytest.raises(NeoxUsageError, match=r"line 1 \(line1\): token id 100 is outside the model's "
                                             r"vocabulary of 100"):
        plans(write(tmp_path, '{"input_ids": [1, 100]}'))
    with pytest.raises(NeoxUsageError, match=r"line 1 \(line1\): the prompt is 1 token\(s\); the checks need "
                                             r"at least 2"):
        plans(write(tmp_path, '{"prompt": "one"}'))


# --- through the plugin -----------------------------------------------------------------------------------

PROMPT_TESTS = """
def test_greedy(neox, neox_generation_case):
    ref = neox.reference()
    gen = neox.generation(ref, neox_generation_case)
    assert [len(r) for r in gen.tokens] == [neox_generation_case.plan.max_new_tokens]
    print("ROWS", neox_generation_case.id, list(neox_generation_case.batch.rows[0]))

def test_scored(neox, neox_case):
    pass
"""


def test_prompts_add_cases_to_the_generation_and_scoring_tests(pytester, synthetic_14m):
    from transformers import AutoTokenizer

    from pytest_neoxmii.registry import lookup
    from pytest_neoxmii.weights import synthetic_directory

    cache = Path(synthetic_14m[3].split("=", 1)[1])
    tok = AutoTokenizer.from_pretrained(str(synthetic_directory(lookup("pythia-14m"), 0, cache)))
    words = tok.convert_ids_to_tokens([11, 12, 13, 14])     # text the synthetic tokenizer reads back
    pytester.makepyfile(test_user=PROMPT_TESTS)
    pytester.path.joinpath("mine.jsonl").write_text(
        json.dumps({"id": "words", "prompt": " ".join(words), "max_new_tokens": 3}) + "\n"
        + json.dumps({"input_ids": [7, 8, 9]}) + "\n")
    result = pytester.runpytest(*synthetic_14m, "--neox-backends=hf", "--neox-prompts=mine.jsonl", "-s",
                                "-k", "prompt-")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*ROWS prompt-words [[]11, 12, 13, 14[]]*", "*ROWS prompt-line2 [[]7, 8, 9[]]*"])
    collected = pytester.runpytest(*synthetic_14m, "--neox-prompts=mine.jsonl", "--collect-only", "-q")
    assert sum("[prompt-" in line for line in collected.outlines) == 4
    without = pytester.runpytest(*synthetic_14m, "--collect-only", "-q")
    assert sum("::" in line for line in collected.outlines) == sum("::" in line for line in without.outlines) + 4


def test_a_bad_prompt_file_is_a_usage_error(pytester, synthetic_14m, assert_usage_error):
    pytester.path.joinpath("mine.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 2], "id": 3}\n')
    result = pytester.runpytest(*synthetic_14m, "--neox-prompts=mine.jsonl")
    assert_usage_error(result, f"--neox-prompts {pytester.path / 'mine.jsonl'} line 2: 'id' must be a non-empty "
                               "string of letters, digits and . _ : -, got 3")
    too_long = json.dumps({"input_ids": [1] * 2040, "id": "big"})
    pytester.path.joinpath("mine.jsonl").write_text(too_long + "\n")
    result = pytester.runpytest(*synthetic_14m, "--neox-max-new-tokens=32", "--neox-prompts=mine.jsonl")
    assert_usage_error(result, f"--neox-prompts {pytester.path / 'mine.jsonl'} line 1 (big): prompt of 2040 "
                               "tokens + 32 new tokens = 2072 does not fit the model's context of 2048 tokens")
