"""The GPUs this session can see, the skip reasons of the GPU markers, which say what was needed and what
was found, and the machine description stored beside every latency baseline."""
from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import dataclass

GB = 1e9
A100_40G_BYTES = 40 * GB


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_memory: int          # bytes
    capability: tuple[int, int]

    def short(self) -> str:
        return f"{self.name} {self.total_memory / GB:.1f} GB"


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...]
    cuda_version: str | None = None
    driver_version: str | None = None

    @property
    def count(self) -> int:
        return len(self.gpus)

    @property
    def gpu_class(self) -> str:
        """The key baselines are stored under: the GPU's product name, or 'cpu'."""
        if not self.gpus:
            return "cpu"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.gpus[0].name).strip("-")

    def describe(self) -> str:
        if not self.gpus:
            return "no CUDA GPU found"
        names = {}
        for g in self.gpus:
            names[g.short()] = names.get(g.short(), 0) + 1
        found = ", ".join(f"{n} x {name}" for name, n in names.items())
        extra = f" (CUDA {self.cuda_version}, driver {self.driver_version})" if self.cuda_version else ""
        return found + extra

    def found(self) -> str:
        """'found 0' / 'found 1: NVIDIA H100 80GB HBM3 85.0 GB' for skip reasons."""
        if not self.gpus:
            return "found none"
        return f"found {self.count}: " + ", ".join(g.short() for g in self.gpus)

    # Marker checks: None when satisfied, else the skip reason.
    def need_gpu(self) -> str | None:
        return None if self.gpus else "needs a CUDA GPU, found none"

    def need_memory(self, min_bytes: float, label: str) -> str | None:
        if any(g.total_memory >= min_bytes for g in self.gpus):
            return None
        return f"needs a GPU with at least {min_bytes / GB:.0f} GB ({label}), {self.found()}"

    def need_gpus(self, n: int) -> str | None:
        if self.count >= n:
            return None
        return f"needs {n} GPUs, found {self.count}"


@functools.lru_cache(maxsize=1)
def machine_info(hardware: Hardware) -> dict:
    """GPU name, count and memory, driver and CUDA versions, plus the host: stored beside every latency
    baseline and added to pytest-benchmark's machine_info."""
    gpus = [{"name": g.name, "memory_bytes": int(g.total_memory),
             "capability": f"{g.capability[0]}.{g.capability[1]}"} for g in hardware.gpus]
    return {
        "gpu_class": hardware.gpu_class,
        "gpu_name": gpus[0]["name"] if gpus else None,
        "gpu_count": len(gpus),
        "gpu_memory_bytes": gpus[0]["memory_bytes"] if gpus else None,
        "gpus": gpus,
        "cuda_version": hardware.cuda_version,
        "driver_version": hardware.driver_version,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def detect() -> Hardware:
    try:
        import torch
    except ImportError:
        return Hardware(gpus=())
    if not torch.cuda.is_available():
        return Hardware(gpus=())
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(Gpu(index=i, name=p.name, total_memory=int(p.total_memory),
                        capability=(p.major, p.minor)))
    return Hardware(gpus=tuple(gpus), cuda_version=torch.version.cuda, driver_version=_driver_version())


@functools.lru_cache(maxsize=1)   # nvidia-smi costs tens of ms, and the session asks for the GPUs often
def _driver_version() -> str | None:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def host_memory_total(cgroup_limit: str = "/sys/fs/cgroup/memory.max") -> int | None:
    """Bytes of memory this machine's processes may use at most: its physical memory, or its cgroup's
    (version 2) limit where that is lower (a container's); None where unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open(cgroup_limit) as f:
            limit = f.read().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def host_memory_available(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes of host memory available to new processes (Linux's MemAvailable), None where unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
