"""An engine run in a worker process of its own: the session holds this proxy, with the engine's interface
and traits, and the engine's class is loaded in `python -m pytest_neoxmii.worker` (pytest_neoxmii/worker.py)
under the lifecycle every worker deployment has (backends/worker_deployment.py): the authenticated channel,
a watched start-up, a crash turned into a result naming the signal, the request and the log, and a teardown
that ends every process and checks that GPU memory came back.

Every DeepSpeed engine is isolated (the `isolated` trait in backends/base.py), at tp = 1 as at tp >= 2, so
the test process never imports deepspeed or mii: DeepSpeed's process-wide state dies with its worker, and a
kernel abort ends a worker, not the session."""
from __future__ import annotations

import importlib.util
import os
import pickle
import sys

from pytest_neoxmii.backends.base import BackendInfo, LoadRequest
from pytest_neoxmii.backends.worker_deployment import ChannelDeployment
from pytest_neoxmii.deploy import processes
from pytest_neoxmii.errors import BackendUnavailable

AHEAD_FILE = "ahead.pickle"      # the calls a worker works ahead (worker.py --ahead)
AHEAD_DONE_FILE = "ahead.done"   # created by the worker once they have all run (worker.py --ahead-done)
WORKER = "pytest_neoxmii.worker"


def _gpus(request: LoadRequest) -> list[int] | None:
    """The GPUs the engine uses: cuda:N at tp = 1, the first tp GPUs at tp >= 2, none on the CPU."""
    if not request.device.startswith("cuda"):
        return []
    if request.tp > 1:
        return list(range(request.tp))
    _, _, index = request.device.partition(":")
    return [int(index or 0)]


class IsolatedEngine(ChannelDeployment):
    """`engine_cls` (a Backend that would otherwise load in this process) in its own worker process."""

    polite_timeout = 60.0     # the worker closes its engine after the shutdown reply (a hosted server too)

    def __init__(self, name: str, engine_cls, request: LoadRequest, *, ready_timeout: float | None = None,
                 request_timeout: float | None = None, memory_probe="default", wait: bool = True,
                 ahead: list[tuple[str, tuple]] | None = ()):
        engine_cls.check_can_run(request)            # refusals known here cost no process
        for package in engine_cls.requires:
            if importlib.util.find_spec(package) is None:
                raise BackendUnavailable(engine_cls.missing(package))
        self.name, self.engine_cls, self.request = name, engine_cls, request
        self.device = request.device
        # The hosted engine's traits, per instance: the judges ask the object they hold. Where it runs is
        # this proxy's own (runs_in_worker: the model is in the worker).
        self.take_traits(engine_cls)
        self.kernel_build_s: float | None = None
        # Calls the worker runs right after its load (pytest_neoxmii/worker.py, "working ahead"); until
        # ahead_done has answered, the worker may still be computing them. None: they are given later
        # (give_ahead), while the worker starts; it waits for them once loaded.
        self.ahead_later = ahead is None
        self.ahead = [] if ahead is None else list(ahead)
        self.ahead_report: dict | None = None         # the worker's account (worker.py, ahead_done)
        super().__init__(tag_prefix=f"{name}-worker", dtype=request.dtype, tp=request.tp, gpus=_gpus(request),
                         on_gpu=request.device.startswith("cuda"),
                         ready_timeout=ready_timeout, request_timeout=request_timeout,
                         memory_probe=memory_probe, engine_config=request.engine_config, wait=wait)

    def _launch(self) -> None:
        request_file = self.run_dir / "request.pickle"
        request_file.write_bytes(pickle.dumps(self.request, protocol=pickle.HIGHEST_PROTOCOL))
        cls = self.engine_cls
        args = ["--address", self._listener.address, "--engine", f"{cls.__module__}:{cls.__qualname__}",
                "--request", str(request_file)]
        if self.ahead or self.ahead_later:
            if not self.ahead_later:
                self._write_ahead(self.ahead)
            args += ["--ahead", str(self.run_dir / AHEAD_FILE), "--ahead-done", str(self.run_dir / AHEAD_DONE_FILE)]
        self._start_tree([sys.executable, "-u", "-m", WORKER, *args], name=f"{self.name} worker",
                         log_path=self.run_dir / "worker.log", module=(WORKER, args), imports=cls.worker_imports)

    def _start(self, ready_timeout: float) -> None:
        tree = self._trees[0]
        ready = self._await_ready(tree, ready_timeout)
        if ready["op"] == "failed":
            raise self._load_failure(ready, tree)
        self.hosted_info: BackendInfo = ready["info"]
        self.worker_pid = ready["pid"]
        self.kernel_build_s = ready.get("kernel_build_s")
        self.load_s = ready.get("load_s")
        self.ready_at = ready.get("ready_at")

    def _load_failure(self, message: dict, tree: processes.ProcessTree) -> Exception:
        from pytest_neoxmii.injection import InjectionFailed
        kind, text = message["kind"], message["message"]
        if kind == "unavailable":
            return BackendUnavailable(text)
        if kind == "injection":
            return InjectionFailed(text)
        if kind in ("over-cap", "out-of-memory", "deployment"):   # says it all; a traceback, if any, in the log
            return processes.DeploymentError(f"{self._what}: {text} (worker log: {tree.log_path})")
        return processes.DeploymentError(f"{self._what}: the engine failed to load in its worker:\n{text}\n"
                                         f"last lines of {tree.log_path}:\n{tree.log_tail()}")

    def _describe(self) -> BackendInfo:
        info = self.hosted_info
        root = self._trees[0].popen
        how = (["forked from the session's fork server"] if getattr(root, "forked", False) else
               [f"not forked: {root.why_not_forked}"] if getattr(root, "why_not_forked", None) else [])
        info.notes = list(info.notes) + [f"in worker process {self.worker_pid}", *how,
                                         f"deployed in {self.deploy_seconds:.1f} s{self._deploy_parts()}"]
        return info

    def _deploy_parts(self) -> str:
        """' (start and imports 6.1 s, kernels 0.6 s, load 3.2 s)': where a worker's deployment time went, as
        the worker measured its kernels and its load (the rest is the process's start and imports)."""
        if self.load_s is None:
            return ""
        kernels = self.kernel_build_s or 0.0
        start = max(self.deploy_seconds - kernels - self.load_s, 0.0)
        return (f" (start and imports {start:.1f} s, "
                + (f"kernels {kernels:.1f} s, " if self.kernel_build_s is not None else "")
                + f"load {self.load_s:.1f} s)")

    def _teardown_name(self) -> str:
        return f"{self.name} tp={self.tp} (worker process)"

    # -- working ahead --------------------------------------------------------------------------------
    def give_ahead(self, calls: list[tuple[str, tuple]], threads: int | None = None) -> None:
        """The calls to work ahead of a worker launched with ahead=None (once; an empty list: none), and
        torch's thread count in the worker while it computes them (None: its own). The worker reads them once
        loaded; the file appears whole (renamed into place) or not at all."""
        if not self.ahead_later:
            raise RuntimeError(f"{self._what}: its calls ahead were given at launch")
        self.ahead_later = False
        self.ahead = list(calls)
        self._write_ahead(self.ahead, threads)

    def _write_ahead(self, calls, threads: int | None = None) -> None:
        tmp = self.run_dir / (AHEAD_FILE + ".tmp")
        tmp.write_bytes(pickle.dumps({"calls": calls, "threads": threads}, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, self.run_dir / AHEAD_FILE)

    def wait_ahead(self, again: bool = False) -> dict | None:
        """Wait until the worker has run every call given as `ahead` (None when there were none): after
        this, the engine computes nothing until asked. The worker's account (calls, computed, seconds,
        unclaimed: results no test has asked for yet) is asked once, or again with again=True."""
        if self.ahead and (self.ahead_report is None or again):
            self.ahead_report = self._call("ahead_done", True)
        return self.ahead_report

    def finished_ahead(self) -> bool:
        """The worker has run every call given ahead (its marker file), known without asking it anything:
        a worker still loading does not answer yet."""
        return bool(self.ahead) and (self.run_dir / AHEAD_DONE_FILE).exists()

    def ahead_so_far(self) -> dict | None:
        """The worker's account now, without waiting: "finished" False while it still works ahead (a
        session interrupted, or ended with tests that never asked, must not wait for that work)."""
        if self.ahead:
            self.ahead_report = self._call("ahead_done", False)
        return self.ahead_report

    @property
    def ahead_finished(self) -> bool:
        return bool(self.ahead_report and self.ahead_report.get("finished", True))

    def _crashed(self, tree, op: str, args):
        crash = super()._crashed(tree, op, args)
        log = tree.log_path.read_text(errors="replace") if tree.log_path.exists() else ""
        if "working ahead:" in log and "worked ahead:" not in log:    # it died in a call made ahead
            crash.args = (f"{crash.args[0]} (the worker was still running the session's calls ahead: the "
                          f"log's last 'working ahead' line names the one it died in)",)
        return crash

    # -- the hosted engine's other calls --------------------------------------------------------------
    def query_texts(self, texts: list[str], max_new_tokens: int) -> list[str]:
        return self._call("query_texts", texts, max_new_tokens)

    def measure_latency(self, batch, new_tokens: int, rounds, warmup: int, *, spec=None, hardware=None,
                        min_warmup_s: float = 0.0, gpu_work: bool = False):
        """latency.measure_backend run in the worker, on the engine itself: timed as the test process times
        an engine it holds (CUDA events around each call), without the channel in the figures."""
        return self._call("measure_latency", batch, new_tokens, rounds, warmup, spec, hardware, min_warmup_s,
                          gpu_work)
