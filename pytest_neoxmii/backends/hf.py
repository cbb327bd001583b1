"""The Hugging Face transformers reference: fp32 is the ground truth, the chosen low precision its peer."""
from __future__ import annotations

from pathlib import Path

from pytest_neoxmii.backends.base import BackendInfo, LoadRequest
from pytest_neoxmii.backends.torch_model import TorchModelBackend, judged_attention_notes
from pytest_neoxmii.deploy.processes import DeploymentError
from pytest_neoxmii.dtypes import TORCH_DTYPES
from pytest_neoxmii.errors import in_brief
from pytest_neoxmii.injection import gpu_used_bytes


def load_hf_model(path: Path, dtype: str, device: str):
    from transformers import AutoModelForCausalLM
    try:
        # (`dtype`, not `torch_dtype`: transformers 4.57 logs a deprecation for the latter at every load)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=TORCH_DTYPES[dtype])
    except Exception as exc:
        # Weights that do not match their config (the session checked the files are whole): one line, and
        # a deployment that failed, which the session does not retry for each test needing it.
        raise DeploymentError(f"transformers could not load '{path}': {in_brief(exc)}") from exc
    return model.to(device).eval()


class HFBackend(TorchModelBackend):
    description = "Hugging Face transformers reference (PyTorch modules, no injected kernels)"
    label = "HF transformers"
    colour = "#7f7f7f"
    is_reference = True

    @classmethod
    def load(cls, request: LoadRequest) -> "HFBackend":
        return cls(request.path, request.dtype, request.device)

    def __init__(self, path: Path, dtype: str, device: str, name: str = "hf"):
        self.device = device
        before = gpu_used_bytes(device)
        self.model = load_hf_model(path, dtype, device)
        held = gpu_used_bytes(device) - before if before is not None else None
        # The attention transformers chose (sdpa where torch has it), not the word "eager" for all of it.
        attention = getattr(self.model.config, "_attn_implementation", None) or "default"
        self.info = BackendInfo(backend=name, dtype=dtype, device=device, kernels=f"none (HF, {attention} attention)",
                                gpu_memory_bytes=held, notes=judged_attention_notes(device))

    def close(self) -> None:
        self._release()
