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
import time
from typing import Callable, Iterable, NamedTuple

Probe = Callable[[], dict[int, float]]


def _smi(query: str, kind: str = "gpu") -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-{kind}={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def _gpus() -> tuple[dict[int, float], dict[str, int]]:
    """({gpu index: MiB used}, {uuid: index}) from one memory.used reading."""
    rows = _smi("index,uuid,memory.used")
    return {int(i): float(mib) for i, _uuid, mib in rows}, {uuid: int(i) for i, uuid, _ in rows}


def _apps() -> list[list[str]]:
    """nvidia-smi's compute-apps rows (uuid, pid, MiB); none where it cannot say."""
    try:
        return _smi("gpu_uuid,pid,used_memory", kind="compute-apps")
    except (subprocess.SubprocessError, OSError):
        return []


# A reading is two nvidia-smi calls about 25 ms apart (one H200): the GPUs' memory.used, then the processes'
# figures. A process that allocates in between is counted in one and not the other. Once, on one H200, the
# baseline of a teardown check was taken while the replacement of a ds deployment was loading beside it, and
# the close then read "GPU memory not returned: 154 MiB" for its whole 30 s wait (docs/SPEED.md, sixteenth
# round). So the processes are read before and after memory.used, until both agree. nvidia-smi's two figures
# move within one call of an allocation (docs/STACK.md trap 27), so lists that agree bracket a memory.used of
# the same moment. A process allocating faster than a reading takes (every 20 ms, on one H200) never lets
# them agree: after a bounded wait the reading says it is not steady, rather than hold a teardown up.
STEADY_WINDOW_S = 2.0


class Reading(NamedTuple):
    used: dict[int, float]          # {gpu index: MiB used}
    index_of: dict[str, int]        # {uuid: gpu index}
    apps: list[list[str]]           # compute-apps rows (uuid, pid, MiB)
    steady: bool                    # the rows read just before and just after memory.used were the same


def reading() -> Reading:
    """memory.used and the compute-apps rows of one moment: the rows are read just before and just after
    memory.used until both are the same, or STEADY_WINDOW_S has passed (steady=False, the last rows)."""
    deadline = time.monotonic() + STEADY_WINDOW_S
    apps = _apps()
    while True:
        used, index_of = _gpus()
        after = _apps()
        if after == apps:
            return Reading(used, index_of, apps, True)
        if time.monotonic() > deadline:
            return Reading(used, index_of, after, False)
        apps = after


def _by_uuid(pids: Iterable[int], apps: list[list[str]]) -> dict[str, float]:
    """{GPU uuid: MiB} that the compute-apps rows give to `pids` ("[N/A]" under some drivers, or another PID
    namespace: nothing)."""
    wanted = {str(p) for p in pids}
    held: dict[str, float] = {}
    for uuid, pid, mib in apps:
        if pid in wanted and mib.replace(".", "", 1).isdigit():
            held[uuid] = held.get(uuid, 0.0) + float(mib)
    return held


def _attributed(pids: Iterable[int], index_of: dict[str, int], apps: list[list[str]]) -> dict[int, float]:
    """{gpu index: MiB} that the compute-apps rows give to `pids`; index_of maps each GPU's uuid to its index."""
    return {index_of[uuid]: mib for uuid, mib in _by_uuid(pids, apps).items() if uuid in index_of}


class UsedAndHeld(NamedTuple):
    used: dict[int, float]          # {gpu index: MiB used} less what the excluded processes hold
    held: dict[int, float]          # {gpu index: MiB} the own processes hold
    steady: bool                    # from a steady reading (see reading())


def _less(r: Reading, exclude_pids: Iterable[int], own_pids: Iterable[int]) -> UsedAndHeld:
    used = dict(r.used)
    for index, mib in _attributed(exclude_pids, r.index_of, r.apps).items():
        used[index] -= mib
    return UsedAndHeld(used, _attributed(own_pids, r.index_of, r.apps), r.steady)


def used_and_held(exclude_pids: Iterable[int], own_pids: Iterable[int]) -> UsedAndHeld:
    """From one reading: {gpu index: MiB used} less what exclude_pids hold, and {gpu index: MiB} that own_pids
    hold (a teardown's baseline is the first less the second: taken apart, a change between them is a leak)."""
    exclude_pids, own_pids = set(exclude_pids), set(own_pids)
    if not exclude_pids and not own_pids:       # no process figure needed: one call
        return UsedAndHeld(_gpus()[0], {}, True)
    return _less(reading(), exclude_pids, own_pids)


def used_beside(own_pids: Iterable[int]) -> UsedAndHeld:
    """From one reading: {gpu index: MiB used} less what every process nvidia-smi lists outside own_pids holds,
    and {gpu index: MiB} that own_pids hold. What is left is own_pids' memory and memory no listed process
    holds, so that on a GPU shared with other jobs (or the unit suite's xdist workers) their allocations
    during a close are not the closing deployment's leak. Only meaningful where nvidia-smi lists own_pids
    (the same PID namespace): elsewhere their own memory would be left out too."""
    own_pids = {str(p) for p in own_pids}
    r = reading()
    strangers = {int(pid) for _uuid, pid, _mib in r.apps if pid.isdigit() and pid not in own_pids}
    return _less(r, strangers, {int(p) for p in own_pids})


def nvidia_smi_used(exclude_pids: Iterable[int] = ()) -> dict[int, float]:
    """{gpu index: MiB used}, less what exclude_pids hold where nvidia-smi attributes it."""
    return used_and_held(exclude_pids, ())[0]


def held_by(pids: Iterable[int]) -> dict[int, float]:
    """{gpu index: MiB} that nvidia-smi attributes to `pids`; empty where it attributes nothing to them (they
    hold nothing, or live in another PID namespace) or cannot say."""
    if not shutil.which("nvidia-smi"):
        return {}
    try:
        index_of = {uuid: int(i) for i, uuid, _ in _smi("index,uuid,memory.used")}   # (memory.used unread)
    except (subprocess.SubprocessError, OSError, ValueError):
        return {}
    return _attributed(pids, index_of, _apps())


def used_by_others(pid: int | None = None) -> dict[str, float]:
    """{GPU uuid: MiB} in use by every process but `pid` (this one by default), from one nvidia-smi reading:
    what another job on a shared GPU, or a session that did not end, holds before this session deploys
    anything. Empty where nvidia-smi is missing or fails."""
    if not shutil.which("nvidia-smi"):
        return {}
    try:
        r = reading()
    except (subprocess.SubprocessError, OSError, ValueError):
        return {}
    mine = _attributed({os.getpid() if pid is None else pid}, r.index_of, r.apps)
    return {uuid: max(0.0, r.used[i] - mine.get(i, 0.0)) for uuid, i in r.index_of.items()}


# Less than this held by others on a GPU is left out: nothing a deployment's fit would notice, and an idle
# card reads a few MiB.
IN_USE_NOTED_BYTES = 256 * 2**20


def in_use_by_others(gpus) -> dict[int, int]:
    """{GPU index: bytes} that processes other than this one hold on each of `gpus` (hardware.Gpu) now, matched
    by uuid: another job on a shared card, or a session that did not end. Read before a session deploys
    anything, it is memory the session cannot count on. Empty without nvidia-smi or uuids."""
    if not any(g.uuid for g in gpus):
        return {}
    by_uuid = used_by_others()
    held = {g.index: int(by_uuid[g.uuid] * 2**20) for g in gpus if g.uuid in by_uuid}
    return {i: b for i, b in held.items() if b >= IN_USE_NOTED_BYTES}


def held_by_uuid(pids: Iterable[int]) -> dict[str, float]:
    """{GPU uuid: MiB} that nvidia-smi attributes to `pids`, from one call. A uuid names the same GPU in every
    process, whatever CUDA_VISIBLE_DEVICES shows it (torch numbers only the GPUs it sees). Empty where
    nvidia-smi is missing or fails, or attributes nothing to them."""
    return _by_uuid(pids, _apps())


def process_used_bytes(pid: int | None = None, uuid: str | None = None) -> int | None:
    """What one process (this one by default) holds on the GPUs, or on the GPU with this uuid, CUDA context
    included, as nvidia-smi attributes it: unlike a device-wide difference, it leaves out what other
    processes load meanwhile (the session's workers load side by side). None where nvidia-smi cannot say
    (not installed, another PID namespace, "[N/A]") or the process holds nothing there."""
    held = held_by_uuid({os.getpid() if pid is None else pid})
    if uuid is not None:
        held = {u: mib for u, mib in held.items() if u == uuid}
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
