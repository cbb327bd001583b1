"""The process trees of a deployment: start them, watch them, end every one of their processes, and say
what was left behind.

Why this much: MII's terminate is only a gRPC message, and on a LOCAL tp=2 deployment it returned in
0.01 s with the servers still running and holding GPU memory (docs/STACK.md trap 8). So each deployment runs
in its own session and process group, every process it starts carries a tag in its environment
(NEOXMII_DEPLOYMENT, inherited through the DeepSpeed launcher and its ranks), and teardown ends the
group, the tree under each root and every tagged process (which finds even a process that called
setsid and was re-parented), then waits until GPU memory is back at its pre-deployment level.
Whatever survives is reported (warning, stderr line, leaks()), never ignored.

A small reaper process per deployment ends the tagged processes if the test process itself dies
without tearing down (SIGKILL, OOM killer), which no in-process handler can cover."""
from __future__ import annotations

import atexit
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import psutil

from pytest_neoxmii.errors import in_brief

TAG_ENV = "NEOXMII_DEPLOYMENT"
# The tags of the deployments hosting the one a process was started for (comma-separated, outermost first): a
# worker hosting a deployment of its own (MII's gRPC server under the mii worker) gives that deployment's
# processes its tag, and they stay the worker's wherever they are re-parented (tagged(worker's tag)).
HOSTS_ENV = "NEOXMII_DEPLOYMENT_HOSTS"
# NVLink multicast stays off in every process we start (the GPU hosts are shared; docs/STACK.md trap 13).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class DeploymentError(RuntimeError):
    """A deployment failed to start or stopped answering; the message carries the log tail."""


class ServerDied(DeploymentError):
    pass


class ReadinessTimeout(DeploymentError):
    pass


class WorkerCrashed(DeploymentError):
    """A worker process died (signal, CUDA error, exception): a test result for every test needing it."""


_RANK_EXIT = re.compile(r"exits with return code = (-?\d+)")


# What Python's faulthandler prints when a fatal signal kills the process (PYTHONFAULTHANDLER=1).
_FATAL_SIGNAL = re.compile(r"Fatal Python error: (Aborted|Segmentation fault|Floating point exception|Bus error|"
                           r"Illegal instruction)")
_FATAL_NAMES = {"Aborted": "SIGABRT", "Segmentation fault": "SIGSEGV", "Floating point exception": "SIGFPE",
                "Bus error": "SIGBUS", "Illegal instruction": "SIGILL"}


def crash_excerpt(log_text: str, tail: str, before: int = 12) -> str:
    """The log lines a crash report shows: what the dying rank printed up to its fatal-signal line (its
    last words, which faulthandler's stack dump and the other ranks' tracebacks push out of the tail), then
    the tail itself."""
    lines = log_text.splitlines()
    fatal = next((i for i, line in enumerate(lines) if _FATAL_SIGNAL.search(line)), None)
    if fatal is None:
        return tail
    head = "\n".join(lines[max(0, fatal - before):fatal + 1])
    return head if head in tail else f"{head}\n...\n{tail}"


def describe_exit(code: int | None, log_text: str = "", oom_kills_before: int | None = None) -> str:
    """'killed by SIGABRT', 'exit code 1'. First what a dying rank said itself (faulthandler's fatal-signal
    line). Then the DeepSpeed launcher, which exits 1 whatever ended a rank and logs one rank's return code
    ('exits with return code = -6'): when one rank aborts and the others then fail on their broken
    connection, it logs whichever dead rank its poll meets first (it iterates over a set), so its code alone
    named the abort only sometimes. A SIGKILL while the kernel's OOM killer killed (its count since
    `oom_kills_before`, oom_kills()) is said to be that."""
    fatal = _FATAL_SIGNAL.search(log_text)
    if fatal:
        return f"killed by {_FATAL_NAMES[fatal.group(1)]}"
    ranks = [int(c) for c in _RANK_EXIT.findall(log_text)]
    codes = [c for c in ranks if c != 0] or ([code] if code is not None else [])
    if not codes:
        return "exit status unknown"
    c = codes[0]
    if c == -signal.SIGKILL and oom_kills_before is not None and (oom_kills() or 0) > oom_kills_before:
        return ("killed by SIGKILL, as the kernel's OOM killer kills: the machine (or its container) ran out of "
                "memory while it ran")
    if c < 0:
        try:
            return f"killed by {signal.Signals(-c).name}"
        except ValueError:
            return f"killed by signal {-c}"
    return f"exit code {c}"


def oom_kills(vmstat: str = "/proc/vmstat") -> int | None:
    """How many processes the kernel's OOM killer has killed since boot, a container's limit included
    (Linux's oom_kill event count); None where unknown."""
    try:
        with open(vmstat) as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


# Deployment processes volunteer to be the OOM killer's first choice. When memory runs out, the kernel kills
# the process with the largest share of it; in a CPU session that is often the test process (it holds the fp32
# reference), and pytest then vanished without a word (pythia-1b, synthetic weights, in a 6 GiB cgroup: exit
# 137 after 40 s, no output). A worker that is killed instead is a crash of its engine, which the session
# reports and survives. Children inherit the setting.
OOM_SCORE_ADJ = 1000


def volunteer_for_oom_killer(pid: int | str = "self") -> None:
    """Make the process `pid` (of this user) the first the kernel's OOM killer takes; nothing where it cannot."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError:
        pass


class DeploymentLeakWarning(UserWarning):
    """Processes or GPU memory of a deployment survived its teardown."""


def new_tag(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


def run_dir(tag: str) -> Path:
    """Where a deployment keeps its logs, hostfile and rank reports ($NEOXMII_RUN_DIR or the temp dir)."""
    import tempfile
    base = Path(os.environ.get("NEOXMII_RUN_DIR") or Path(tempfile.gettempdir()) / "pytest-neoxmii-runs")
    path = base / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def env_float(name: str, default: float) -> float:
    """A number of seconds or MiB from the environment; a value that is not a non-negative number is said in
    one line (a warning) and the default used, rather than silently ignored."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:                  # also NaN
        warnings.warn(f"{name}={raw!r} is not a non-negative number: using {default:g}", stacklevel=2)
        return default
    return value


def deployment_env(tag: str | None, extra: dict[str, str] | None = None,
                   base: dict[str, str] | None = None) -> dict[str, str]:
    """The compat child environment (GPT-NeoX patches via sitecustomize, docs/STACK.md trap 1), transformers'
    optional frameworks off (lean_imports.py), multicast off, unbuffered output (so a log tail shows the last
    words of a dying process) and the deployment's tag."""
    from pytest_neoxmii import compat, lean_imports
    env = lean_imports.child_env(compat.child_env(base))
    env.update(SAFE_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    # A rank killed by a signal then says so itself ("Fatal Python error: Aborted" and its stack): the
    # launcher's own log names only one rank's code, and not always the rank that died first.
    env["PYTHONFAULTHANDLER"] = "1"
    env.pop(TAG_ENV, None)
    env.pop(HOSTS_ENV, None)
    if tag is not None:
        env[TAG_ENV] = tag
        # Whom this process belongs to is in its own environment (os.environ), not in `base`, which is only
        # what the child starts from: a worker hosting a server passes on its own tag and its hosts'.
        hosts = [h for h in os.environ.get(HOSTS_ENV, "").split(",") + [os.environ.get(TAG_ENV, "")] if h]
        if hosts:                       # started from inside a deployment's process: it hosts this one
            env[HOSTS_ENV] = ",".join(hosts)
    env.update(extra or {})
    return env


# -- looking at processes ------------------------------------------------------------------------------

def _starttime(pid: int) -> float | None:
    """When the process started: with the pid, it names one process, so a pid the kernel reused for
    someone else's process is never taken for ours."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie has released its memory and counts as gone."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def descendants(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _tags_of(pid: int) -> list[str]:
    """The deployment a process was started for and the ones hosting it ([] for any other process)."""
    try:
        env = psutil.Process(pid).environ()
    except psutil.Error:                  # gone, or someone else's process
        return []
    return [t for t in [env.get(TAG_ENV, "")] + env.get(HOSTS_ENV, "").split(",") if t]


def tagged(tag: str) -> set[int]:
    """Living processes started for the deployment `tag`, or for a deployment it hosts (wherever they were
    re-parented to)."""
    me = os.getpid()
    return {p for p in psutil.pids() if p != me and tag in _tags_of(p) and alive(p)}


def living(pids: Iterable[int]) -> list[int]:
    return sorted(p for p in pids if alive(p))


# -- one process tree ----------------------------------------------------------------------------------

@dataclass
class ProcessTree:
    """A command started in its own session (so Ctrl-C at the terminal reaches the test process only, and
    the teardown decides the order) with its output, and its children's, in one log file."""

    name: str
    popen: subprocess.Popen      # or a forkserver.ForkedProcess, which has the same calls
    log_path: Path
    tag: str | None
    started: float = field(default_factory=time.monotonic)
    seen: dict[int, int | None] = field(default_factory=dict)   # every process of the tree seen: pid -> start
    oom_kills_at_start: int | None = field(default_factory=oom_kills)   # the kernel's count (describe_exit)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        """Raise ServerDied, with the tail of the log, if the root process has exited."""
        code = self.popen.poll()
        if code is not None:
            tail = self.log_tail()
            how = describe_exit(code, tail, self.oom_kills_at_start)
            raise ServerDied(f"{self.name} (pid {self.pid}) exited with code {code} ({how}) "
                             f"{time.monotonic() - self.started:.1f} s after start; last lines of "
                             f"{self.log_path}:\n{tail}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - 256 * 1024, 0))
                text = f.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        tail = [ln[:400] for ln in text.splitlines()[-lines:]]
        return "\n".join("    " + ln for ln in tail) if tail else "    (log is empty)"

    @property
    def root_exists(self) -> bool:
        """The root process was started (a worker asked of the fork server may still be waiting for it)."""
        return getattr(self.popen, "started", True)

    def settle_root(self) -> None:
        """A root still waiting to be started never will be; one being started is waited for."""
        getattr(self.popen, "cancel_if_pending", lambda: None)()

    def pids(self) -> set[int]:
        """The root and its descendants now, plus every process seen before that is still alive (the same
        process: same pid and start time; a re-parented one is no longer found from the root)."""
        running = self.root_exists and self.popen.poll() is None
        now = {self.pid} | descendants(self.pid) if running else set()
        for pid in now:
            self.seen.setdefault(pid, _starttime(pid))
        return {p for p, start in self.seen.items() if alive(p) and _starttime(p) == start}


def start(cmd: list[str], *, name: str, log_path: Path, tag: str | None,
          env_extra: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
          leftovers: tuple[str, ...] = (), spawn: Callable[..., object | None] | None = None) -> ProcessTree:
    """Start `cmd` (see ProcessTree). `leftovers`: directories the tag's reaper removes after ending the
    processes, should the test process die without tearing down (a worker's spill directory in /dev/shm,
    which no reboot-less cleanup would otherwise free). `spawn(cmd, env, cwd, log_path)`: another way to
    start the same process, returning a Popen-like handle, or None to leave it to exec (the fork server,
    deploy/forkserver.py); its root may then still be starting when this returns (ProcessTree.root_exists)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = deployment_env(tag, env_extra)
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        popen = spawn(cmd, env, os.fspath(cwd) if cwd is not None else os.getcwd(), log_path) if spawn else None
        if popen is None:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, start_new_session=True)
            volunteer_for_oom_killer(popen.pid)   # (a forked root inherits it from its fork server)
    tree = ProcessTree(name=name, popen=popen, log_path=log_path, tag=tag)
    tree.pids()
    _install_sigterm_guard()
    if tag is not None:
        _start_reaper(tag, leftovers)
    return tree


def wait_ready(trees: list[ProcessTree], ready: Callable[[], bool], *, timeout: float, what: str,
               interval: float = 0.25) -> float:
    """Poll ready() until it is true; a root that exits meanwhile raises ServerDied at once (within one
    interval) with its log tail, and the timeout raises ReadinessTimeout with every log's tail."""
    t0 = time.monotonic()
    while True:
        for tree in trees:
            tree.check_alive()
            tree.pids()              # remember the tree while its parents still link it
        if ready():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            tails = "\n".join(f"  {t.name} (pid {t.pid}), {t.log_path}:\n{t.log_tail()}" for t in trees)
            raise ReadinessTimeout(f"{what} not ready after {timeout:.0f} s, its processes still running; "
                                   f"last lines of each log:\n{tails}")
        time.sleep(interval)


# -- teardown ------------------------------------------------------------------------------------------

@dataclass
class TeardownReport:
    name: str
    pids: list[int]                      # processes of the deployment found at teardown
    survivors: list[int]                 # still alive after SIGKILL
    polite: str                          # what the polite stop did
    seconds: float
    tolerance_mib: float = 100.0
    memory_baseline_mib: dict[int, float] | None = None
    memory_after_mib: dict[int, float] | None = None
    memory_not_returned_mib: dict[int, float] = field(default_factory=dict)
    memory_error: str | None = None
    memory_baseline_is: str = "before the deployment"

    @property
    def leaked(self) -> bool:
        return bool(self.survivors or self.memory_not_returned_mib)

    def describe(self) -> str:
        memory = ""
        if self.memory_error:
            memory = f"; GPU memory not checked ({self.memory_error})"
        elif self.memory_after_mib is not None:
            delta = ", ".join(f"GPU {i} {self.memory_after_mib[i] - self.memory_baseline_mib.get(i, 0.0):+.0f} MiB"
                              for i in sorted(self.memory_after_mib))
            memory = f"; GPU memory vs {self.memory_baseline_is}: {delta}"
        if not self.leaked:
            # pids: what was still running after the polite stop, and was signalled
            stopped = f"{len(self.pids)} process(es) signalled and ended" if self.pids else "none left to signal"
            return f"{self.name}: torn down in {self.seconds:.1f} s, polite stop: {self.polite}; {stopped}{memory}"
        parts = []
        if self.survivors:
            parts.append(f"{len(self.survivors)} process(es) still alive after SIGKILL: pids "
                         f"{', '.join(map(str, self.survivors))}")
        if self.memory_not_returned_mib:
            parts.append("GPU memory not returned: " + ", ".join(
                f"GPU {i} {mib:.0f} MiB" for i, mib in sorted(self.memory_not_returned_mib.items()))
                + f" (tolerance {self.tolerance_mib:.0f} MiB)")
        return f"{self.name}: LEAK after teardown: {'; '.join(parts)}{memory}"

    def as_dict(self) -> dict:
        return {"name": self.name, "pids": self.pids, "survivors": self.survivors, "polite": self.polite,
                "seconds": round(self.seconds, 3), "leaked": self.leaked, "tolerance_mib": self.tolerance_mib,
                "memory_baseline_mib": self.memory_baseline_mib, "memory_after_mib": self.memory_after_mib,
                "memory_not_returned_mib": self.memory_not_returned_mib, "memory_error": self.memory_error,
                "memory_baseline_is": self.memory_baseline_is}


_LEAKS: list[TeardownReport] = []


def leaks() -> list[TeardownReport]:
    """Every teardown of this process that left something behind."""
    return list(_LEAKS)


def leak_summary_lines(since: int = 0) -> list[str]:
    """The summary's lines of the leaks after the first `since` (those of one session)."""
    return [f"neoxmii: {r.describe()}" for r in _LEAKS[since:]]


def _signal(pids: Iterable[int], trees: list[ProcessTree], sig: int) -> None:
    pids = list(pids)
    for tree in trees:
        # start_new_session: the root's pid is the group id. Signal the group only while it is provably
        # ours (the root not yet reaped, or one of our processes in it): a reaped root's pid can be reused.
        ours = tree.popen.poll() is None
        for pid in pids if not ours else ():
            try:
                ours = ours or os.getpgid(pid) == tree.pid
            except (ProcessLookupError, PermissionError):
                pass
        if ours:
            try:
                os.killpg(tree.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: set[int], trees: list[ProcessTree], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for tree in trees:
            tree.popen.poll()            # reap our own children, or they stay zombies
        if not living(pids) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def teardown_with_settings(trees: list[ProcessTree], *, polite_timeout_default: float, **kwargs) -> TeardownReport:
    """teardown() with the limits users set through the environment (NEOXMII_POLITE_TIMEOUT,
    NEOXMII_LEAK_TOLERANCE_MIB, NEOXMII_MEMORY_TIMEOUT): what every deployment's close() calls."""
    return teardown(trees, polite_timeout=env_float("NEOXMII_POLITE_TIMEOUT", polite_timeout_default),
                    tolerance_mib=env_float("NEOXMII_LEAK_TOLERANCE_MIB", 100),
                    memory_timeout=env_float("NEOXMII_MEMORY_TIMEOUT", 30), **kwargs)


def teardown(trees: list[ProcessTree], *, name: str, tag: str | None = None,
             polite: Callable[[], object] | None = None, polite_timeout: float = 10.0,
             term_timeout: float = 10.0, kill_timeout: float = 5.0,
             memory_probe: Callable[[], dict[int, float]] | None = None,
             memory_baseline: dict[int, float] | None = None, memory_timeout: float = 30.0,
             tolerance_mib: float = 100.0, memory_baseline_is: str = "before the deployment") -> TeardownReport:
    """Polite stop, SIGTERM to every process of the deployment, SIGKILL to survivors, then wait for GPU
    memory to come back. Ctrl-C and SIGTERM are held back meanwhile (and delivered after), so a second
    Ctrl-C cannot leave the deployment half torn down."""
    with deferred_signals():
        t0 = time.monotonic()
        for tree in trees:               # a root still waiting for the fork server would start after the teardown
            tree.settle_root()
        polite_result = "none"
        if polite is not None and any(t.popen.poll() is None for t in trees):
            try:
                polite()
                polite_result = "sent"
            except Exception as exc:     # the processes are ended below in any case
                polite_result = f"failed ({in_brief(exc, lines=1)})"
            deadline = time.monotonic() + polite_timeout
            while any(t.popen.poll() is None for t in trees) and time.monotonic() < deadline:
                for t in trees:
                    t.pids()
                time.sleep(0.1)
            exited = all(t.popen.poll() is not None for t in trees)
            polite_result += (", processes exited" if exited
                              else f", processes still running after {polite_timeout:.0f} s")
        known: set[int] = set()
        for tree in trees:
            known |= tree.pids()
        if tag is not None:
            known |= tagged(tag)
        found = sorted(known)
        _signal(living(known), trees, signal.SIGTERM)
        _wait_gone(known, trees, term_timeout)
        if tag is not None:
            known |= tagged(tag)         # started late, or missed by the tree walk
        rest = living(known)
        if rest:
            _signal(rest, trees, signal.SIGKILL)
            _wait_gone(known, trees, kill_timeout)
        survivors = living(known | (tagged(tag) if tag is not None else set()))
        if tag is not None:
            _stop_reaper(tag)
        report = TeardownReport(name=name, pids=found, survivors=survivors, polite=polite_result,
                                seconds=0.0, tolerance_mib=tolerance_mib, memory_baseline_is=memory_baseline_is)
        if memory_probe is not None and memory_baseline is not None:
            _wait_memory(report, memory_probe, memory_baseline, memory_timeout)
        report.seconds = time.monotonic() - t0
        if report.leaked:
            _LEAKS.append(report)
            line = f"neoxmii: {report.describe()}"
            print(line, file=sys.__stderr__, flush=True)
            warnings.warn(DeploymentLeakWarning(report.describe()), stacklevel=2)
        return report


def _wait_memory(report: TeardownReport, probe, baseline: dict[int, float], timeout: float) -> None:
    """GPU memory is freed when the driver has cleaned up after the killed processes: poll for it."""
    report.memory_baseline_mib = dict(baseline)
    deadline = time.monotonic() + timeout
    while True:
        try:
            now = probe()
        except Exception as exc:
            report.memory_error = f"probe failed: {type(exc).__name__}: {exc}"
            return
        over = {i: now[i] - baseline.get(i, 0.0) for i in now
                if now[i] - baseline.get(i, 0.0) > report.tolerance_mib}
        if not over or time.monotonic() > deadline:
            report.memory_after_mib = now
            report.memory_not_returned_mib = over
            return
        time.sleep(0.25)


# -- signals, exit, and the reaper ---------------------------------------------------------------------

@contextmanager
def deferred_signals(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT/SIGTERM back during a critical section, then deliver them. Main thread only (Python
    runs handlers there); elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])


_LIVE: dict[str, Callable[[], object]] = {}


def register_live(key: str, closer: Callable[[], object]) -> None:
    """A deployment that is up: closed at interpreter exit if nobody closed it before."""
    _LIVE[key] = closer


def unregister_live(key: str) -> None:
    _LIVE.pop(key, None)


def live() -> list[str]:
    return list(_LIVE)


def other_live_pids(tag: str) -> set[int]:
    """The processes of this session's other live deployments (their GPU memory is not `tag`'s), with
    their descendants: a worker hosting a deployment of its own (MII's servers under an isolated engine)
    starts processes that carry that deployment's tag, not the worker's."""
    pids: set[int] = set()
    for other in list(_LIVE):
        if other != tag:
            for pid in tagged(other):
                pids |= {pid} | descendants(pid)
    return pids


@atexit.register
def _close_all_live() -> None:
    for key in list(_LIVE):
        closer = _LIVE.pop(key, None)
        try:
            closer()
        except Exception as exc:
            print(f"neoxmii: closing deployment {key} at exit failed: {exc}", file=sys.__stderr__)


_SIGTERM_REPEATS_S = 5.0     # how long after the first SIGTERM a second one is taken as the same request
_first_sigterm_at: float | None = None


def _sigterm(signum, frame):
    """SIGTERM (a CI job cancelled) while a deployment is up: its default would end this process at once
    with the servers still running; as KeyboardInterrupt, pytest tears the session down first.

    A cancelled job's kill of the process group, or `timeout` passing its own on, delivers it twice within
    milliseconds; the second, raised while pytest handled the first, ended the session with a traceback
    through pytest's internals and without its summary. Repeats within _SIGTERM_REPEATS_S are that same
    request, and ignored; a later one ends the process at once (the workers' reapers end the deployments)."""
    global _first_sigterm_at
    if _LIVE:
        now = time.monotonic()
        if _first_sigterm_at is None:
            _first_sigterm_at = now
            raise KeyboardInterrupt(f"signal {signum}")
        if now - _first_sigterm_at < _SIGTERM_REPEATS_S:
            return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)


def _install_sigterm_guard() -> None:
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm)


_REAPERS: dict[str, subprocess.Popen] = {}


def _start_reaper(tag: str, leftovers: tuple[str, ...] = ()) -> None:
    if tag in _REAPERS:
        return
    env = deployment_env(None)
    _REAPERS[tag] = subprocess.Popen(
        [sys.executable, "-m", "pytest_neoxmii.deploy.processes", "reap", tag, str(os.getpid()),
         *map(str, leftovers)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        start_new_session=True)


def _stop_reaper(tag: str) -> None:
    reaper = _REAPERS.pop(tag, None)
    if reaper is not None:
        reaper.kill()
        reaper.wait(timeout=10)


def kill_tagged(tag: str, grace: float = 5.0) -> list[int]:
    """SIGTERM every process of the tag, SIGKILL what is left after `grace`; returns the survivors."""
    pids = tagged(tag)
    if not pids:
        return []
    _signal(pids, [], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while living(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids |= tagged(tag)
    _signal(living(pids), [], signal.SIGKILL)
    time.sleep(0.2)
    return living(pids | tagged(tag))


def _reap_main(tag: str, parent: int, leftovers: list[str]) -> None:
    """Wait for the test process to go away; if it did so without tearing down, end the deployment and
    remove what it left (a clean teardown stops this process first)."""
    while os.getppid() == parent and alive(parent):
        time.sleep(0.5)
    kill_tagged(tag)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "reap":
    _reap_main(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
