"""The small interface every backend implements (hf, ds, mii, zero), in the spirit of vLLM's HfRunner and
VllmRunner: the same calls and the same output types, whatever runs underneath."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

from pytest_neoxmii.outputs import Generation, LayerTrace, PromptBatch, Scores


@dataclass
class BackendInfo:
    """What actually ran: shown in the report header and the terminal summary, stored beside baselines."""

    backend: str                      # "hf", "ds", "mii", "zero"
    dtype: str                        # "fp16", "bf16", "fp32"
    device: str                       # "cpu", "cuda:0", ...
    tensor_parallel: int = 1
    kernels: str = "none"             # "injected 12/12 layers", "none (CPU)", ...
    notes: list[str] = field(default_factory=list)
    gpu_memory_bytes: int | None = None   # device-wide GPU memory the load added (communicators included)
    gpu_tensor_bytes: int | None = None   # of which torch tensors (weights resident on the GPU)

    def describe(self) -> str:
        parts = [f"{self.backend}: {self.dtype} on {self.device}", f"tp={self.tensor_parallel}",
                 f"kernels {self.kernels}"]
        if self.gpu_memory_bytes is not None:
            parts.append(f"GPU memory {self.gpu_memory_bytes / 2**20:.0f} MiB")
        if self.gpu_tensor_bytes is not None:
            parts.append(f"GPU tensors {self.gpu_tensor_bytes / 2**20:.0f} MiB")
        parts.extend(self.notes)
        return ", ".join(parts)


class Backend(abc.ABC):
    """A loaded model that can generate greedily and score teacher-forced. Load happens in the
    constructor (or a factory); close() must release every resource (GPU memory, processes, ports)."""

    info: BackendInfo
    # The generated tokens reach the session as text (MII's query API): special tokens such as the pad token
    # are dropped in decoding, so the greedy judge puts the reference through the same channel first.
    output_is_text = False

    @abc.abstractmethod
    def generate(self, batch: PromptBatch, max_new_tokens: int, top_k: int = 5) -> Generation:
        """Greedy generation of exactly max_new_tokens per row (no early stop on EOS)."""

    @abc.abstractmethod
    def score(self, batch: PromptBatch) -> Scores:
        """Teacher-forced log-softmax over the vocabulary at every position of the prompt rows."""

    def trace(self, batch: PromptBatch) -> LayerTrace:
        """Per-layer hidden states, for localising a divergence. Backends that cannot expose them raise."""
        raise NotImplementedError(f"{self.info.backend} cannot expose per-layer hidden states")

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything the backend holds. Safe to call twice."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
