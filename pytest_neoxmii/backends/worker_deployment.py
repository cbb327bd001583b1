"""What every engine whose model runs in worker processes shares (an isolated engine's worker, the DeepSpeed
launcher's ranks, MII's gRPC servers): a tag and a run directory per deployment, the GPU-memory baseline taken before it starts, the
watched start-up that leaves nothing behind when it fails or is interrupted, and the teardown that ends every
process, checks that GPU memory came back and keeps the logs only when something went wrong
(deploy/processes.py). A subclass reserves its ports, starts its processes and says how to ask them to exit.

ChannelDeployment adds the session's side of the channel (deploy/channel.py) for workers that answer
requests themselves (backends/worker_loop.py): rank 0 connects back and reports ready, each request is
answered or the worker's death is turned into WorkerCrashed naming how it ended, the request in flight and
its log's last lines."""
from __future__ import annotations

import abc
import shutil
import time
from pathlib import Path
from typing import Callable

from pytest_neoxmii.backends.base import Backend, BackendInfo, LoadRequest
from pytest_neoxmii.deploy import channel, forkserver, gpumem, processes
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.outputs import Generation, LayerTrace, PromptBatch, Scores


class WorkerDeployment(Backend):
    # The model runs in other processes: CUDA events or synchronize in the session measure none of its
    # work (time with a wall clock), and there is no .model; info.device lists every GPU ("cuda:0,1").
    runs_in_worker = True
    polite_timeout = 15.0        # default seconds the processes get to exit on their own after polite()
    _closed = True               # nothing to tear down until processes exist
    ready_at: float | None = None   # time.monotonic() at which the processes reported ready, where they say
    _start_error: BaseException | None = None     # why the start failed, once it has

    def __init__(self, *, tag_prefix: str, dtype: str, tp: int, gpus: list[int] | None, on_gpu: bool,
                 ready_timeout: float | None, request_timeout: float | None, memory_probe="default",
                 engine_config: dict | None = None, wait: bool = True):
        self.dtype, self.tp = dtype, tp
        self.engine_config = engine_config           # the user's serving config, merged over the defaults
        self.gpus = list(gpus) if gpus is not None else list(range(tp))
        self.request_timeout = request_timeout or processes.env_float("NEOXMII_REQUEST_TIMEOUT", 600)
        self.tag = processes.new_tag(tag_prefix)
        self.run_dir = processes.run_dir(self.tag)
        if memory_probe == "default":
            # A deployment on the CPU holds no GPU memory: judged across its close, the GPUs' memory is other
            # processes' (once +1335 MiB from the unit suite's seven other xdist workers on one H200).
            memory_probe = gpumem.default_probe(self._others) if on_gpu else None
            self._probe_attributes = on_gpu                     # nvidia-smi's per-process figures apply
        else:
            self._probe_attributes = False
        self._probe = memory_probe
        self._baseline = self._probe() if self._probe else None
        self._trees: list[processes.ProcessTree] = []
        self.teardown_report: processes.TeardownReport | None = None
        self._failed = False
        self._reserve()
        self._closed = False
        processes.register_live(self.tag, self.close)
        self._ready_timeout = ready_timeout or processes.env_float("NEOXMII_READY_TIMEOUT", 900)
        self._ready = False
        self._launched_at = time.monotonic()
        self._guarded(self._launch)
        self._guarded(self._after_launch)
        if wait:
            self.wait_ready()

    def _guarded(self, step) -> None:
        try:
            step()
        except BaseException as exc:                 # a failed start, or Ctrl-C during it: leave nothing
            self._failed = True
            self._start_error = exc
            self.close()
            raise

    @property
    def is_ready(self) -> bool:
        """The start was finished (wait_ready ran); never waits."""
        return self._ready

    def wait_ready(self) -> "WorkerDeployment":
        """Finish the start: wait until the processes answer (a deployment made with wait=False was only
        launched, so that it loads while the session does other work). Returns the deployment. A start
        that failed fails again the same way: its processes and channel are gone (a ZeRO helper asked again
        after its load failed raised "handle is closed" from the channel, in every later test)."""
        if self._start_error is not None:
            raise self._start_error
        if not self._ready:
            def finish():
                self._start(self._ready_timeout)
                now = time.monotonic()
                # When the processes were ready (a worker says so), not when the session came to ask: a
                # deployment launched ahead has often been ready for a while.
                ready_at = self.ready_at if self.ready_at is not None and self._launched_at <= self.ready_at <= now \
                    else now
                self.deploy_seconds = ready_at - self._launched_at
                self.info = self._describe()
            self._guarded(finish)
            self._ready = True
        return self

    @classmethod
    def load(cls, request: LoadRequest) -> "WorkerDeployment":
        r = request
        return cls(r.path, r.dtype, r.device, r.tp, r.max_tokens, r.max_batch, engine_config=r.engine_config)

    # -- what a deployment provides -------------------------------------------------------------------
    @abc.abstractmethod
    def _reserve(self) -> None:
        """Take what the processes will bind (ports, sockets) before any of them starts."""

    def _launch(self) -> None:
        """Start what can load on its own while the session goes on (wait=False returns after this)."""

    def _after_launch(self) -> None:
        """What the session side starts right after the launch (a channel's accept)."""

    @abc.abstractmethod
    def _start(self, ready_timeout: float) -> None:
        """Start the process trees not launched yet (appended to self._trees) and return once they answer."""

    @abc.abstractmethod
    def _describe(self) -> BackendInfo:
        """What ran, once ready (self.deploy_seconds is set)."""

    @abc.abstractmethod
    def _polite(self) -> Callable[[], None] | None:
        """How to ask the processes to exit on their own, or None where they cannot be asked yet."""

    @abc.abstractmethod
    def _teardown_name(self) -> str:
        """The deployment as teardown reports and leak warnings name it."""

    def _memory_check(self) -> tuple[Callable[[], dict[int, float]] | None, dict[int, float] | None, str]:
        """How GPU memory is judged across the close: (probe, what it must come back to, what that is).

        Where nvidia-smi lists the deployment's processes: the GPUs' memory less what every other listed
        process holds (the reference, the other deployments, another job's processes on a shared GPU), read
        just before the close less what the deployment's processes hold, and read the same way after it.
        Measured across the close, it is blind to what changed on the GPU since the launch and belongs to no
        process (seen: +123 MiB against the launch-time figure, on one H200 once the session's other workers
        and the reference had loaded, pythia-410m synthetic; no process of the deployment was left, and the
        report cost a 30 s wait). Otherwise (another PID namespace, a custom probe): the probe given, against
        the launch-time figure."""
        launch_time = self._probe, self._baseline, "before the deployment"
        if self._probe is None or not self._probe_attributes or not self._trees:
            return launch_time
        try:
            # One reading for both figures (gpumem.reading: taken apart, a process allocating in between
            # moves one and not the other, and the close then reads it as memory not returned).
            now, held, steady = gpumem.used_beside(self._own_pids())
        except Exception:               # the launch-time figure still judges the close
            return launch_time
        if not held:                    # its processes are not listed: their memory cannot be told apart
            return launch_time
        what = "before the close, less what its processes held"
        if not steady:                  # a leak read against it may be what a neighbour allocated meanwhile
            what += (f" (read while a process kept allocating: nvidia-smi's process figures changed on every "
                     f"reading for {gpumem.STEADY_WINDOW_S:.0f} s, so this baseline may be off by what it allocated)")
        # A process of the deployment still alive after the close carries its tag: its memory still counts.
        return (lambda: gpumem.used_beside(self._own_pids()).used,
                {i: mib - held.get(i, 0.0) for i, mib in now.items()}, what)

    def _others(self) -> set[int]:
        """The processes of the session's other live deployments: their GPU memory is not this one's."""
        return processes.other_live_pids(self.tag)

    def _own_pids(self) -> set[int]:
        """The deployment's processes: its trees' and every process carrying its tag."""
        return set().union(*(tree.pids() for tree in self._trees)) | processes.tagged(self.tag)

    def _held_by_own_processes(self) -> dict[int, float]:
        """{GPU index: MiB} that nvidia-smi attributes to the deployment's processes; {} where it attributes
        nothing to them, or a custom probe is in use."""
        if not self._probe_attributes or not self._trees:
            return {}
        return gpumem.held_by(self._own_pids())

    def _release(self) -> None:
        """Give back what _reserve took and anything else held in this process; runs after teardown."""

    # -- teardown -------------------------------------------------------------------------------------
    _ended_on_its_own: str | None = None

    def ended_on_its_own(self) -> str | None:
        """The watched root exited while the deployment was neither closing nor asked to: how (its log is
        then kept, and named)."""
        if self._ended_on_its_own is None and not self._closed and not getattr(self, "_asked_to_exit", False) \
                and self._trees and self._trees[0].root_exists:
            tree = self._trees[0]
            code = tree.popen.poll()
            if code is not None:
                how = processes.describe_exit(code, tree.log_path.read_text(errors="replace"),
                                              tree.oom_kills_at_start)
                self._ended_on_its_own = (f"{self._teardown_name()} ended on its own before the teardown ({how}); "
                                          f"its log: {tree.log_path}")
        return self._ended_on_its_own

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            probe, baseline, baseline_is = self._memory_check()
            self.teardown_report = processes.teardown_with_settings(
                self._trees, name=self._teardown_name(), tag=self.tag, polite=self._polite(),
                polite_timeout_default=self.polite_timeout, memory_probe=probe,
                memory_baseline=baseline, memory_baseline_is=baseline_is)
        finally:
            self._release()
            processes.unregister_live(self.tag)
            if not self._failed and not self._ended_on_its_own \
                    and not (self.teardown_report and self.teardown_report.leaked):
                shutil.rmtree(self.run_dir, ignore_errors=True)    # logs are kept when something went wrong


class ChannelDeployment(WorkerDeployment):
    """A deployment whose rank 0 answers the session over an authenticated local channel. A subclass
    starts the process tree (self._trees[0] is the one watched) and calls self._await_ready(tree, ...)."""

    conn = None
    _listener = None

    @property
    def _what(self) -> str:
        """The deployment as its errors name it: "ds tp=1"."""
        return f"{self.name} tp={self.tp}"

    def _reserve(self) -> None:
        self._listener = channel.Listener()

    def _start_tree(self, cmd: list[str], *, name: str, log_path: Path,
                    module: tuple[str, list[str]] | None = None,
                    imports: tuple[str, ...] = ()) -> processes.ProcessTree:
        """Start rank 0's process tree with what it needs to connect back, its spill directory left to the
        tag's reaper should the session die without tearing down; it becomes a tree of the deployment.
        `module`: (name, args) when the command is `python -u -m name *args`, which the fork server may start,
        with `imports` imported first (the engine's worker_imports)."""
        env = self._listener.env()
        tree = processes.start(cmd, name=name, log_path=log_path, tag=self.tag, env_extra=env,
                               leftovers=(self._listener.spill_dir,),
                               spawn=forkserver.spawner(*module, imports) if module is not None else None)
        self._trees.append(tree)
        return tree

    def _after_launch(self) -> None:
        # rank 0 connects as soon as it starts: take the connection then, so that it goes on loading
        # (and working ahead) while the session does something else
        self._listener.accept_in_background(self._ready_timeout)

    def _await_ready(self, tree: processes.ProcessTree, ready_timeout: float) -> dict:
        """The ready message of rank 0; a tree that dies first is ServerDied within a second, with its log."""
        deadline = time.monotonic() + ready_timeout

        def check():
            tree.check_alive()
            tree.pids()                              # remember the tree while its parents still link it

        try:
            self.conn = self._listener.accepted(ready_timeout, check=check)
            return channel.receive(self.conn, max(deadline - time.monotonic(), 1.0), check=check)
        except channel.ChannelTimeout:
            raise processes.ReadinessTimeout(
                f"{self._what}: rank 0 did not report ready within {ready_timeout:.0f} s, its processes still "
                f"running; last lines of {tree.log_path}:\n{tree.log_tail()}") from None

    # -- requests -------------------------------------------------------------------------------------
    def _call(self, op: str, *args):
        if self._closed:
            raise processes.DeploymentError(f"{self._what} deployment is closed")
        tree = self._trees[0]
        try:
            channel.send(self.conn, {"op": op, "args": args})
            reply = channel.receive(self.conn, self.request_timeout, check=tree.check_alive)
        except channel.ChannelTimeout:
            raise processes.DeploymentError(
                f"{self._what}: no answer to {op} within {self.request_timeout:.0f} s; last lines of "
                f"{tree.log_path}:\n{tree.log_tail()}") from None
        except (processes.ServerDied, EOFError, OSError):
            raise self._crashed(tree, op, args) from None
        if reply["ok"]:
            return reply["result"]
        if reply.get("unavailable"):
            raise BackendUnavailable(reply["error"])
        raise processes.DeploymentError(f"{self._what}: {op} failed on rank 0:\n{reply['error']}")

    def _crashed(self, tree: processes.ProcessTree, op: str, args) -> processes.WorkerCrashed:
        """The worker died during `op`: wait (at most 5 s) for its root to notice and exit, then name how
        it ended, the request and the log's last lines."""
        deadline = time.monotonic() + 5
        while tree.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # The whole log: the dying rank's own fatal-signal line can be above the tail (the others' tracebacks).
        log = tree.log_path.read_text(errors="replace")
        how = processes.describe_exit(tree.popen.poll(), log, tree.oom_kills_at_start)
        return processes.WorkerCrashed(
            f"{self._what}: worker crashed ({how}) during {describe_request(op, args)}; "
            f"last lines of {tree.log_path}:\n{processes.crash_excerpt(log, tree.log_tail())}")

    def generate(self, batch: PromptBatch, max_new_tokens: int, top_k: int = 5) -> Generation:
        return self._call("generate", batch, max_new_tokens, top_k)

    def score(self, batch: PromptBatch) -> Scores:
        return self._call("score", batch)

    def trace(self, batch: PromptBatch) -> LayerTrace:
        return self._call("trace", batch)

    # -- teardown -------------------------------------------------------------------------------------
    _asked_to_exit = False       # ask_to_exit() sent the shutdown request already

    def ask_to_exit(self) -> None:
        """Send the shutdown request now, without waiting for its answer: a session closing several
        deployments asks each first, so that they wind down side by side; close() then waits for each."""
        if self._closed or self.conn is None or self._asked_to_exit:
            return
        try:
            channel.send(self.conn, {"op": "shutdown"})
            self._asked_to_exit = True
        except OSError:              # close() ends the processes in any case
            pass

    def _shutdown(self) -> None:
        """Ask every rank to leave its loop and exit; the tree's root then exits on its own."""
        if not self._asked_to_exit:
            channel.send(self.conn, {"op": "shutdown"})
        channel.receive(self.conn, 10)

    def _polite(self):
        return self._shutdown if self.conn is not None else None

    def _release(self) -> None:
        for closable in (self.conn, self._listener):
            try:
                if closable is not None:
                    closable.close()
            except OSError:
                pass


def describe_request(op: str, args) -> str:
    """'generate(batch of 2 rows, lengths 2/1, 3 new tokens)': what a worker was doing when it died."""
    parts = []
    for a in args:
        rows = getattr(a, "rows", None)
        if rows is not None:
            parts.append(f"batch of {len(rows)} row{'s' if len(rows) != 1 else ''}, "
                         f"lengths {'/'.join(str(len(r)) for r in rows)}")
        elif isinstance(a, int) and op == "generate" and len(parts) == 1:
            parts.append(f"{a} new tokens")
    return f"{op}({', '.join(parts)})"
