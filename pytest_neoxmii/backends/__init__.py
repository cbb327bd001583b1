"""Backend loaders by name. Each returns an object implementing backends.base.Backend; the rest of the
plugin (parity, baselines, report) only ever sees that interface."""
from __future__ import annotations

from pytest_neoxmii.backends.base import Backend, BackendInfo

BACKEND_DESCRIPTIONS = {
    "hf": "Hugging Face transformers reference (eager)",
    "ds": "DeepSpeed inference, kernel injection (deepspeed.init_inference)",
    "mii": "DeepSpeed-MII legacy in-process deployment",
    "zero": "ZeRO-Inference, stage 3 with parameters offloaded",
}


def load_backend(name: str, *, path, dtype: str, device: str, tp: int, max_tokens: int, spec,
                 max_batch: int = 1, zero_nvme=None) -> Backend:
    """Import lazily: a missing optional package is a skip for that backend alone, not an import error."""
    if name == "hf":
        from pytest_neoxmii.backends.hf import HFBackend
        return HFBackend(path, dtype, device)
    if name == "ds":
        from pytest_neoxmii.backends.deepspeed_inference import DeepSpeedBackend
        return DeepSpeedBackend(path, dtype, device, tp, max_tokens, max_batch)
    if name == "mii":
        from pytest_neoxmii.backends.mii_legacy import MiiBackend
        return MiiBackend(path, dtype, device, tp, max_tokens, max_batch)
    if name == "zero":
        from pytest_neoxmii.backends.zero_inference import ZeroInferenceBackend
        return ZeroInferenceBackend(path, dtype, device, spec.hidden_size, zero_nvme)
    raise ValueError(f"unknown backend {name!r}")


__all__ = ["Backend", "BackendInfo", "BACKEND_DESCRIPTIONS", "load_backend"]
