"""The small interface every backend implements (hf, ds, mii, zero), in the spirit of vLLM's HfRunner and
VllmRunner: the same calls and the same output types, whatever runs underneath. An engine also declares its
traits here, as class attributes, so that the session, the judges and the report read what an engine can
do instead of comparing its name."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

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
    workspace_bytes: int | None = None    # DeepSpeed's inference workspace per GPU (deepspeed_inference)

    def describe(self) -> str:
        parts = [f"{self.backend}: {self.dtype} on {self.device}", f"tp={self.tensor_parallel}",
                 f"kernels {self.kernels}"]
        if self.gpu_memory_bytes is not None:
            parts.append(f"GPU memory {self.gpu_memory_bytes / 2**20:.0f} MiB")
        if self.gpu_tensor_bytes is not None:
            parts.append(f"GPU tensors {self.gpu_tensor_bytes / 2**20:.0f} MiB")
        if self.workspace_bytes is not None:
            parts.append(f"DeepSpeed workspace {self.workspace_bytes / 2**20:.0f} MiB per GPU")
        parts.extend(self.notes)
        return ", ".join(parts)


@dataclass(frozen=True)
class LoadRequest:
    """Everything the session knows when it loads an engine; each engine takes what it needs."""

    path: Path                       # the model directory
    dtype: str                       # "fp16", "bf16", "fp32"
    device: str                      # "cpu", "cuda:0"
    tp: int = 1                      # tensor-parallel degree (1 for engines that are not tensor-parallel)
    max_tokens: int = 1024           # DeepSpeed's workspace: the longest case, prompt plus output
    max_batch: int = 1               # the largest batch of the cases (DeepSpeed sizes its workspace by it)
    spec: object = None              # registry.ModelSpec of the model
    zero_nvme: Path | None = None    # --neox-zero-nvme
    engine_config: dict | None = None   # the user's serving config (--neox-ds-config / --neox-mii-config)


class Backend(abc.ABC):
    """A loaded model that can generate greedily and score teacher-forced. Load happens in the
    constructor (or a factory); close() must release every resource (GPU memory, processes, ports)."""

    info: BackendInfo

    # -- traits (class attributes; the registry in backends/__init__.py reads them) ------------------------
    description = ""             # one line: --help, the report header
    label = ""                   # the plots' legend (default: the engine's name)
    colour = "#9467bd"           # the plots' colour
    is_reference = False         # the HF reference: the ground truth every other engine is judged against
    can_score = True             # teacher-forced scores: False makes those cases skip with score()'s reason
    # Its users query text (MII's query API): such an engine has .tokenizer and query_texts(texts,
    # max_new_tokens), the call its users wait for and the one its latency is timed through.
    output_is_text = False
    # Its judged generations are its text re-tokenized: special tokens such as the pad token are dropped in
    # decoding, so the greedy judge puts the reference through the same channel first. MII's engines are not:
    # what they generated is recorded where they run (generation_capture.py), since decoding is lossy.
    generations_from_text = False
    needs_deepspeed = False      # runs on DeepSpeed's accelerator: on a CPU, DeepSpeed's dtypes bound it
    injects_kernels = False      # DeepSpeed kernel injection on CUDA (its inference op is built before load)
    weights_on_gpu = True        # False: weights stay in CPU/NVMe memory, so GPU memory never rules it out
    # On the CPU, in the dtype the checkpoint is stored in, its weights are the checkpoint file's own pages,
    # mapped, which every process mapping the file shares (transformers maps safetensors); False: it holds a
    # copy of its own. The session's host-memory fit counts shared pages once (reference_first.host_footprint).
    shares_checkpoint_pages = False
    runs_in_worker = False       # the model is in other processes: no .model here, time with a wall clock
    # Loaded in a worker process of its own (backends/isolated.py), never in the test process: the engine
    # keeps process-wide state or can abort its process (every DeepSpeed engine).
    isolated = False
    requires: tuple[str, ...] = ()   # packages the engine imports: one missing is a skip, checked before a worker starts
    # Modules its worker imports before it loads, in order: a fork server imports them once and forks every
    # such worker with them imported (deploy/forkserver.py). An engine that needs none starts from torch alone.
    worker_imports: tuple[str, ...] = ()

    # What an engine computes and how it is judged and shown, as opposed to where it runs (runs_in_worker,
    # isolated, requires): what stands in for an engine in the test process (a worker's proxy) answers these
    # from the engine's class (take_traits).
    ENGINE_TRAITS = ("description", "label", "colour", "is_reference", "can_score", "output_is_text",
                     "generations_from_text", "needs_deepspeed", "injects_kernels", "weights_on_gpu")
    PLACEMENT_TRAITS = ("runs_in_worker", "isolated", "requires", "worker_imports", "shares_checkpoint_pages")

    def take_traits(self, engine_cls: type, names: tuple[str, ...] = ENGINE_TRAITS) -> None:
        """Answer the traits `names` as the engine class `engine_cls` does (per instance)."""
        for name in names:
            setattr(self, name, getattr(engine_cls, name))

    @classmethod
    def check_can_run(cls, request: LoadRequest) -> None:
        """Raise BackendUnavailable when the engine cannot run for this request, from what the test process
        knows cheaply (no import of the engine's packages): an isolated engine is then not even started."""

    @classmethod
    def ahead_workers(cls, request: LoadRequest) -> int:
        """How many workers of this deployment may share the session's calls worked ahead (ahead_share.py):
        more than one for an isolated engine whose calls are slow while the GPU idles."""
        return 1

    @classmethod
    def missing(cls, package: str) -> str:
        """The skip reason when a package of `requires` is not installed (an engine may add how to install it)."""
        return f"the {package!r} package is not installed here"

    @classmethod
    def load(cls, request: LoadRequest) -> "Backend":
        """Load the engine for the session's request (the registry calls this)."""
        raise NotImplementedError(f"{cls.__name__} does not say how to load it: define load(request)")

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

    def ask_to_exit(self) -> None:
        """Start winding down without waiting, before close(): a session ending asks every backend first, so
        that worker processes exit side by side. Nothing to do for a model held in this process."""

    def ended_on_its_own(self) -> str | None:
        """How its processes ended before anyone asked them to (one line), or None: a worker the kernel's OOM
        killer took after its last test leaves no failed test behind, so the summary says it. Nothing for a
        model held in this process."""
        return None

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
