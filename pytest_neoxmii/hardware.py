"""The GPUs this session can see, the skip reasons of the GPU markers, which say what was needed and what
was found, and the machine description stored beside every latency baseline."""
from __future__ import annotations

import functools
import os
import platform
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

GB = 1e9
A100_40G_BYTES = 40 * GB


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_memory: int          # bytes
    capability: tuple[int, int]
    uuid: str | None = None    # "GPU-...", as nvidia-smi names the card (None where torch does not say)

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
        uuid = getattr(p, "uuid", None)
        gpus.append(Gpu(index=i, name=p.name, total_memory=int(p.total_memory),
                        capability=(p.major, p.minor), uuid=smi_uuid(uuid)))
    return Hardware(gpus=tuple(gpus), cuda_version=torch.version.cuda, driver_version=_driver_version())


def describe_in_use(gpus: tuple[Gpu, ...], in_use: dict[int, int]) -> str:
    """'GPU 0: 61.2 GB of its 150.1 GB held by other processes when the session started' ('' for none)."""
    return "; ".join(f"GPU {g.index}: {in_use[g.index] / GB:.1f} GB of its {g.total_memory / GB:.1f} GB held by "
                     "other processes when the session started" for g in gpus if g.index in in_use)


def smi_uuid(uuid) -> str | None:
    """torch's device uuid as nvidia-smi prints it ("GPU-" and the 36-character form)."""
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


@functools.lru_cache(maxsize=1)   # nvidia-smi costs tens of ms, and the session asks for the GPUs often
def _driver_version() -> str | None:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def host_memory_total(cgroup_root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes of memory this machine's processes may use at most: its physical memory, or the lowest memory
    limit of this process's cgroup and its ancestors where that is lower (a container's, a CI job's), cgroup
    version 2 or 1; None where unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return min([total, *_cgroup_memory_limits(Path(cgroup_root), Path(self_cgroup))])


def _cgroup_memory_limits(root: Path, self_cgroup: Path) -> list[int]:
    """The limits set on this process's memory cgroup and on each of its ancestors: version 2's memory.max
    ("max": none), version 1's memory.limit_in_bytes (none is a number near 2**63, above any machine). Inside
    a container's cgroup namespace the path is "/", whose files sit at the root of the mount."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    files = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":                           # version 2: "0::/path"
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):        # version 1: "4:memory:/path"
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        here = PurePosixPath(path.strip() or "/")
        files += [base / str(d).lstrip("/") / name for d in (here, *here.parents)]
    limits = []
    for f in files:
        try:
            value = f.read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            limits.append(int(value))
    return limits


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


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` inside the block (None: unchanged), set back after: a CPU
    session's share of the cores for the processes that compute side by side (NeoxSession._ahead_threads)."""
    if threads is None:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
