"""Users' own prompts (--neox-prompts FILE): JSON Lines, one object per line,

    {"id": "greeting", "prompt": "Hello, my name is", "max_new_tokens": 16}
    {"input_ids": [510, 3158, 8516], "id": "ids-only"}

`prompt` (text, tokenized by the model's tokenizer) or `input_ids`; optional `max_new_tokens` (default
--neox-max-new-tokens) and `id` (default `line<N>`). Each line becomes one case (batch 1) for the greedy,
teacher-forced and golden checks, with the test id `prompt-<id>`. Every problem is a one-line error naming
the file and the line number; a prompt that does not fit the model's context is refused with the numbers."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pytest_neoxmii.cases import CasePlan
from pytest_neoxmii.errors import NeoxUsageError

FAMILY = "prompt"
KEYS = ("id", "prompt", "input_ids", "max_new_tokens")
_ID = re.compile(r"^[A-Za-z0-9_.:-]+$")
MIN_PROMPT_TOKENS = 2     # teacher-forced scoring needs at least one target after the first token


@dataclass(frozen=True)
class PromptLine:
    line: int                          # 1-based line number in the file
    id: str
    text: str | None
    input_ids: tuple[int, ...] | None
    max_new_tokens: int | None


def read_prompt_file(path: Path) -> list[PromptLine]:
    """Parse and validate the file's shape (no tokenizer needed). Blank lines are skipped."""
    where = f"--neox-prompts {path}"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")    # (a Windows editor's byte order mark, if any, dropped)
    except FileNotFoundError:
        raise NeoxUsageError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NeoxUsageError(f"{where}: cannot be read ({exc})") from None
    out: list[PromptLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        entry = _parse_line(raw, f"{where} line {number}", number)
        if entry.id in seen:
            raise NeoxUsageError(f"{where} line {number}: id '{entry.id}' is already used on line {seen[entry.id]}")
        seen[entry.id] = number
        out.append(entry)
    if not out:
        raise NeoxUsageError(f"{where}: no prompts in the file (one JSON object per line)")
    return out


def _parse_line(raw: str, where: str, number: int) -> PromptLine:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NeoxUsageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise NeoxUsageError(f"{where}: expected a JSON object with 'prompt' or 'input_ids', got "
                             f"{type(obj).__name__}")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise NeoxUsageError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(KEYS)})")
    if ("prompt" in obj) == ("input_ids" in obj):
        raise NeoxUsageError(f"{where}: give exactly one of 'prompt' (text) or 'input_ids' (token ids)")
    text = obj.get("prompt")
    if "prompt" in obj and (not isinstance(text, str) or not text.strip()):
        raise NeoxUsageError(f"{where}: 'prompt' must be non-empty text")
    ids = obj.get("input_ids")
    if "input_ids" in obj:
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            and i >= 0 for i in ids):
            raise NeoxUsageError(f"{where}: 'input_ids' must be a non-empty list of non-negative integers")
        ids = tuple(ids)
    new = obj.get("max_new_tokens")
    if "max_new_tokens" in obj and (not isinstance(new, int) or isinstance(new, bool) or new < 1):
        raise NeoxUsageError(f"{where}: 'max_new_tokens' must be an integer >= 1, got {new!r}")
    case_id = obj.get("id", f"line{number}")
    if not isinstance(case_id, str) or not _ID.match(case_id):
        raise NeoxUsageError(f"{where}: 'id' must be a non-empty string of letters, digits and . _ : -, got "
                             f"{case_id!r}")
    return PromptLine(number, case_id, text, ids, new)


def prompt_plans(lines: list[PromptLine], path: Path, *, tokenizer, context_length: int, vocab_size: int,
                 default_max_new_tokens: int) -> list[CasePlan]:
    """One batch-1 generating case per line, its ids fixed now (tokenizer needed only for text prompts)."""
    plans = []
    for entry in lines:
        where = f"--neox-prompts {path} line {entry.line} ({entry.id})"
        if entry.input_ids is not None:
            ids = entry.input_ids
            bad = next((i for i in ids if i >= vocab_size), None)
            if bad is not None:
                raise NeoxUsageError(f"{where}: token id {bad} is outside the model's vocabulary of {vocab_size}")
        else:
            ids = tuple(tokenizer(entry.text, add_special_tokens=False)["input_ids"])
        if len(ids) < MIN_PROMPT_TOKENS:
            raise NeoxUsageError(f"{where}: the prompt is {len(ids)} token(s); the checks need at least "
                                 f"{MIN_PROMPT_TOKENS}")
        new = entry.max_new_tokens or default_max_new_tokens
        if len(ids) + new > context_length:
            raise NeoxUsageError(f"{where}: prompt of {len(ids)} tokens + {new} new tokens = {len(ids) + new} "
                                 f"does not fit the model's context of {context_length} tokens")
        plans.append(CasePlan(f"{FAMILY}-{entry.id}", FAMILY, (len(ids),), True, new, rows=(ids,)))
    return plans
