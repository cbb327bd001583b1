"""GPU memory as seen from outside a deployment: MiB in use per GPU index, for the teardown check that
the memory a deployment took came back.

The default probe asks nvidia-smi (no CUDA context needed) and subtracts what this very process holds
and what the processes of the session's other live deployments hold, so that the session's own models
(the HF reference, tp=1 backends) and a second deployment loading or unloading meanwhile are not mistaken
for a leak of the deployment being torn down. Where nvidia-smi cannot attribute memory to processes
(another PID namespace) the figure is device-wide. Without nvidia-smi, torch's mem_get_info is used
(device-wide, and it creates a CUDA context on each GPU the first time)."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Callable, Iterable

Probe = Callable[[], dict[int, float]]


def _smi(query: str, kind: str = "gpu") -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-{kind}={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def _attributed(pids: Iterable[int], index_of: dict[str, int]) -> dict[int, float]:
    """{gpu index: MiB} that nvidia-smi's compute-apps list gives to `pids` ("[N/A]" under some drivers, or
    another PID namespace: nothing); index_of maps each GPU's uuid to its index."""
    wanted = {str(p) for p in pids}
    if not wanted:
        return {}
    try:
        apps = _smi("gpu_uuid,pid,used_memory", kind="compute-apps")
    except (subprocess.SubprocessError, OSError):
        return {}
    held: dict[int, float] = {}
    for uuid, pid, mib in apps:
        if pid in wanted and uuid in index_of and mib.replace(".", "", 1).isdigit():
            held[index_of[uuid]] = held.get(index_of[uuid], 0.0) + float(mib)
    return held


def nvidia_smi_used(exclude_pids: Iterable[int] = ()) -> dict[int, float]:
    """{gpu index: MiB used}, less what exclude_pids hold where nvidia-smi attributes it."""
    rows = _smi("index,uuid,memory.used")
    used = {int(i): float(mib) for i, _uuid, mib in rows}
    for index, mib in _attributed(exclude_pids, {uuid: int(i) for i, uuid, _ in rows}).items():
        used[index] -= mib
    return used


def held_by(pids: Iterable[int]) -> dict[int, float]:
    """{gpu index: MiB} that nvidia-smi attributes to `pids`; empty where it attributes nothing to them (they
    hold nothing, or live in another PID namespace) or cannot say."""
    if not shutil.which("nvidia-smi"):
        return {}
    try:
        index_of = {uuid: int(i) for i, uuid, _ in _smi("index,uuid,memory.used")}
    except (subprocess.SubprocessError, OSError, ValueError):
        return {}
    return _attributed(pids, index_of)


def process_used_bytes(pid: int | None = None) -> int | None:
    """What one process (this one by default) holds on the GPUs, CUDA context included, as nvidia-smi
    attributes it: unlike a device-wide difference, it leaves out what other processes load meanwhile
    (the session's workers load side by side). None where nvidia-smi cannot say (not installed, another
    PID namespace, "[N/A]")."""
    held = held_by({os.getpid() if pid is None else pid})
    return int(sum(held.values()) * 2**20) if held else None


def torch_used() -> dict[int, float]:
    import torch
    result = {}
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        result[i] = (total - free) / 2**20
    return result


def default_probe(exclude: Callable[[], Iterable[int]] = tuple) -> Probe | None:
    """The probe to use on this machine, or None where there is no GPU to watch. exclude() names the
    processes (besides this one) whose memory is not the deployment's business."""
    if shutil.which("nvidia-smi"):
        try:
            nvidia_smi_used()
            return lambda: nvidia_smi_used({os.getpid(), *exclude()})
        except (subprocess.SubprocessError, OSError, ValueError):
            pass
    try:
        import torch
        if torch.cuda.is_available():
            return torch_used
    except ImportError:
        pass
    return None
