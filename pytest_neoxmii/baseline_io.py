"""How the acceptance checks use the baseline store: which key and GPU class a result is filed under, what
machine and software it came from, the command that (re)creates a missing baseline, and one-line failures
for unusable files. Shared by latency.py and golden.py; the store itself (storage/) knows nothing of pytest."""
from __future__ import annotations

import os
import shlex
import sys

import pytest

from pytest_neoxmii.errors import BaselineError
from pytest_neoxmii.storage import BaselineKey, BaselineStore

UPDATE_FLAG = "--neox-update-baselines"


def store_for(neox) -> BaselineStore:
    return BaselineStore(neox.options.baseline_dir)


def key_for(neox, backend_name: str, dtype: str, tp: int = 1) -> BaselineKey:
    """Model (registry name), weights (synthetic seed + generator version, hub revision or local digest),
    dtype, backend and tensor-parallel degree. The GPU class is not in the key: it selects an entry inside
    the file, so one file holds the numbers of every GPU kind. A backend deployed with the user's serving
    config (--neox-ds-config / --neox-mii-config) is keyed `<backend>-config-<digest of its content>`: a
    baseline recorded under one config is never compared under another."""
    config = getattr(neox, "serving_configs", {}).get(backend_name)
    backend = backend_name if config is None else f"{backend_name}-config-{config.digest}"
    return BaselineKey(model=neox.model.spec.name, weights=neox.model.weights_key, dtype=dtype,
                       backend=backend, tp=int(tp))


def gpu_class(neox) -> str:
    return neox.hardware.gpu_class


def versions() -> dict[str, str | None]:
    """Versions of torch, transformers, deepspeed and deepspeed-mii (None when not installed), as stored."""
    from pytest_neoxmii.plugin import versions as found
    return {k: (None if v == "not installed" else v) for k, v in found().items()}


def machine_info(hardware) -> dict:
    """GPU name, count and memory, driver and CUDA versions, plus the host: stored beside every latency
    baseline and added to pytest-benchmark's machine_info."""
    import platform
    gpus = [{"name": g.name, "memory_bytes": int(g.total_memory),
             "capability": f"{g.capability[0]}.{g.capability[1]}"} for g in hardware.gpus]
    return {
        "gpu_class": hardware.gpu_class,
        "gpu_name": gpus[0]["name"] if gpus else None,
        "gpu_count": len(gpus),
        "gpu_memory_bytes": gpus[0]["memory_bytes"] if gpus else None,
        "gpus": gpus,
        "cuda_version": hardware.cuda_version,
        "driver_version": hardware.driver_version,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def update_command(config: pytest.Config) -> str:
    """The command that records the missing baseline: this very invocation plus --neox-update-baselines."""
    args = [a for a in config.invocation_params.args if a != UPDATE_FLAG]
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m", "pytest", *args,
                                              UPDATE_FLAG])


def fail_on_bad_file(call):
    """Run a store read; a corrupt or schema-invalid file fails the test with the store's one line
    ('<file>: <problem>'), no traceback."""
    try:
        return call()
    except BaselineError as exc:
        problem = str(exc)
    # Outside the except block: failing inside it would chain the store's exception into the report.
    pytest.fail(f"unusable baseline: {problem}", pytrace=False)


def shown_path(store: BaselineStore, key: BaselineKey) -> str:
    from pytest_neoxmii.storage.store import _shown
    return _shown(store.path_for(key))


def merge_golden(store: BaselineStore, key: BaselineKey, cls: str, cases: dict | None = None,
                 perplexity: dict | None = None) -> str:
    """Add (or replace) golden cases and/or the perplexity of one GPU class, keeping every other case and
    every other class. Done under the store's file lock as one read-modify-validate-atomic-write, so
    pytest-xdist workers writing other cases of the same backend never lose each other's entries.

    Uses BaselineStore._update: the store's public put_golden replaces the golden outputs as a whole, which
    would drop the cases other tests (or workers) wrote."""
    from datetime import datetime, timezone
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    current_versions = versions()

    def mutate(doc: dict) -> None:
        entry = doc["gpu_classes"].setdefault(cls, {})
        golden = entry.setdefault("golden", {"cases": {}})
        golden.setdefault("cases", {})
        if cases:
            golden["cases"].update(cases)
        if perplexity is not None:
            golden["perplexity"] = perplexity["perplexity"]
            golden["perplexity_detail"] = {k: v for k, v in perplexity.items() if k != "perplexity"}
        golden.setdefault("perplexity", None)
        golden["versions"] = current_versions
        golden["recorded_at"] = now

    try:
        return str(store._update(key, mutate))
    except BaselineError as exc:
        problem = str(exc)
    pytest.fail(f"cannot write baseline: {problem}", pytrace=False)
