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
from pathlib import Path

from pytest_neoxmii.backends import planted_fault
from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.backends.deepspeed_inference import spread_note
from pytest_neoxmii.backends.worker_deployment import ChannelDeployment
from pytest_neoxmii.deploy import launcher, ports

WORKER = "pytest_neoxmii.backends.ds_rank"


class DsLauncherBackend(ChannelDeployment):
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
        super().__init__(tag_prefix="ds-tp", dtype=dtype, tp=tp, gpus=gpus, on_gpu=device.startswith("cuda"),
                         ready_timeout=ready_timeout, request_timeout=request_timeout, memory_probe=memory_probe,
                         engine_config=engine_config)

    def _reserve(self) -> None:
        self._ports = ports.reserve(1)               # torch.distributed's master port
        try:
            super()._reserve()
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
        tree = self._start_tree(cmd, name=f"DeepSpeed launcher (ds tp={self.tp})",
                                log_path=self.run_dir / "launcher.log")
        self.rank_infos = self._await_ready(tree, ready_timeout)["infos"]

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
            gpu_tensor_bytes=sum(i.get("gpu_tensor_bytes") or 0 for i in infos) or None,
            workspace_bytes=max((i.get("workspace_bytes") or 0 for i in infos), default=0) or None,
            notes=[f"DeepSpeed launcher, {self.tp} ranks",
                   f"max_tokens={(self.engine_config or {}).get('max_tokens', self.max_tokens)}",
                   f"workspace sized for batch {self.max_batch}", f"deployed in {self.deploy_seconds:.1f} s"]
            + [n for i in infos for n in spread_note(i.get("workspace_readings"), f"rank {i['rank']}: ")]
            + planted_fault.ranks_note(infos))

    def _teardown_name(self) -> str:
        return f"{self.name} tp={self.tp} (DeepSpeed launcher)"

    def _release(self) -> None:
        super()._release()
        self._ports.release()
