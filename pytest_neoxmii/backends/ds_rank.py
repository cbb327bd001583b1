"""One rank of the DeepSpeed tensor-parallel backend (backends/ds_launcher.py), started by the DeepSpeed
launcher, one process per GPU:

    python -m deepspeed.launcher.runner ... --no_local_rank --module pytest_neoxmii.backends.ds_rank \
        --address 127.0.0.1:PORT --model DIR --dtype fp16 --max-tokens N --max-batch B

Every rank loads the model in system memory and shards it onto its GPU with deepspeed.init_inference
(tp_size = world size, kernel injection on CUDA); the GPT-NeoX compat patches come from the child
environment's sitecustomize (compat.child_env), and are installed again here. Rank 0 connects back to
the test session (deploy/channel.py) and receives requests; it broadcasts each one to the other ranks so
that every rank runs the same forward (the tensor-parallel all-reduces need all of them). The broadcast
goes over a gloo group: waiting ranks then block on the CPU instead of spinning an NCCL kernel on their
GPU, and an idle session cannot trip NCCL's watchdog timeout.

Requests and replies: backends/worker_loop.py (generate, score, trace; shutdown ends every rank cleanly)."""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys

from pytest_neoxmii.backends.worker_loop import serve


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pytest_neoxmii.backends.ds_rank")
    p.add_argument("--address", required=True, help="host:port the test session listens on")
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--idle-timeout-hours", type=float, default=24.0,
                   help="how long ranks may wait for the next request (torch.distributed timeout)")
    p.add_argument("--engine-config", default=None,
                   help="JSON of the user's init_inference config, merged over the defaults below")
    p.add_argument("--factory", default="pytest_neoxmii.backends.ds_rank:load_ds_model",
                   help="module:function building this rank's model (tests pass a fake one)")
    return p.parse_args(argv)


def load_ds_model(args, rank: int, local_rank: int, world: int):
    """The rank's DeepSpeed inference engine, wrapped in the shared TorchModelBackend calls."""
    from pytest_neoxmii import compat
    compat.install()
    import deepspeed
    import torch

    from pytest_neoxmii.backends.deepspeed_inference import workspace_readings, workspace_size
    from pytest_neoxmii.backends.hf import load_hf_model
    from pytest_neoxmii.backends.torch_model import TorchModelBackend
    from pytest_neoxmii.dtypes import TORCH_DTYPES
    from pytest_neoxmii.injection import count_injected, gpu_used_bytes, held_since, require_injected

    class RankModel(TorchModelBackend):
        def close(self) -> None:
            self._release()

    from pytest_neoxmii.deploy import gpu_cap
    inject = args.device == "cuda"
    device = f"cuda:{local_rank}" if inject else "cpu"
    gpu_cap.apply(device)                       # --neox-gpu-memory-cap, inherited from the session
    before = gpu_used_bytes(device)
    # System memory first (load_with_sys_mem in MII's terms): init_inference then moves only this rank's
    # shard to its GPU, so a model larger than one GPU still loads.
    model = load_hf_model(args.model, args.dtype, "cpu")
    total = len(model.gpt_neox.layers)
    from pytest_neoxmii.serving_config import merged
    config = merged({
        "tensor_parallel": {"tp_size": world},
        "dtype": TORCH_DTYPES[args.dtype],
        "replace_with_kernel_inject": inject,
        "enable_cuda_graph": False,          # not supported with injection for this model (docs/STACK.md trap 4)
        "max_tokens": args.max_tokens,
    }, json.loads(args.engine_config) if args.engine_config else None)
    config["dtype"] = TORCH_DTYPES[args.dtype]
    inject = inject and bool(config["replace_with_kernel_inject"])
    engine = deepspeed.init_inference(model, config=config)
    from pytest_neoxmii.backends import planted_fault
    planted = planted_fault.plant(engine.module)    # a validation run's planted defect; nothing when unset
    report = count_injected(engine.module, total)
    if inject:
        require_injected(report, compat.transformers_version())
    rank_model = RankModel()
    rank_model.model, rank_model.device = engine, device
    readings = None
    if inject:
        rank_model.size_workspace(args.max_batch)   # first forward = largest batch: sizes DS's workspace
        readings = workspace_readings(device)
    held = held_since(device, before)[0] if inject else None
    over = gpu_cap.exceeded(device, f"rank {rank}")
    if over:
        raise RuntimeError(over)               # the rank ends; the session reports it with this line
    return rank_model, {"rank": rank, "device": device, "injected": report.injected, "layers": total,
                        "kernels": report.describe() if inject else "none (CPU: no kernel injection)",
                        "gpu_memory_bytes": held, "workspace_bytes": workspace_size(readings),
                        "workspace_readings": readings,
                        "gpu_tensor_bytes": torch.cuda.memory_allocated(device) if inject else None,
                        "planted_fault": planted}


class PlumbingModel:
    """A stand-in model (CPU, gloo) for checking the launcher, the channel and the broadcast without
    weights: every call runs an all-reduce over the ranks (so it only answers if every rank received the
    request), and the result says how many ranks took part; generate with a negative token count fails
    (a fatal error), trace is unavailable. `--factory pytest_neoxmii.backends.ds_rank:plumbing_model`."""

    def __init__(self, world: int):
        self.world = world

    def _ranks(self) -> int:
        import torch
        import torch.distributed as dist
        t = torch.ones(1)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(t)               # default group (gloo on CPU)
        return int(t.item())

    def generate(self, batch, max_new_tokens: int, top_k: int = 5):
        from pytest_neoxmii.outputs import Generation
        ranks = self._ranks()
        if max_new_tokens < 0:
            raise ValueError(f"plumbing model: fails on purpose ({ranks} ranks)")
        return Generation(tokens=[[row[-1]] * max_new_tokens for row in batch.rows],
                          top_logprobs=[[[(row[-1], 0.0), (ranks, -1.0)]] * max_new_tokens for row in batch.rows])

    def score(self, batch):
        import torch

        from pytest_neoxmii.outputs import Scores
        ids, mask = batch.padded()
        return Scores(logprobs=torch.full((*ids.shape, 4), float(self._ranks())), mask=mask.bool())

    def trace(self, batch):
        from pytest_neoxmii.errors import BackendUnavailable
        raise BackendUnavailable("plumbing model: no layers to trace")


class AbortingModel(PlumbingModel):
    """A stand-in whose rank 0 aborts (SIGABRT, as a failed C assert in a kernel does) in generate."""

    def generate(self, batch, max_new_tokens: int, top_k: int = 5):
        import torch.distributed as dist
        if not dist.is_initialized() or dist.get_rank() == 0:
            print("aborting model: os.abort() in generate", file=sys.stderr, flush=True)
            os.abort()
        return super().generate(batch, max_new_tokens, top_k)


def aborting_model(args, rank: int, local_rank: int, world: int):
    model, info = plumbing_model(args, rank, local_rank, world)
    return AbortingModel(world), {**info, "kernels": "none (aborting model)"}


def dies_at_load(args, rank: int, local_rank: int, world: int):
    raise RuntimeError("stand-in model: failed on purpose while loading")


def plumbing_model(args, rank: int, local_rank: int, world: int):
    return PlumbingModel(world), {"rank": rank, "device": "cpu", "injected": 0, "layers": 0,
                                  "kernels": "none (plumbing model)", "gpu_memory_bytes": None}


def _factory(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    import torch
    import torch.distributed as dist

    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(hours=args.idle_timeout_hours)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if args.device == "cuda" else None

    def broadcast(obj):
        if world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=control)
        return box[0]

    model, info = _factory(args.factory)(args, rank, local_rank, world)
    infos = [None] * world
    dist.all_gather_object(infos, info, group=control)
    print(f"rank {rank}/{world} ready: {info}", flush=True)
    conn = None
    if rank == 0:
        from pytest_neoxmii.deploy.channel import connect, send
        conn = connect(args.address)
        send(conn, {"op": "ready", "infos": infos, "pid": os.getpid()})
    code = serve(conn, model, rank, world, broadcast)
    if code == 0:
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
