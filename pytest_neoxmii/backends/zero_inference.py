"""ZeRO-Inference: ZeRO stage 3 with parameters offloaded to CPU memory (or NVMe), none resident on the
GPU; layers are fetched as they run. Slower than DS inference by design, for models that do not fit."""
from __future__ import annotations

from pathlib import Path

import torch

from pytest_neoxmii.backends import planted_fault
from pytest_neoxmii.backends.base import BackendInfo, LoadRequest
from pytest_neoxmii.backends.deepspeed_inference import init_distributed_env
from pytest_neoxmii.backends.hf import load_hf_model
from pytest_neoxmii.backends.torch_model import TorchModelBackend, judged_attention_notes
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.injection import gpu_used_bytes, held_since


def zero_config(hidden_size: int, dtype: str, nvme_path: Path | None) -> dict:
    """Bucket sizes from the hidden size, as DeepSpeed's ZeRO-Inference guidance derives them: one
    hidden x hidden matrix per reduce bucket, prefetch 90% of it; persistence threshold 0 so that no
    parameter stays resident on the GPU."""
    offload = {"device": "nvme", "nvme_path": str(nvme_path), "pin_memory": True} if nvme_path else \
        {"device": "cpu", "pin_memory": True}
    return {
        "fp16": {"enabled": dtype == "fp16"},
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": {
            "stage": 3,
            "offload_param": offload,
            "overlap_comm": True,
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 0,
        },
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


AHEAD_WORKERS_ENV = "NEOXMII_ZERO_AHEAD_WORKERS"


def check_async_io() -> None:
    """ZeRO swaps its parameters to NVMe through DeepSpeed's async_io op, which builds only against libaio.
    Without it, deepspeed.initialize failed in the worker with a 40-line traceback ending in "Unable to JIT load
    the async_io op" (seen on the lent H200 machine and on the CPU machine): a machine that lacks something,
    which a skip says in one line."""
    from deepspeed.ops.op_builder import AsyncIOBuilder
    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise BackendUnavailable("--neox-zero-nvme needs DeepSpeed's async_io op, which builds against libaio, and "
                                 "libaio's library and headers were not found (install libaio-dev, or "
                                 "libaio-devel); without --neox-zero-nvme ZeRO offloads to CPU memory")


class ZeroInferenceBackend(TorchModelBackend):
    description = "ZeRO-Inference, stage 3 with parameters offloaded"
    label = "ZeRO-Inference"
    colour = "#d62728"
    needs_deepspeed = True
    worker_imports = (*TorchModelBackend.worker_imports, "deepspeed")
    weights_on_gpu = False       # offloaded to CPU memory or NVMe by design
    shares_checkpoint_pages = False   # its partitions are its own copy (pythia-1b fp16: 2237 MiB of its own)
    isolated = True              # ZeRO's engine state and its patches stay in its worker
    requires = ("deepspeed",)

    @classmethod
    def check_can_run(cls, request: LoadRequest) -> None:
        if request.zero_nvme is not None and not Path(request.zero_nvme).is_dir():
            raise BackendUnavailable(f"--neox-zero-nvme={request.zero_nvme} is not a directory")

    @classmethod
    def ahead_workers(cls, request: LoadRequest) -> int:
        # Each forward fetches every layer's parameters from CPU memory, bound by launches and PCIe with the
        # GPU mostly idle: three workers share the session's parity calls (one H200, pythia-160m synthetic,
        # same machine: warm session 108.4 s with two, 95.0 s with three). NEOXMII_ZERO_AHEAD_WORKERS sets
        # how many; the session still adds only what host memory and the GPU take. Not with NVMe: the
        # workers would swap into the same folder under the same rank's file names.
        if request.zero_nvme is not None:
            return 1
        if not request.device.startswith("cuda"):   # on the CPU the helpers would compute on the same cores
            return 1
        from pytest_neoxmii.deploy.processes import env_float
        return max(int(env_float(AHEAD_WORKERS_ENV, 3)), 1)

    @classmethod
    def load(cls, request: LoadRequest) -> "ZeroInferenceBackend":
        return cls(request.path, request.dtype, request.device, request.spec.hidden_size, request.zero_nvme)

    def __init__(self, path: Path, dtype: str, device: str, hidden_size: int, nvme_path: Path | None = None):
        if nvme_path is not None and not Path(nvme_path).is_dir():
            raise BackendUnavailable(f"--neox-zero-nvme={nvme_path} is not a directory")
        if nvme_path is not None:
            check_async_io()
        on_gpu = device.startswith("cuda")
        init_distributed_env(device)
        import deepspeed

        self.device = device
        config = zero_config(hidden_size, dtype, nvme_path)
        before = gpu_used_bytes(device)
        tensors_before = torch.cuda.memory_allocated(device) if on_gpu else None
        # Loaded whole into CPU memory, then partitioned and offloaded by deepspeed.initialize
        # (transformers' HfDeepSpeedConfig route would partition while loading but needs accelerate).
        model = load_hf_model(path, dtype, "cpu")
        # A validation run's planted defect, in the whole weight before ZeRO partitions it; nothing when unset.
        planted = planted_fault.plant(model)
        engine = deepspeed.initialize(model=model, config_params=config)[0]
        engine.module.eval()
        self.model = engine.module
        self._engine = engine
        held, measured = held_since(device, before)
        tensors = torch.cuda.memory_allocated(device) - tensors_before if on_gpu else None
        where = f"NVMe at {nvme_path}" if nvme_path else "CPU memory"
        self.info = BackendInfo(backend="zero", dtype=dtype, device=device, kernels="none (ZeRO stage 3)",
                                gpu_memory_bytes=held, gpu_tensor_bytes=tensors,
                                notes=[f"parameters offloaded to {where}"] + ([measured] if measured else [])
                                + judged_attention_notes(device) + planted_fault.note(planted))

    def _layers(self):
        return self.model.gpt_neox.layers

    # ZeRO fetches each layer's parameters to the GPU and partitions them back after it ran; torch's
    # allocator keeps the freed blocks for this process (measured: 23.6 GiB held after working ahead on
    # pythia-12b with synthetic weights, the whole fp16 model, one H200, while two engines and the reference
    # shared the GPU). Each request gives them back, so that "weights off the GPU" holds between requests (a
    # timed round calls the model directly, and keeps the cache).
    def generate(self, batch, max_new_tokens: int, top_k: int = 5):
        return self._giving_back_cache(super().generate, batch, max_new_tokens, top_k)

    def score(self, batch):
        return self._giving_back_cache(super().score, batch)

    def trace(self, batch):
        return self._giving_back_cache(super().trace, batch)

    def _giving_back_cache(self, call, *args):
        try:
            return call(*args)
        finally:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def close(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            try:
                engine.destroy()
            except Exception:
                pass
        self._engine = None
        self._release()
