"""What every engine whose model runs in worker processes shares (the DeepSpeed launcher's ranks, MII's gRPC
servers): a tag and a run directory per deployment, the GPU-memory baseline taken before it starts, the
watched start-up that leaves nothing behind when it fails or is interrupted, and the teardown that ends every
process, checks that GPU memory came back and keeps the logs only when something went wrong
(deploy/processes.py). A subclass reserves its ports, starts its processes and says how to ask them to exit."""
from __future__ import annotations

import abc
import shutil
import time
from typing import Callable

from pytest_neoxmii.backends.base import Backend, BackendInfo, LoadRequest
from pytest_neoxmii.deploy import gpumem, processes


class WorkerDeployment(Backend):
    # The model runs in other processes: CUDA events or synchronize in the session measure none of its
    # work (time with a wall clock), and there is no .model; info.device lists every GPU ("cuda:0,1").
    runs_in_worker = True
    polite_timeout = 15.0        # default seconds the processes get to exit on their own after polite()
    _closed = True               # nothing to tear down until processes exist

    def __init__(self, *, tag_prefix: str, dtype: str, tp: int, gpus: list[int] | None,
                 ready_timeout: float | None, request_timeout: float | None, memory_probe="default",
                 engine_config: dict | None = None):
        self.dtype, self.tp = dtype, tp
        self.engine_config = engine_config           # the user's serving config, merged over the defaults
        self.gpus = list(gpus) if gpus is not None else list(range(tp))
        self.request_timeout = request_timeout or processes.env_float("NEOXMII_REQUEST_TIMEOUT", 600)
        self.tag = processes.new_tag(tag_prefix)
        self.run_dir = processes.run_dir(self.tag)
        self._probe = (gpumem.default_probe(lambda: processes.other_live_pids(self.tag))
                       if memory_probe == "default" else memory_probe)
        self._baseline = self._probe() if self._probe else None
        self._trees: list[processes.ProcessTree] = []
        self.teardown_report: processes.TeardownReport | None = None
        self._failed = False
        self._reserve()
        self._closed = False
        processes.register_live(self.tag, self.close)
        try:
            t0 = time.monotonic()
            self._start(ready_timeout or processes.env_float("NEOXMII_READY_TIMEOUT", 900))
            self.deploy_seconds = time.monotonic() - t0
            self.info = self._describe()
        except BaseException:                        # a failed start, or Ctrl-C during it: leave nothing
            self._failed = True
            self.close()
            raise

    @classmethod
    def load(cls, request: LoadRequest) -> "WorkerDeployment":
        r = request
        return cls(r.path, r.dtype, r.device, r.tp, r.max_tokens, r.max_batch, engine_config=r.engine_config)

    # -- what a deployment provides -------------------------------------------------------------------
    @abc.abstractmethod
    def _reserve(self) -> None:
        """Take what the processes will bind (ports, sockets) before any of them starts."""

    @abc.abstractmethod
    def _start(self, ready_timeout: float) -> None:
        """Start the process trees (appended to self._trees) and return once they answer."""

    @abc.abstractmethod
    def _describe(self) -> BackendInfo:
        """What ran, once ready (self.deploy_seconds is set)."""

    @abc.abstractmethod
    def _polite(self) -> Callable[[], None] | None:
        """How to ask the processes to exit on their own, or None where they cannot be asked yet."""

    @abc.abstractmethod
    def _teardown_name(self) -> str:
        """The deployment as teardown reports and leak warnings name it."""

    def _release(self) -> None:
        """Give back what _reserve took and anything else held in this process; runs after teardown."""

    # -- teardown -------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.teardown_report = processes.teardown_with_settings(
                self._trees, name=self._teardown_name(), tag=self.tag, polite=self._polite(),
                polite_timeout_default=self.polite_timeout, memory_probe=self._probe,
                memory_baseline=self._baseline)
        finally:
            self._release()
            processes.unregister_live(self.tag)
            if not self._failed and not (self.teardown_report and self.teardown_report.leaked):
                shutil.rmtree(self.run_dir, ignore_errors=True)    # logs are kept when something went wrong
