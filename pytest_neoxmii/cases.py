"""The shipped test cases. Prompts are slices of one fixed English text, tokenized by the model's own
tokenizer, so they are real text for real checkpoints and the same on every run. The plan (ids, lengths)
needs no tokenizer, so tests can be parametrized at collection; content is filled in when a test runs.
Ids are readable in pytest output: family, batch size, prompt length(s)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from pytest_neoxmii.errors import NeoxUsageError
from pytest_neoxmii.outputs import PromptBatch
from pytest_neoxmii.fixed_text import FIXED_TEXT


FAMILIES = ("fixed-text", "short", "medium", "batch", "padded", "long", "context", "prompt")


@dataclass(frozen=True)
class CasePlan:
    id: str
    family: str                  # one of FAMILIES
    lengths: tuple[int, ...]     # prompt length of each row (unequal lengths are left-padded)
    generate: bool               # greedy generation is compared; every case is also scored teacher-forced
    max_new_tokens: int
    start: int = 0               # where in the text the rows start (before the seed moves them)
    rows: tuple[tuple[int, ...], ...] | None = None   # fixed token ids (users' prompts), instead of the text

    @property
    def padded(self) -> bool:
        """Rows of unequal length: the shorter ones are left-padded."""
        return len(set(self.lengths)) > 1

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens of the longest row: what DeepSpeed's workspace must hold."""
        return max(self.lengths) + (self.max_new_tokens if self.generate else 0)


@dataclass(frozen=True)
class Case:
    plan: CasePlan
    batch: PromptBatch

    @property
    def id(self) -> str:
        return self.plan.id


def row_alone(case: Case, i: int) -> Case:
    """Row i of `case` as a case of its own, without padding, under an id of its own."""
    row = case.batch.rows[i]
    plan = replace(case.plan, id=f"{case.plan.id}-row{i}", lengths=(len(row),), rows=(row,))
    return Case(plan, PromptBatch(rows=(row,), pad_token_id=case.batch.pad_token_id))


def plan_cases(context_length: int, max_new_tokens: int, case_set: str = "default") -> list[CasePlan]:
    longest_prompt = context_length - max_new_tokens
    if longest_prompt < 4:
        raise NeoxUsageError(f"--neox-max-new-tokens={max_new_tokens} leaves no room for a prompt in the "
                             f"model's context of {context_length} tokens")

    def gen(family, lengths, start=0):
        lens = "x".join(str(n) for n in lengths) if len(set(lengths)) > 1 else str(lengths[0])
        return CasePlan(f"{family}-b{len(lengths)}-len{lens}", family, tuple(lengths), True, max_new_tokens,
                        start)

    plans = [
        CasePlan("fixed-text", "fixed-text", (0,), False, 0),   # the whole fixed text, for perplexity
        gen("short", [4]),
        gen("short", [16], start=1),
        gen("medium", [128]),
        gen("batch", [32, 32, 32, 32]),
        gen("padded", [8, 64, 23, 41]),
        gen("long", [longest_prompt]),
    ]
    if case_set == "full":
        plans += [
            gen("medium", [min(512, longest_prompt)], start=2),
            gen("long", [min(1024, longest_prompt)], start=3),
            gen("batch", [64] * 8, start=4),
            gen("padded", [min(n, longest_prompt) for n in (5, 300, 17, 128, 64, 200, 33, 512)], start=5),
            CasePlan(f"context-b1-len{context_length}", "context", (context_length,), False, 0, 6),
            CasePlan(f"context-b2-len{context_length}x{context_length // 2}", "context",
                     (context_length, context_length // 2), False, 0, 7),
        ]
    return plans


def text_tokens(tokenizer) -> list[int]:
    ids = tokenizer(" ".join(FIXED_TEXT), add_special_tokens=False)["input_ids"]
    if len(ids) < 16:
        raise NeoxUsageError("the model's tokenizer turns the fixed text into fewer than 16 tokens")
    return list(ids)


def materialize(plan: CasePlan, tokenizer, context_length: int, seed: int = 0) -> Case:
    """Token ids for a plan. `seed` moves where in the text each row starts, nothing else."""
    check_fits_context(plan, context_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if plan.rows is not None:
        return Case(plan, PromptBatch(rows=plan.rows, pad_token_id=pad))
    tokens = text_tokens(tokenizer)
    if plan.family == "fixed-text":
        return Case(plan, PromptBatch(rows=(tuple(tokens[:context_length]),), pad_token_id=pad))
    step = 37 + seed
    rows = tuple(tuple(tokens[((seed + plan.start + i * step) * 7 + j) % len(tokens)] for j in range(n))
                 for i, n in enumerate(plan.lengths))
    return Case(plan, PromptBatch(rows=rows, pad_token_id=pad))


def check_fits_context(plan: CasePlan, context_length: int) -> None:
    """A case longer than the model's context is bad input: say so rather than let positions overflow."""
    if plan.total_tokens > context_length:
        raise NeoxUsageError(f"case {plan.id} needs {plan.total_tokens} tokens (prompt {max(plan.lengths)} + "
                             f"{plan.max_new_tokens} new) but the model's context is {context_length}")
