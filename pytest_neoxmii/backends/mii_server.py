"""DeepSpeed-MII legacy LOCAL deployment for --neox-tp >= 2: a load balancer and one gRPC server per GPU,
the servers started through the DeepSpeed launcher, queried through `mii.legacy.mii_query_handle` like MII
users do (text in, text out).

What MII's own `mii.legacy.deploy(..., LOCAL)` does is kept: its config (MIIConfig), its derived replica
ports, the score file mii_query_handle reads, its launcher arguments and server entry point. What is
replaced is how the processes are run, because that is where MII 0.3.3 leaks and hangs: it starts them as
plain children sharing our process group, polls their ports forever (no timeout), terminates with a gRPC
message that leaves the servers running (docs/STACK.md trap 8) and uses fixed default ports. Here every port is
reserved free at deploy time, each process tree runs in its own session with the compat environment
(PYTHONPATH with the sitecustomize that patches GPT-NeoX, NCCL_NVLS_ENABLE=0) and a log file, readiness is
polled with a timeout, and close() sends MII's Terminate, then ends every process and waits for the GPU
memory to come back (deploy/processes.py).

MII's gRPC API returns generated text only. What the engine generated (ids, and the top-k logprobs of each
step) is recorded by rank 0 next to the engine (backends/generation_capture.py, armed in
backends/mii_rank.py) and read back after each query, so a greedy divergence is judged by the same near-tie
rule as every other backend (text alone cannot be: docs/SENSITIVITY.md). Teacher-forced scoring is still
not offered: a query generates, it does not score a given text. score() raises BackendUnavailable with that
reason and `can_score` is False; teacher-forced parity at tp >= 2 is checked on the ds backend (DeepSpeed
launcher, backends/ds_launcher.py)."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import time
from pathlib import Path

from pytest_neoxmii import compat
from pytest_neoxmii.backends import generation_capture as capture
from pytest_neoxmii.backends import planted_fault
from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.backends.deepspeed_inference import check_kernels_can_run
from pytest_neoxmii.backends.mii_legacy import import_mii, missing_package, prompt_texts
from pytest_neoxmii.backends.worker_deployment import WorkerDeployment
from pytest_neoxmii.deploy import launcher, ports, processes
from pytest_neoxmii.dtypes import TORCH_DTYPES
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.injection import InjectionFailed
from pytest_neoxmii.outputs import Generation, PromptBatch

NO_SCORES = ("mii with tp >= 2 is the MII gRPC server deployment: a query generates text, it cannot score a "
             "given text, so it is not judged teacher-forced (teacher-forced parity at tp >= 2 runs on ds)")


NO_CUDA = ("the MII LOCAL deployment needs CUDA GPUs: MII asserts torch.cuda.device_count() >= tensor_parallel "
           "and its servers run on cuda:<rank>")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("localhost", port), timeout=0.5):
            return True
    except OSError:
        return False


class MiiServerBackend(WorkerDeployment):
    needs_deepspeed = True
    injects_kernels = True
    can_score = False
    output_is_text = True          # its users query text, and its latency is timed so; what is judged is
                                   # rank 0's engine's own ids and logprobs, not the text re-tokenized
    # The MII client (mii_query_handle) imports mii: this proxy runs in a worker of its own, which starts
    # and ends the servers, so the test process never imports it.
    isolated = True
    requires = ("deepspeed", "mii")
    missing = staticmethod(missing_package)
    polite_timeout = 3.0                     # trap 8: the servers may not exit on their own

    @classmethod
    def check_can_run(cls, request) -> None:
        if not request.device.startswith("cuda"):
            raise BackendUnavailable(NO_CUDA)
        check_kernels_can_run(request.dtype, request.device)

    def __init__(self, path: Path, dtype: str, device: str, tp: int, max_tokens: int, max_batch: int = 1, *,
                 gpus: list[int] | None = None, ready_timeout: float | None = None,
                 request_timeout: float | None = None, memory_probe="default",
                 engine_config: dict | None = None):
        if not device.startswith("cuda"):
            raise BackendUnavailable(NO_CUDA)
        check_kernels_can_run(dtype, device)
        self._mii = import_mii()
        from transformers import AutoTokenizer

        self.path, self.max_tokens = Path(path), max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._score_dir: Path | None = None
        self.handle = None
        super().__init__(tag_prefix="mii-tp", dtype=dtype, tp=tp, gpus=gpus, on_gpu=True,   # (refused on the CPU above)
                         ready_timeout=ready_timeout, request_timeout=request_timeout, memory_probe=memory_probe,
                         engine_config=engine_config)

    def _reserve(self) -> None:
        self.name = f"neoxmii-{self.tag}"   # MII's deployment name: unique on the host (pid + random)
        self.ports = ports.reserve_mii(self.tp)

    # -- deploy ---------------------------------------------------------------------------------------
    def _mii_config(self, max_tokens: int, hostfile: Path):
        from mii.legacy.config import MIIConfig
        from mii.legacy.constants import DeploymentType

        from pytest_neoxmii.serving_config import merged
        p = self.ports
        config = MIIConfig(
            deployment_name=self.name, deployment_type=DeploymentType.LOCAL,
            port_number=p.load_balancer, restful_api_port=p.restful, enable_restful_api=False,
            hostfile=str(hostfile),
            model_conf={**merged({
                "task": "text-generation", "model": str(self.path), "dtype": TORCH_DTYPES[self.dtype],
                "tensor_parallel": self.tp, "torch_dist_port": p.torch_dist,
                "load_with_sys_mem": True,         # as in the EleutherAI GPT-NeoX notes: shard from CPU
                "skip_model_check": True,          # a local directory, no hub look-up (docs/STACK.md trap 7)
                "replace_with_kernel_inject": True, "enable_cuda_graph": False, "max_tokens": max_tokens,
            }, self.engine_config), "dtype": TORCH_DTYPES[self.dtype]})
        config.generate_replica_configs()
        replica = config.model_conf.replica_configs[0]
        if list(replica.tensor_parallel_ports) != p.ranks or replica.torch_dist_port != p.torch_dist:
            raise processes.DeploymentError(
                f"MII derived ports {replica.tensor_parallel_ports} / {replica.torch_dist_port} differ from "
                f"the reserved {p.ranks} / {p.torch_dist}: MII's port scheme changed (mii/legacy/config.py)")
        return config, replica

    def _start(self, ready_timeout: float) -> None:
        from mii.legacy.models.score import create_score_file
        from mii.legacy.models.score.generate import generated_score_path
        from mii.legacy.server import MIIServer, config_to_b64_str

        from pytest_neoxmii.backends.mii_rank import REPORT_DIR_ENV   # not at import: `python -m` runs that module

        hostfile = launcher.write_hostfile(self.run_dir / "hostfile", max(self.gpus) + 1)
        config, replica = self._mii_config(self.max_tokens, hostfile)
        create_score_file(config)            # mii_query_handle(name) reads the config back from it
        self._score_dir = Path(generated_score_path(self.name, config.deployment_type)).parent
        # The arguments MIIServer._initialize_service passes, as separate argv items.
        common = ["--deployment-name", self.name, "--load-balancer-port", str(self.ports.load_balancer),
                  "--restful-gateway-port", str(self.ports.restful),
                  "--model-config", config_to_b64_str(config.model_conf)]
        ds = launcher.from_mii_launch_string(MIIServer._generate_ds_launch_str(None, replica, str(hostfile)))
        env = {"TRANSFORMERS_CACHE": config.model_conf.model_path,   # what MII sets for its servers
               REPORT_DIR_ENV: str(self.run_dir)}
        servers = processes.start(
            ds + [sys.executable, "-m", "pytest_neoxmii.backends.mii_rank", *common,
                  "--server-port", str(replica.tensor_parallel_ports[0])],
            name=f"MII servers (DeepSpeed launcher, tp={self.tp})", log_path=self.run_dir / "servers.log",
            tag=self.tag, env_extra=env)
        self._trees.append(servers)
        balancer = processes.start(
            [sys.executable, "-m", "mii.legacy.launch.multi_gpu_server", *common, "--load-balancer"],
            name="MII load balancer", log_path=self.run_dir / "load_balancer.log", tag=self.tag, env_extra=env)
        self._trees.append(balancer)
        wanted = [self.ports.load_balancer, *self.ports.ranks]
        processes.wait_ready(self._trees, lambda: all(_port_open(p) for p in wanted), timeout=ready_timeout,
                             what=f"MII LOCAL deployment {self.name} (ports {wanted})")
        self.rank_reports = self._rank_reports()
        self._capture_path, self._capture_at = self.run_dir / capture.CAPTURE_FILE, 0
        self.handle = self._mii.mii_query_handle(self.name)

    def _rank_reports(self) -> list[dict]:
        reports = []
        for rank in range(self.tp):
            f = self.run_dir / f"rank{rank}.json"
            if not f.is_file():
                raise processes.DeploymentError(f"MII rank {rank} is serving but wrote no report to {f}: "
                                                "its kernel injection cannot be verified")
            reports.append(json.loads(f.read_text()))
        for r in reports:
            if "error" in r:
                raise processes.DeploymentError(f"MII rank {r['rank']}: could not inspect its model: {r['error']}")
            if not (r["layers"] > 0 and r["injected"] == r["layers"]):
                raise InjectionFailed(f"MII rank {r['rank']}: DeepSpeed {r['kernels']} (transformers "
                                      f"{compat.transformers_version()}): the kernels were not injected")
        return reports

    def _gpu_memory(self) -> tuple[int | None, str]:
        """What the server's processes hold on the GPUs, and how that was measured: their own figures where
        nvidia-smi attributes memory to processes. The fallback, the device-wide difference since the launch,
        is taken in the worker hosting this deployment, which knows nothing of the session's other
        deployments: what they load meanwhile counts. On two H100s it read 3859 MiB with a cold kernel cache
        (the worker built its kernels first: ds's ranks had loaded before the server started) and 9854 MiB
        with a warm one (ds's 5640 MiB loaded between the server's launch and its ready)."""
        own = self._held_by_own_processes()
        if own:
            return int(sum(own.values()) * 2**20), "GPU memory of its processes (nvidia-smi)"
        if self._probe is None:
            return None, ""
        now = self._probe()
        return (int(sum(now[i] - self._baseline.get(i, 0.0) for i in now) * 2**20),
                "GPU memory device-wide since its launch, other loads meanwhile included")

    def _describe(self) -> BackendInfo:
        kernels = {r["kernels"] for r in self.rank_reports}
        held, measured = self._gpu_memory()
        return BackendInfo(
            backend="mii", dtype=self.dtype, device="cuda:" + ",".join(map(str, self.gpus)),
            tensor_parallel=self.tp,
            kernels=kernels.pop() if len(kernels) == 1 else "; ".join(f"rank {r['rank']}: {r['kernels']}"
                                                                      for r in self.rank_reports),
            gpu_memory_bytes=held,
            notes=[f"MII LOCAL gRPC server, {self.tp} ranks under the DeepSpeed launcher",
                   "load_with_sys_mem", f"max_tokens={(self.engine_config or {}).get('max_tokens', self.max_tokens)}",
                   f"deployed in {self.deploy_seconds:.1f} s",
                   "text only: no teacher-forced scores"] + ([measured] if measured else [])
            + planted_fault.ranks_note(self.rank_reports))

    # -- queries --------------------------------------------------------------------------------------
    async def _watched(self, coro):
        """The query with a deadline, checking every second that the servers are still there, so a dead
        rank is an error with its log, not a hang."""
        task = asyncio.ensure_future(coro)
        deadline = time.monotonic() + self.request_timeout
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    return task.result()
                for tree in self._trees:
                    tree.check_alive()
                if time.monotonic() > deadline:
                    raise processes.DeploymentError(
                        f"MII deployment {self.name}: no answer within {self.request_timeout:.0f} s; last lines "
                        f"of {self._trees[0].log_path}:\n{self._trees[0].log_tail()}")
        finally:
            if not task.done():
                task.cancel()

    def query_texts(self, texts: list[str], max_new_tokens: int) -> list[str]:
        if self._closed:
            raise processes.DeploymentError(f"MII deployment {self.name} is closed")
        kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                      return_full_text=False, pad_token_id=self.tokenizer.pad_token_id)
        # MIIClient.query minus its unbounded wait: same request, same stub, same event loop.
        reply = self.handle.asyncio_loop.run_until_complete(
            self._watched(self.handle._request_async_response({"query": texts}, **kwargs)))
        return list(reply.response)

    def generate(self, batch: PromptBatch, max_new_tokens: int, top_k: int = 5) -> Generation:
        texts = prompt_texts(self.tokenizer, batch)
        switch = self.run_dir / capture.CAPTURE_ON_FILE
        switch.touch()
        try:
            self.query_texts(texts, max_new_tokens)     # the user's path; what is judged is what rank 0 recorded
        finally:
            switch.unlink(missing_ok=True)
        records, self._capture_at = capture.read_records(self._capture_path, self._capture_at)
        try:
            return capture.generation(records, batch, max_new_tokens, top_k)
        except capture.CaptureMismatch as exc:
            raise processes.DeploymentError(f"MII deployment {self.name}: {exc}") from None

    def score(self, batch: PromptBatch):
        raise BackendUnavailable(NO_SCORES)

    # -- teardown -------------------------------------------------------------------------------------
    def _terminate(self) -> None:
        """MII's Terminate RPC to the load balancer, which forwards it to every rank: what
        mii.legacy.terminate sends, with a deadline (MII's has none, and first runs an empty query)."""
        import grpc
        from google.protobuf import empty_pb2
        from mii.legacy.grpc_related.proto import legacymodelresponse_pb2_grpc as pb2_grpc
        with grpc.insecure_channel(f"localhost:{self.ports.load_balancer}") as channel:
            pb2_grpc.ModelResponseStub(channel).Terminate(empty_pb2.Empty(), timeout=10)

    def _polite(self):
        return self._terminate if self.handle is not None else None

    def _teardown_name(self) -> str:
        return f"mii tp={self.tp} deployment {self.name}"

    def _release(self) -> None:
        self.ports.release()
        if self._score_dir is not None:
            shutil.rmtree(self._score_dir, ignore_errors=True)
