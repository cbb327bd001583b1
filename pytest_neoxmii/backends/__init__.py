"""The engines, by name, in display order: the one registry the rest of the plugin reads (the names
--neox-backends accepts, the order of the report and the plots, which engines DeepSpeed's CPU dtypes bound).
Every engine implements backends.base.Backend and declares its traits there; parity, baselines and the
report only ever see that interface.

Adding an engine: its own file with a Backend subclass (traits as class attributes, a `load(request)`
classmethod; import optional packages inside it, so that a missing one is a skip for that engine alone; set
`isolated = True` to have it loaded in a worker process of its own), and one line here (or in a conftest.py,
for an engine outside this package):

    register("vllm", VllmBackend)                                   # one class at every tp
    register("ds", DeepSpeedBackend, tensor_parallel=DsLauncherBackend)   # tp >= 2 runs another class
"""
from __future__ import annotations

from dataclasses import dataclass

from pytest_neoxmii.backends.base import Backend, BackendInfo, LoadRequest
from pytest_neoxmii.backends.deepspeed_inference import DeepSpeedBackend
from pytest_neoxmii.backends.ds_launcher import DsLauncherBackend
from pytest_neoxmii.backends.hf import HFBackend
from pytest_neoxmii.backends.isolated import IsolatedEngine
from pytest_neoxmii.backends.mii_legacy import MiiBackend
from pytest_neoxmii.backends.mii_server import MiiServerBackend
from pytest_neoxmii.backends.zero_inference import ZeroInferenceBackend
from pytest_neoxmii.deploy import cpu_heap


@dataclass(frozen=True)
class Engine:
    """A registered engine: its class at tp = 1 and, where it is tensor-parallel, its class at tp >= 2.
    The engine-wide traits are the tp = 1 class's."""

    name: str
    backend: type[Backend]
    tensor_parallel: type[Backend] | None = None

    @property
    def tensor_parallel_capable(self) -> bool:
        return self.tensor_parallel is not None

    def backend_for(self, tp: int) -> type[Backend]:
        return self.tensor_parallel if tp > 1 and self.tensor_parallel is not None else self.backend

    def __getattr__(self, trait: str):
        # description, label, colour, is_reference, needs_deepspeed, injects_kernels, weights_on_gpu, ...
        if trait.startswith("_"):
            raise AttributeError(trait)
        return getattr(self.backend, trait)


ENGINES: dict[str, Engine] = {}      # in registration order, which is the display order


def register(name: str, backend: type[Backend], *, tensor_parallel: type[Backend] | None = None) -> Engine:
    """Make an engine selectable by --neox-backends=NAME; registering a name again replaces it in place."""
    ENGINES[name] = Engine(name, backend, tensor_parallel)
    return ENGINES[name]


register("hf", HFBackend)
register("ds", DeepSpeedBackend, tensor_parallel=DsLauncherBackend)
register("mii", MiiBackend, tensor_parallel=MiiServerBackend)
register("zero", ZeroInferenceBackend)


def names() -> tuple[str, ...]:
    return tuple(ENGINES)


def engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: choose from {', '.join(ENGINES)}") from None


def reference_name() -> str:
    """The engine every other one is judged against (the HF reference)."""
    return next(name for name, e in ENGINES.items() if e.is_reference)


def is_reference(name: str) -> bool:
    return name in ENGINES and ENGINES[name].is_reference


def display_order(names_seen) -> list[str]:
    """Registered engines in registration order, then any others (from older reports) alphabetically."""
    seen = set(names_seen)
    return [n for n in ENGINES if n in seen] + sorted(seen - set(ENGINES))


def load_backend(name: str, request: LoadRequest, *, wait: bool = True,
                 ahead: list[tuple[str, tuple]] | None = ()) -> Backend:
    """Load the engine `name` for `request`, at its tensor-parallel degree (its tp >= 2 class where it has
    one).

    request.engine_config: the user's serving config of ds (init_inference's config) or mii (mii_config),
    merged over the backend's defaults (serving_config.merged) and deployed as it is. wait=False: an isolated
    engine's worker is only launched (it loads meanwhile); its wait_ready() finishes the deployment. ahead:
    calls an isolated engine's worker runs right after its load (worker.py, "working ahead"), None to give
    them later (IsolatedEngine.give_ahead); ignored by the others."""
    cls = engine(name).backend_for(request.tp)
    if cls.isolated:
        return IsolatedEngine(name, cls, request, wait=wait, ahead=ahead)
    cpu_heap.keep_freed_memory(request.device)      # as each worker does (worker.load)
    return cls.load(request)


def descriptions() -> dict[str, str]:
    return {name: e.description for name, e in ENGINES.items()}


__all__ = ["Backend", "BackendInfo", "Engine", "ENGINES", "LoadRequest", "descriptions", "display_order",
           "engine", "is_reference", "load_backend", "names", "reference_name", "register"]
