"""Backend-neutral inputs and outputs. Every backend takes a PromptBatch and returns these types, so the
parity engine, the baseline store and the report never need to know which backend produced them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PromptBatch:
    """Prompt rows as token ids. Rows of unequal length are left-padded (decoder-only generation)."""

    rows: tuple[tuple[int, ...], ...]
    pad_token_id: int = 0

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def max_len(self) -> int:
        return max(len(r) for r in self.rows)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both [batch, max_len] int64, padding on the left."""
        width = self.max_len
        ids = torch.full((self.batch_size, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((self.batch_size, width), dtype=torch.long)
        for i, row in enumerate(self.rows):
            if row:
                ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row):] = 1
        return ids, mask


@dataclass
class Generation:
    """Greedy generation: the new tokens of each row and, per step, the top-k logprobs of the full
    (unprocessed) next-token distribution, highest first."""

    tokens: list[list[int]]
    top_logprobs: list[list[list[tuple[int, float]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.top_logprobs and len(self.top_logprobs) != len(self.tokens):
            raise ValueError("top_logprobs must have one entry per row")


@dataclass
class Scores:
    """Teacher-forced scoring: log-softmax over the vocabulary at every position.

    logprobs is float32 [batch, max_len, vocab] on the CPU, aligned with PromptBatch.padded() (left padding);
    mask is bool [batch, max_len], True where the position holds a real token."""

    logprobs: torch.Tensor
    mask: torch.Tensor


@dataclass
class LayerTrace:
    """Hidden states after the embedding (index 0) and after each transformer layer, for localising a
    divergence. Each tensor is float32 [batch, max_len, hidden] on the CPU."""

    hidden_states: list[torch.Tensor]
