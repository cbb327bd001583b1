"""DeepSpeed tensor parallelism across GPUs, run the way DeepSpeed runs it: under the DeepSpeed launcher,
one process per GPU (backends/ds_rank.py), each calling init_inference with tp_size = N and kernel
injection. Rank 0 answers this backend over a local authenticated channel (deploy/channel.py) and
broadcasts every request to the other ranks, so generate, score and trace behave as for the in-process
backends, with the same output types.

Start-up is watched: the launcher's process tree runs in its own session with the compat environment and
a log file; if it exits before rank 0 reports ready, the error says so within a second and carries the log
tail. close() asks the ranks to exit, then ends the whole tree and waits for GPU memory to come back
(deploy/processes.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.backends.worker_deployment import WorkerDeployment
from pytest_neoxmii.deploy import channel, launcher, ports, processes
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.outputs import Generation, LayerTrace, PromptBatch, Scores

WORKER = "pytest_neoxmii.backends.ds_rank"


class DsLauncherBackend(WorkerDeployment):
    needs_deepspeed = True
    injects_kernels = True
    def __init__(self, path: Path, dtype: str, device: str, tp: int, max_tokens: int, max_batch: int = 1, *,
                 gpus: list[int] | None = None, ready_timeout: float | None = None,
                 request_timeout: float | None = None, memory_probe="default", factory: str | None = None,
                 name: str = "ds", engine_config: dict | None = None):
        from pytest_neoxmii.backends.deepspeed_inference import check_kernels_can_run
        check_kernels_can_run(dtype, device)
        self.name, self.path, self.device = name, Path(path), device
        self.max_tokens, self.max_batch, self.factory = max_tokens, max_batch, factory
        self.conn = None
        super().__init__(tag_prefix="ds-tp", dtype=dtype, tp=tp, gpus=gpus, ready_timeout=ready_timeout,
                         request_timeout=request_timeout, memory_probe=memory_probe, engine_config=engine_config)

    def _reserve(self) -> None:
        self._ports = ports.reserve(1)               # torch.distributed's master port
        try:
            self._listener = channel.Listener()
        except BaseException:
            self._ports.release()
            raise

    def _start(self, ready_timeout: float) -> None:
        hostfile = launcher.write_hostfile(self.run_dir / "hostfile", max(self.gpus) + 1)
        cmd = launcher.runner_command(hostfile, self.gpus, self._ports.ports[0]) + [
            "--no_local_rank", "--module", WORKER, "--address", self._listener.address, "--model", str(self.path),
            "--dtype", self.dtype, "--max-tokens", str(self.max_tokens), "--max-batch", str(self.max_batch),
            "--device", "cuda" if self.device.startswith("cuda") else "cpu"]
        if self.factory:
            cmd += ["--factory", self.factory]
        if self.engine_config:
            cmd += ["--engine-config", json.dumps(self.engine_config)]
        tree = processes.start(cmd, name=f"DeepSpeed launcher (ds tp={self.tp})",
                               log_path=self.run_dir / "launcher.log", tag=self.tag, env_extra=self._listener.env())
        self._trees.append(tree)
        deadline = time.monotonic() + ready_timeout

        def check():
            tree.check_alive()
            tree.pids()                              # remember the tree while its parents still link it

        try:
            self.conn = self._listener.accept(ready_timeout, check=check)
            ready = channel.receive(self.conn, max(deadline - time.monotonic(), 1.0), check=check)
        except channel.ChannelTimeout:
            raise processes.ReadinessTimeout(
                f"ds tp={self.tp}: rank 0 did not report ready within {ready_timeout:.0f} s, its processes still "
                f"running; last lines of {tree.log_path}:\n{tree.log_tail()}") from None
        self.rank_infos = ready["infos"]

    def _describe(self) -> BackendInfo:
        infos = self.rank_infos
        kernels = {i["kernels"] for i in infos}
        held = [i["gpu_memory_bytes"] for i in infos if i.get("gpu_memory_bytes") is not None]
        return BackendInfo(
            backend=self.name, dtype=self.dtype,
            device="cuda:" + ",".join(map(str, self.gpus)) if self.device.startswith("cuda") else "cpu",
            tensor_parallel=self.tp,
            kernels=kernels.pop() if len(kernels) == 1 else "; ".join(f"rank {i['rank']}: {i['kernels']}"
                                                                      for i in infos),
            gpu_memory_bytes=sum(held) if held else None,
            notes=[f"DeepSpeed launcher, {self.tp} ranks",
                   f"max_tokens={(self.engine_config or {}).get('max_tokens', self.max_tokens)}",
                   f"workspace sized for batch {self.max_batch}", f"deployed in {self.deploy_seconds:.1f} s"])

    # -- requests -------------------------------------------------------------------------------------
    def _call(self, op: str, *args):
        if self._closed:
            raise processes.DeploymentError(f"{self.name} tp={self.tp} deployment is closed")
        tree = self._trees[0]
        try:
            channel.send(self.conn, {"op": op, "args": args})
            reply = channel.receive(self.conn, self.request_timeout, check=tree.check_alive)
        except channel.ChannelTimeout:
            raise processes.DeploymentError(
                f"{self.name} tp={self.tp}: no answer to {op} within {self.request_timeout:.0f} s; last lines of "
                f"{tree.log_path}:\n{tree.log_tail()}") from None
        except (processes.ServerDied, EOFError, OSError):
            raise self._crashed(tree, op, args) from None
        if reply["ok"]:
            return reply["result"]
        if reply.get("unavailable"):
            raise BackendUnavailable(reply["error"])
        raise processes.DeploymentError(f"{self.name} tp={self.tp}: {op} failed on rank 0:\n{reply['error']}")

    def _crashed(self, tree: processes.ProcessTree, op: str, args) -> processes.WorkerCrashed:
        """The worker died during `op`: wait (at most 5 s) for the launcher to notice and exit, then name
        how it ended, the request and the log's last lines."""
        deadline = time.monotonic() + 5
        while tree.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # The whole log: the dying rank's own fatal-signal line can be above the tail (the others' tracebacks).
        log = tree.log_path.read_text(errors="replace")
        how = processes.describe_exit(tree.popen.poll(), log)
        return processes.WorkerCrashed(
            f"{self.name} tp={self.tp}: worker crashed ({how}) during {describe_request(op, args)}; "
            f"last lines of {tree.log_path}:\n{processes.crash_excerpt(log, tree.log_tail())}")

    def generate(self, batch: PromptBatch, max_new_tokens: int, top_k: int = 5) -> Generation:
        return self._call("generate", batch, max_new_tokens, top_k)

    def score(self, batch: PromptBatch) -> Scores:
        return self._call("score", batch)

    def trace(self, batch: PromptBatch) -> LayerTrace:
        return self._call("trace", batch)

    # -- teardown -------------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        """Ask every rank to leave its loop and exit; the launcher then exits on its own."""
        channel.send(self.conn, {"op": "shutdown"})
        channel.receive(self.conn, 10)

    def _polite(self):
        return self._shutdown if self.conn is not None else None

    def _teardown_name(self) -> str:
        return f"{self.name} tp={self.tp} (DeepSpeed launcher)"

    def _release(self) -> None:
        for closable in (self.conn, self._listener):
            try:
                if closable is not None:
                    closable.close()
            except OSError:
                pass
        self._ports.release()


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
