"""Backend loaders by name. Each returns an object implementing backends.base.Backend; the rest of the
plugin (parity, baselines, report) only ever sees that interface."""
from __future__ import annotations

from pytest_neoxmii.backends.base import Backend, BackendInfo

BACKEND_DESCRIPTIONS = {
    "hf": "Hugging Face transformers reference (eager)",
    "ds": "DeepSpeed inference, kernel injection (init_inference; tp >= 2: under the DeepSpeed launcher)",
    "mii": "DeepSpeed-MII legacy in-process deployment (tp >= 2: LOCAL gRPC server deployment)",
    "zero": "ZeRO-Inference, stage 3 with parameters offloaded",
}


def load_backend(name: str, *, path, dtype: str, device: str, tp: int, max_tokens: int, spec,
                 max_batch: int = 1, zero_nvme=None, engine_config: dict | None = None) -> Backend:
    """Import lazily: a missing optional package is a skip for that backend alone, not an import error.

    engine_config: the user's serving config of ds (init_inference's config) or mii (mii_config), merged over
    the backend's defaults (serving_config.merged) and deployed as it is.

    ds and mii keep their names at every tp; tp >= 2 runs out of process (one process per GPU): ds under the
    DeepSpeed launcher (backends/ds_launcher.py), mii as MII's LOCAL gRPC deployment (backends/mii_server.py)."""
    if tp > 1 and name in ("ds", "mii"):
        return _load_tensor_parallel(name, path=path, dtype=dtype, device=device, tp=tp, max_tokens=max_tokens,
                                     max_batch=max_batch, engine_config=engine_config)
    if name == "hf":
        from pytest_neoxmii.backends.hf import HFBackend
        return HFBackend(path, dtype, device)
    if name == "ds":
        from pytest_neoxmii.backends.deepspeed_inference import DeepSpeedBackend
        return DeepSpeedBackend(path, dtype, device, tp, max_tokens, max_batch, engine_config=engine_config)
    if name == "mii":
        from pytest_neoxmii.backends.mii_legacy import MiiBackend
        return MiiBackend(path, dtype, device, tp, max_tokens, max_batch, engine_config=engine_config)
    if name == "zero":
        from pytest_neoxmii.backends.zero_inference import ZeroInferenceBackend
        return ZeroInferenceBackend(path, dtype, device, spec.hidden_size, zero_nvme)
    raise ValueError(f"unknown backend {name!r}")


# A deployment that failed to start (its log tail is in the error) is not started again for every test
# that asks: each attempt can take minutes. Keyed by what was deployed.
_failed_deployments: dict[tuple, Exception] = {}


def _load_tensor_parallel(name: str, *, path, dtype: str, device: str, tp: int, max_tokens: int,
                          max_batch: int, engine_config: dict | None = None) -> Backend:
    from pytest_neoxmii.deploy.processes import DeploymentError
    from pytest_neoxmii.injection import InjectionFailed
    key = (name, str(path), dtype, tp, max_tokens, max_batch, repr(sorted((engine_config or {}).items())))
    if key in _failed_deployments:
        raise DeploymentError(f"{name} tp={tp} failed to deploy earlier in this session, not retried: "
                              f"{_failed_deployments[key]}")
    try:
        if name == "ds":
            from pytest_neoxmii.backends.ds_launcher import DsLauncherBackend
            return DsLauncherBackend(path, dtype, device, tp, max_tokens, max_batch, engine_config=engine_config)
        from pytest_neoxmii.backends.mii_server import MiiServerBackend
        return MiiServerBackend(path, dtype, device, tp, max_tokens, max_batch, engine_config=engine_config)
    except (DeploymentError, InjectionFailed) as exc:
        _failed_deployments[key] = exc
        raise


__all__ = ["Backend", "BackendInfo", "BACKEND_DESCRIPTIONS", "load_backend"]
