"""Free TCP ports, chosen at deploy time and held until the deployment is closed.

MII's defaults (load balancer 50050, torch.distributed 29500, REST gateway 51080) collide as soon as two
sessions share a host (docs/STACK.md trap 8). A port that is free when checked can still be taken before the
server binds it, so each chosen port is also *reserved*: an exclusive file lock (filelock, flock on
Linux) on a per-port file in a host-wide directory. Other pickers (threads, processes, other sessions)
skip reserved ports; the kernel drops the lock when the holder exits, so a killed session never leaves a
stale reservation.

Ports come from below the kernel's ephemeral range (ip_local_port_range): the kernel hands those out to
outgoing connections (NCCL bootstrap, gRPC clients) at any moment, which would race with our servers."""
from __future__ import annotations

import errno
import os
import random
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from pytest_neoxmii.errors import NeoxUsageError


def _lock_dir() -> Path:
    # Read when a port is reserved, not at import: a worker forked from the fork server imported this module
    # in the server, under the environment the server started with (deploy/forkserver.py).
    return Path(os.environ.get("NEOXMII_PORT_LOCK_DIR") or Path(tempfile.gettempdir()) / "pytest-neoxmii-ports")


LOWEST = 20000
RANGE_ENV = "NEOXMII_PORT_RANGE"


def parse_range(text: str) -> range:
    """'20000-29999' -> the ports from the first to the last; anything else is a usage error (the session
    checks it at start-up: in a worker it was a ValueError traceback as the engine's load failure)."""
    first, dash, last = text.strip().partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        low = high = 0
    if not (dash and 1 <= low <= high <= 65535):
        raise NeoxUsageError(f"{RANGE_ENV}={text!r}: expected the first and last port, such as 20000-29999, "
                             "within 1-65535")
    return range(low, high + 1)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def candidate_range() -> range:
    """Where ports are picked: $NEOXMII_PORT_RANGE ("20000-29999") if set, else from LOWEST up to the
    ephemeral range (or above it when that starts low)."""
    custom = os.environ.get(RANGE_ENV)
    if custom:
        return parse_range(custom)
    low, high = _ephemeral_range()
    if low - LOWEST >= 1000:
        return range(LOWEST, low)
    return range(high + 1, 65536)


def is_free(port: int) -> bool:
    """Nothing bound to the port on any IPv4 or IPv6 address. MII's gRPC servers bind [::]:port (every
    address), so a port bound on 127.0.0.1 alone by someone else would still make them fail."""
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, host in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue          # no IPv6 on this host: nothing can be bound there either
            return False
    return True


@dataclass
class PortReservation:
    """Ports held for one deployment. release() (or process exit) gives them back."""

    ports: list[int]
    _locks: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        for lock in self._locks:
            try:
                lock.release()
            except OSError:
                pass
        self._locks.clear()

    def __enter__(self) -> "PortReservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(port: int) -> FileLock | None:
    """The port's lock, held, or None when someone else holds it (never waits)."""
    lock_dir = _lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    # thread_local=False: a deployment may be closed from another thread than the one that deployed it.
    lock = FileLock(lock_dir / f"{port}.lock", timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def _try_block(base: int, count: int):
    """Lock, then check, base .. base+count-1; all or nothing. Lock first: checking first would let two
    pickers both see the port free and the loser only find out when its server fails to bind."""
    locks = []
    for port in range(base, base + count):
        lock = _lock(port)
        if lock is None or not is_free(port):
            if lock is not None:
                lock.release()
            for held in locks:
                held.release()
            return None
        locks.append(lock)
    return locks


def reserve(count: int = 1, *, consecutive: bool = False, attempts: int = 2000) -> PortReservation:
    """count free ports (count consecutive ones when MII derives them as base + i), reserved."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    candidates = candidate_range()
    rng = random.SystemRandom()
    chosen: list[int] = []
    locks: list = []
    blocks = [count] if consecutive else [1] * count
    for size in blocks:
        for _ in range(attempts):
            base = rng.randrange(candidates.start, candidates.stop - size + 1)
            if any(p in chosen for p in range(base, base + size)):
                continue
            got = _try_block(base, size)
            if got is not None:
                chosen.extend(range(base, base + size))
                locks.extend(got)
                break
        else:
            for lock in locks:
                lock.release()
            raise RuntimeError(f"no block of {size} free TCP port(s) found in {candidates.start}-"
                               f"{candidates.stop - 1} after {attempts} attempts")
    return PortReservation(chosen, locks)


@dataclass
class MiiPorts:
    """Every port an MII LOCAL deployment of one replica uses. MII derives the gRPC port of tensor-parallel
    rank i as port_number + 1 + i (mii/legacy/config.py, generate_replica_configs), so the load balancer
    and the ranks are one consecutive block; torch.distributed and the REST gateway are separate."""

    load_balancer: int
    ranks: list[int]
    torch_dist: int
    restful: int
    reservation: PortReservation = field(repr=False)

    @property
    def all(self) -> list[int]:
        return [self.load_balancer, *self.ranks, self.torch_dist, self.restful]

    def release(self) -> None:
        self.reservation.release()


def reserve_mii(tensor_parallel: int) -> MiiPorts:
    block = reserve(tensor_parallel + 1, consecutive=True)
    extra = reserve(2)
    both = PortReservation(block.ports + extra.ports, block._locks + extra._locks)
    return MiiPorts(load_balancer=block.ports[0], ranks=block.ports[1:], torch_dist=extra.ports[0],
                    restful=extra.ports[1], reservation=both)
