"""DeepSpeed launcher command lines. The launcher is run as `python -m deepspeed.launcher.runner` with
this interpreter rather than the `deepspeed` console script MII names: the script is only on PATH where
its environment is activated (not for .venv/bin/python, nor for wheels installed with --target)."""
from __future__ import annotations

import sys
from pathlib import Path

RUNNER = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]


def write_hostfile(path: Path, slots: int) -> Path:
    """A one-host hostfile. Without -H the launcher reads /job/hostfile if it exists (a stray one would
    send the ranks elsewhere), and MII writes temporary ones it never deletes; ours lives in the run dir."""
    path.write_text(f"localhost slots={slots}\n")
    return path


def runner_command(hostfile: Path, gpus: list[int], master_port: int) -> list[str]:
    """The launcher on one host, ranks pinned to `gpus`, torch.distributed on `master_port`."""
    return RUNNER + ["-H", str(hostfile), "-i", f"localhost:{','.join(map(str, gpus))}",
                     "--master_addr", "127.0.0.1", "--master_port", str(master_port), "--no_ssh_check"]


def from_mii_launch_string(ds_launch_str: str) -> list[str]:
    """MII's `deepspeed -H ... --no_python` string (MIIServer._generate_ds_launch_str) as an argv that
    runs the same launcher through this interpreter."""
    parts = ds_launch_str.split()
    if not parts or parts[0] != "deepspeed":
        raise ValueError(f"unexpected MII launch string: {ds_launch_str!r}")
    return RUNNER + parts[1:]
