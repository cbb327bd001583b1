"""Reference first (issue 9): the HF reference's outputs are computed for every case before a large engine
deploys, and the HF models are then released, so that the fp32 reference, its low-precision peer and the engine
never need the GPU at once.

What stays behind is a ReferenceHandle: the session hands it out for `neox.reference()` / `neox.peer()` from
the first load on, so a fixture that kept it sees the release too. It keeps the BackendInfo (the session's
cache keys and the report read it) and loads the model again only when something the cache cannot answer is
asked (an uncached generate/score/trace, `.model` for latency timing); then it stays loaded until the next
release."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

from pytest_neoxmii.backends.base import Backend
from pytest_neoxmii.fixed_text import FIXED_TEXT
from pytest_neoxmii.registry import DS_WORKSPACE_FREE_BYTES, DTYPE_BYTES, HEADROOM, HOST_RUNTIME_BYTES, ModelSpec

MODES = ("auto", "always", "never")

# The margin of auto's arithmetic: registry.HEADROOM (x1.2), the same rule of thumb `_check_fits` applies to
# one engine, here applied to every model and DeepSpeed workspace (counted on their own: at 2048 tokens and
# batch 4 they are as large as pythia-2.8b's weights), for their activations. A stated rule of thumb, not a
# measurement. Each engine's worker runtime, and what scoring the longest case holds (scoring_bytes: for small
# models more than the margin), are added after the margin, as in ModelSpec.per_gpu_bytes: one memory model
# for `_check_fits`, reference first, prelaunch and the engines' turns.
MARGIN = HEADROOM


class EngineOnGpu(NamedTuple):
    """An engine's share of GPU 0 in the footprint: its weights / tp, its DeepSpeed workspace per GPU
    (ModelSpec.ds_workspace_bytes; 0 without injected kernels), its worker's CUDA runtime per GPU
    (registry.WORKER_RUNTIME_BYTES; 0 in the test process) and what scoring the largest case holds there
    (scoring_bytes; 0 for an engine that does not score)."""
    name: str
    dtype: str
    tp: int = 1
    workspace_bytes: int = 0
    runtime_bytes: int = 0
    scoring_bytes: int = 0

# Every trait of Backend (is_reference, output_is_text, runs_in_worker, ...): a handle answers them from the
# class it stands for, without loading anything.
_TRAITS = Backend.ENGINE_TRAITS + Backend.PLACEMENT_TRAITS


class ReferenceHandle(Backend):
    """A reference backend that can be released and reloaded, under the same BackendInfo."""

    def __init__(self, backend: Backend, loader: Callable[[], Backend]):
        self.info = backend.info
        self.take_traits(type(backend), _TRAITS)   # all of them: the handle runs where its model runs
        self._backend: Backend | None = backend
        self._loader = loader
        self.reloads = 0         # how often a released model was loaded again (the unit tests read it)

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def _model(self) -> Backend:
        if self._backend is None:
            self._backend = self._loader()
            self.reloads += 1
        return self._backend

    def generate(self, batch, max_new_tokens: int, top_k: int = 5):
        return self._model().generate(batch, max_new_tokens, top_k)

    def score(self, batch):
        return self._model().score(batch)

    def trace(self, batch):
        return self._model().trace(batch)

    def release(self) -> bool:
        """Close the model, keep the handle. Returns whether a model was loaded."""
        backend, self._backend = self._backend, None
        if backend is None:
            return False
        backend.close()
        return True

    def close(self) -> None:
        self.release()

    def __getattr__(self, name: str):
        # Only attributes the handle itself lacks get here: .model, .device, ... of the loaded backend.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._model(), name)


@dataclass(frozen=True)
class Footprint:
    """Whether the fp32 reference, its peer and the engines fit together (on GPU 0, or in host memory in a
    CPU session), and the arithmetic in one line."""
    fits: bool
    arithmetic: str


def _gb(n_bytes: float) -> str:
    gb = n_bytes / 1e9
    return f"{gb:.1f} GB" if gb >= 1 else f"{gb:.3g} GB"


def footprint(spec: ModelSpec, reference: str, peer_dtype: str, deployed: list[EngineOnGpu],
              gpu_bytes: int, *, hf_loaded: bool = True, test_process_runtime: int = 0,
              hf_scoring: int = 0) -> Footprint:
    """The HF models sit on GPU 0 whole (unless released: hf_loaded=False), with what scoring the largest case
    holds in the test process while they are loaded (`hf_scoring`: one model scores at a time there); each
    engine in `deployed` (the one about to deploy and those already on the GPU) needs there what
    `ModelSpec.per_gpu_bytes` says of one GPU of it; the test process holds its own runtime there
    (`test_process_runtime`, registry.TEST_PROCESS_RUNTIME_BYTES, kept after a release too), and an engine with
    DeepSpeed's workspace loads only with registry.DS_WORKSPACE_FREE_BYTES free beyond it (once: the engines
    load one after another)."""
    parts = []
    runtimes = [("test process runtime", test_process_runtime)] if test_process_runtime else []
    if hf_loaded:
        parts.append((f"{reference} fp32", spec.weight_bytes("fp32")))
        if peer_dtype != "fp32":                   # an fp32 session's peer is the reference itself
            parts.append((f"{reference} {peer_dtype}", spec.weight_bytes(peer_dtype)))
        if hf_scoring:
            runtimes.append((f"{reference} scoring", hf_scoring))
    for engine in deployed:
        parts.append((f"{engine.name} {engine.dtype}" + (f" / tp={engine.tp}" if engine.tp > 1 else ""),
                      spec.weight_bytes(engine.dtype) / engine.tp))
        if engine.workspace_bytes:
            parts.append((f"{engine.name} workspace", engine.workspace_bytes))
        if engine.runtime_bytes:
            runtimes.append((f"{engine.name} runtime", engine.runtime_bytes))
        if engine.scoring_bytes:
            runtimes.append((f"{engine.name} scoring", engine.scoring_bytes))
    if any(engine.workspace_bytes for engine in deployed):
        runtimes.append(("DeepSpeed's free reserve", DS_WORKSPACE_FREE_BYTES))
    # One sum, the one the line shows: (weights + workspaces) x margin + runtimes, which is the HF models'
    # weights x margin plus each engine's ModelSpec.per_gpu_bytes (a unit test holds the two together).
    return _sum(parts, runtimes, gpu_bytes, "of GPU 0")


class EngineInHost(NamedTuple):
    """An engine's share of host memory in a CPU session: its weights, unless they are the checkpoint's own
    pages (Backend.shares_checkpoint_pages, in the dtype the checkpoint is stored in), its worker
    process's runtime (registry.HOST_RUNTIME_BYTES) where it runs in one, and the teacher-forced scores of it
    that the test process keeps (`scores`: it can score)."""
    name: str
    dtype: str
    shares_checkpoint_pages: bool = False
    in_worker: bool = True
    scores: bool = True


def kept_scores_bytes(plans, vocab_size: int, context_length: int) -> tuple[int, int]:
    """What the test process holds of one model's teacher-forced scores of these cases (float32 log-softmax
    over the vocabulary at every position, cached all session), and, while the largest case is computed, its
    logits and log-softmax side by side. The vocabulary sets it, not the model: 50304 for every Pythia, 0.58 GB
    a model for the default cases and 0.81 GB in the making (pythia-410m's fp32 reference in a 3 GiB container
    was killed by the OOM killer computing them). The fixed text counts one token a word, the fewest a
    byte-level BPE gives (332 words: the synthetic tokenizer's 332 tokens), so that the figure is never more
    than what is kept."""
    # (in the making: the float32 logits and their log-softmax, as scoring_bytes counts an fp32 model's)
    return sum(_score_sizes(plans, vocab_size, context_length)), scoring_bytes(plans, vocab_size, context_length,
                                                                               "fp32")


def _score_sizes(plans, vocab_size: int, context_length: int) -> list[int]:
    """The float32 log-softmax of each case, in bytes: its rows x its longest row x the vocabulary x 4."""
    def positions(plan) -> int:
        return min(context_length, len(FIXED_TEXT)) if plan.family == "fixed-text" else max(plan.lengths)
    return [len(p.lengths) * positions(p) * vocab_size * 4 for p in plans]


def scoring_bytes(plans, vocab_size: int, context_length: int, dtype: str) -> int:
    """What scoring the largest of these cases holds at once on the GPU that scores it (TorchModelBackend.score):
    the model's logits in its dtype, their float32 copy (the logits themselves in fp32) and the float32
    log-softmax. The activations of the forward itself are smaller and stay in the margin. pythia-160m's
    2016-token case: 0.41 GB a float32 copy, 1.01 GB in all for an fp16 model. Its allocator keeps the blocks
    afterwards. Measured: on one H200 with 5.0 GiB free beside another job, the ds worker of pythia-160m ran
    out of memory allocating one such copy (388 MiB), beside zero's worker and the test process that held
    theirs; the weights x 1.2 of the margin are 65 MB for this model (docs/speed-round27)."""
    largest = max(_score_sizes(plans, vocab_size, context_length), default=0)
    copies = 2 if dtype == "fp32" else 2 + DTYPE_BYTES[dtype] / 4
    return int(largest * copies)


def host_footprint(spec: ModelSpec, reference: str, peer_dtype: str, reference_shares_pages: bool,
                   deployed: list[EngineInHost], stored_dtype: str | None, host_bytes: int,
                   scores: tuple[int, int] = (0, 0)) -> Footprint:
    """Whether the fp32 reference, its peer and the engines in `deployed` fit the host's memory together in a
    CPU session. A model loaded in the checkpoint's stored dtype by an engine that maps the file is the
    file's pages, counted once however many processes map them (pythia-1b, synthetic fp16, all five models
    side by side on the 2-core Xeon: 9.3 GB at the peak where the five models' weights add up to 12.2 GB);
    any other model is a copy of its own. The test process, each worker and the fork server that starts them
    hold a runtime besides (registry.HOST_RUNTIME_BYTES), and the test process the scores of every model that
    scores (`scores`: kept_scores_bytes of one model, and of the largest case in the making)."""
    models = [(f"{reference} fp32", "fp32", reference_shares_pages)]
    if peer_dtype != "fp32":                       # an fp32 session's peer is the reference itself
        models.append((f"{reference} {peer_dtype}", peer_dtype, reference_shares_pages))
    models += [(f"{e.name} {e.dtype}", e.dtype, e.shares_checkpoint_pages) for e in deployed]
    mapped = [label for label, dtype, shares in models if shares and stored_dtype is not None and dtype == stored_dtype]
    parts = [(label, spec.weight_bytes(dtype)) for label, dtype, shares in models if label not in mapped]
    if mapped:
        parts.insert(0, (f"checkpoint pages ({stored_dtype}, mapped by {', '.join(mapped)})",
                         spec.weight_bytes(stored_dtype)))
    workers = sum(e.in_worker for e in deployed)
    processes = 1 + workers + (1 if workers else 0)      # the test process, the workers, their fork server
    runtimes = [(f"runtime of {processes} process{'es' if processes > 1 else ''}", processes * HOST_RUNTIME_BYTES)]
    scoring = (2 if peer_dtype != "fp32" else 1) + sum(e.scores for e in deployed)
    kept, in_making = scores
    if kept or in_making:
        runtimes.append((f"scores of {scoring} models", scoring * kept + in_making))
    return _sum(parts, runtimes, host_bytes, "of host memory")


def _sum(parts: list[tuple[str, float]], runtimes: list[tuple[str, float]], available: int,
         where: str) -> Footprint:
    """(parts x margin) + runtimes against the memory `available`, and the arithmetic in one line."""
    held = sum(b for _, b in parts) * MARGIN
    needed = held + sum(b for _, b in runtimes)
    fits = needed <= available

    # A need and a memory that round alike are shown to the hundredth, or in bytes: never "12.9 GB > 12.9 GB".
    def total(n_bytes: float) -> str:
        for digits in (1, 2):
            if f"{needed / 1e9:.{digits}f}" != f"{available / 1e9:.{digits}f}":
                return f"{n_bytes / 1e9:.{digits}f} GB" if n_bytes >= 1e9 else _gb(n_bytes)
        return f"{math.ceil(n_bytes)} bytes"
    arithmetic = (" + ".join(f"{label} {_gb(b)}" for label, b in parts) + f", x {MARGIN}"
                  + (f" = {_gb(held)}, + " + " + ".join(f"{label} {_gb(b)}" for label, b in runtimes)
                     if runtimes else "")
                  + f" = {total(needed)} {'<=' if fits else '>'} {total(available)} {where}")
    return Footprint(fits, arithmetic)
