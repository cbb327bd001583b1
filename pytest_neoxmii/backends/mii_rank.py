"""A rank of an MII LOCAL deployment: `python -m mii.legacy.launch.multi_gpu_server ARGS` unchanged, plus
a report of what the rank really runs. Kernel injection must be verified, not assumed (docs/STACK.md trap 2:
with some transformers versions DeepSpeed's policy matches nothing and init_inference returns quietly),
and the model of an MII server lives in this process, out of the test session's reach. So this wraps
deepspeed.init_inference (MII's load_models calls it through the module attribute) and writes, per rank,
the injected layer count and the GPU memory in use to $NEOXMII_RANK_REPORT_DIR/rank<RANK>.json."""
from __future__ import annotations

import json
import os
import runpy
import sys

REPORT_DIR_ENV = "NEOXMII_RANK_REPORT_DIR"


def _write(report: dict) -> None:
    directory = os.environ.get(REPORT_DIR_ENV)
    if not directory:
        return
    path = os.path.join(directory, f"rank{os.environ.get('RANK', '0')}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)          # the session never reads half a file


def _wrap_init_inference() -> None:
    import deepspeed

    original = deepspeed.init_inference

    def init_inference(model, *args, **kwargs):
        import torch

        from pytest_neoxmii.deploy import gpu_cap
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        gpu_cap.apply(device)                # --neox-gpu-memory-cap, inherited from the session
        engine = original(model, *args, **kwargs)
        over = gpu_cap.exceeded(device, f"MII rank {os.environ.get('RANK', '0')}")
        if over:
            raise RuntimeError(over)         # the server ends; the session reports it with this line
        rank = int(os.environ.get("RANK", "0"))
        report = {"rank": rank, "pid": os.getpid()}
        module = getattr(engine, "module", engine)
        from pytest_neoxmii.backends import planted_fault
        report["planted_fault"] = planted_fault.plant(module)
        directory = os.environ.get(REPORT_DIR_ENV)
        if rank == 0 and directory:
            # MII's API returns text only: rank 0 also records the ids and top-k logprobs its engine
            # generated, which the session reads after each query (backends/generation_capture.py).
            from pytest_neoxmii.backends import generation_capture as capture
            switch = os.path.join(directory, capture.CAPTURE_ON_FILE)
            capture.capture_generate(module, capture.file_sink(os.path.join(directory, capture.CAPTURE_FILE)),
                                     capture.CAPTURE_TOP_K, enabled=lambda: os.path.exists(switch))
        try:
            import torch

            from pytest_neoxmii.injection import count_injected
            counted = count_injected(module, len(module.gpt_neox.layers))
            report.update(injected=counted.injected, layers=counted.total, kernels=counted.describe())
            if torch.cuda.is_available():
                device = torch.cuda.current_device()
                free, total = torch.cuda.mem_get_info(device)
                report.update(device=f"cuda:{device}", gpu_used_bytes=total - free)
        except Exception as exc:           # the report must never be why a server fails
            report["error"] = f"{type(exc).__name__}: {exc}"
        _write(report)
        return engine

    deepspeed.init_inference = init_inference


def main() -> None:
    from pytest_neoxmii import compat
    compat.install()                       # also armed by the child sitecustomize; idempotent
    _wrap_init_inference()
    sys.argv[0] = "mii.legacy.launch.multi_gpu_server"
    runpy.run_module("mii.legacy.launch.multi_gpu_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
