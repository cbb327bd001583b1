"""Engine workers forked from one process that has already imported torch, transformers and DeepSpeed.

Why: a worker started by exec is a fresh Python that imports torch, transformers and DeepSpeed before it
loads anything: 7.5-8 CPU-s on a 2-core AMD EPYC with AVX2 (docs/SPEED.md, fourteenth round), paid by every
worker, and the unit suite starts about sixty. The fork server pays it once per test process; each worker is
then a fork of it. The server starts on the first worker's launch and the launch does not wait for it: the
worker's handle (ForkedProcess) is pending until the server has forked it, so the session goes on loading
the reference meanwhile.

The server starts with torch and the worker's own modules (PRELOAD); the rest comes with the requests: each
worker asks for its engine's imports (Backend.worker_imports), which the server imports, once, before it
forks it. A server whose workers need no transformers or DeepSpeed (an engine of the user's, the unit suite's
stand-ins) never imports them: 1.1-1.6 CPU-s instead of 3.4-4.6 on this project's 2-core Xeon, where the
unit suite starts about fifteen servers (docs/SPEED.md, twenty-fifth round).

A forked worker must be what an exec'd one is, for everything the session looks at:
- its own session and process group (setsid), its log as stdout and stderr, stdin from /dev/null, and the
  cwd and sys.path[0] that `python -m` started in the session's cwd has;
- its environment: os.environ is replaced by the one asked for. /proc/PID/environ, which the teardown and the
  reaper read to find a deployment's processes (processes.tagged), is the memory the process started with,
  which Python cannot reset: the server starts with a placeholder entry (ROOM_ENV) and the child overwrites
  it in place with its tags. The server checks once that the kernel then shows them;
- what the imports read from the environment: only where the asked-for environment differs from the
  server's in keys read at run time (RUNTIME_KEYS) is the worker forked; any other difference (PYTHONPATH,
  CUDA_VISIBLE_DEVICES, HF_*, thread counts, ...) starts it by exec, as before;
- thread counts: GNU OpenMP hangs a child forked after a parallel region (seen here: a child's matmul never
  returned), so the server runs with one OpenMP thread and no parallel work, and the child sets torch's
  count as its environment, or torch's default on this machine (probed before the imports), would have;
- CUDA (docs/STACK.md trap 26): a process forked after its parent initialised the CUDA driver cannot use
  it. On the lent H200 machines, `import deepspeed` initialised it (a driver thread appeared) although
  torch's NVML-based check was on, and the image's jax started a jemalloc thread at transformers' import. So
  there is no fork server on a machine with GPUs (gpus_present): its workers are started by exec, as before,
  and import side by side on its many cores while the test process loads the reference. The server still
  checks, after each import, that it has one thread and an uninitialised driver, and refuses otherwise.

Where the server cannot serve (GPUs, not Linux, a failed check, it dies, NEOXMII_FORKSERVER=0), every worker
is started by exec, and each worker's log says how it was started."""
from __future__ import annotations

import atexit
import ctypes
import gc
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from pytest_neoxmii.deploy.processes import HOSTS_ENV, TAG_ENV, alive, volunteer_for_oom_killer

DISABLE_ENV = "NEOXMII_FORKSERVER"            # "0": start every worker by exec
ROOM_ENV = "NEOXMII_TAG_ROOM"                 # the placeholder a child overwrites with its tags
ROOM_SIZE = 512
THREADS_ENV = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")   # torch's order: MKL's count wins over OpenMP's
# What every worker needs imported, before any request; what an engine needs more comes with its request
# (Backend.worker_imports). A module that is not installed is left to the worker, as before.
# Not the worker module itself: runpy runs it as __main__, and warns when it was imported before.
PRELOAD = ("torch", "pytest_neoxmii.backends.base", "pytest_neoxmii.backends.worker_loop",
           "pytest_neoxmii.deploy.channel")
# Keys that may differ between the server's environment and a forked worker's: nothing imported in the
# server reads them at import time.
# - the plugin's own (NEOXMII_*: tags, channel keys, settings);
# - PYTORCH_NVML_BASED_CUDA_CHECK: DeepSpeed's import sets it in the importing process (so that asking about
#   CUDA creates no context), and torch reads it when asked;
# - pytest's per-test ones and pytester's; HOME and USERPROFILE among them: transformers derives the hub's
#   cache paths from HOME at import, and a worker never uses them (it loads a local directory, weights.py);
# - TORCH_EXTENSIONS_DIR, read when DeepSpeed's kernels are built or loaded.
RUNTIME_KEYS = frozenset({"PYTORCH_NVML_BASED_CUDA_CHECK", "PYTEST_CURRENT_TEST", "PYTEST_DEBUG_TEMPROOT",
                          "PYTEST_ADDOPTS", "TOX_ENV_DIR", "PY_COLORS", "HOME", "USERPROFILE",
                          "TORCH_EXTENSIONS_DIR"})
RUNTIME_PREFIX = "NEOXMII_"
HELLO_TIMEOUT_S = 300.0                       # the server's imports; past it, workers start by exec


def gpus_present() -> bool:
    """An NVIDIA GPU (the driver lists it) or an AMD one (ROCm's kernel driver) on this machine."""
    nvidia = Path("/proc/driver/nvidia/gpus")
    return (nvidia.is_dir() and any(nvidia.iterdir())) or Path("/dev/kfd").exists()


def import_env(env: dict[str, str]) -> dict[str, str]:
    """The part of an environment that the server's imports may have read."""
    return {k: v for k, v in env.items() if k not in RUNTIME_KEYS and not k.startswith(RUNTIME_PREFIX)}


# -- the session's side ----------------------------------------------------------------------------------

class ForkedProcess:
    """A worker asked of the fork server, with the part of subprocess.Popen's interface that the session uses
    (pid, poll, wait, returncode, send_signal, terminate, kill). Pending (`started` False, poll() None) until
    the server has forked it; if the server cannot, it is started by exec instead (`forked` False)."""

    def __init__(self, server: "ForkServer", request: dict, cmd: list[str]):
        self._server, self._request, self._cmd = server, request, cmd
        self._resolved = threading.Event()
        self._lock = threading.Lock()        # the server's thread claims it, or a teardown cancels it
        self._claimed = self._cancelled = False
        self._pid: int | None = None
        self._popen: subprocess.Popen | None = None
        self.forked: bool | None = None
        self.why_not_forked: str | None = None
        self.returncode: int | None = None

    # resolved by the server's thread
    def _forked_as(self, pid: int) -> None:
        self._pid, self.forked = pid, True
        self._resolved.set()

    def _start_by_exec(self, why: str) -> None:
        """The server could not fork it: start the command itself, as processes.start would have."""
        req = self._request
        try:
            with open(req["log"], "ab") as log:
                log.write(f"(not forked: {why}; started by exec)\n".encode())
                log.flush()
                self._popen = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=subprocess.STDOUT, env=req["env"], cwd=req["cwd"],
                                               start_new_session=True)
            self._pid = self._popen.pid
            volunteer_for_oom_killer(self._pid)
        except OSError as exc:               # a start that fails is an exit the session sees and reports
            self.returncode = 127
            with open(req["log"], "ab") as log:
                log.write(f"could not start the worker: {exc}\n".encode())
        self.forked, self.why_not_forked = False, why
        self._resolved.set()

    def _claim(self) -> bool:
        """The server's thread takes it to start it; False if a teardown cancelled it first."""
        with self._lock:
            self._claimed = not self._cancelled
            return self._claimed

    def cancel_if_pending(self) -> None:
        """Torn down before the server took it (still importing): it is never started. Taken already: wait
        until it is, so that the teardown finds it."""
        with self._lock:
            if not self._claimed and not self._resolved.is_set():
                self._cancelled = True
                self.returncode = -signal.SIGTERM
                with open(self._request["log"], "ab") as log:
                    log.write(b"(torn down before the fork server started it: never started)\n")
                self.forked = False
                self._resolved.set()
                return
        self._resolved.wait()

    @property
    def started(self) -> bool:
        """Started, or known never to be (poll() then says how it ended)."""
        return self._resolved.is_set()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._resolved.wait(timeout)

    @property
    def pid(self) -> int | None:
        """The worker's pid (waits until it is started; None only if it could not be)."""
        self._resolved.wait()
        return self._pid

    def poll(self) -> int | None:
        if self.returncode is not None or not self._resolved.is_set():
            return self.returncode
        if self._popen is not None:
            self.returncode = self._popen.poll()
            return self.returncode
        status = self._server.status_path(self._pid)
        try:
            self.returncode = int(status.read_text())
        except (OSError, ValueError):        # not exited (the server writes the status before it reaps)
            if not self._server.running() and not alive(self._pid):
                self.returncode = 255         # the server ended first: nobody could learn the status
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self._cmd, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.pid is not None and self.poll() is None:
            try:
                os.kill(self._pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The server process and the thread that hands it the session's requests, one at a time."""

    def __init__(self, env: dict[str, str]):
        self.import_env = import_env(env)
        self.failed: str | None = None
        self.handles: list[ForkedProcess] = []
        self.status_dir = Path(tempfile.mkdtemp(prefix="neoxmii-forkserver-"))
        self.log_path = self.status_dir / "server.log"
        ours, theirs = socket.socketpair()
        server_env = dict(env)
        server_env.pop(TAG_ENV, None)
        server_env.pop(HOSTS_ENV, None)
        server_env[ROOM_ENV] = "." * ROOM_SIZE
        # The count a child sets is what the environment said; the server itself runs on one thread.
        server_env["NEOXMII_FORKSERVER_THREADS"] = json.dumps({k: env.get(k) for k in THREADS_ENV})
        server_env["OMP_NUM_THREADS"] = "1"
        server_env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-u", "-m", __name__, str(theirs.fileno()), str(self.status_dir)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=server_env, start_new_session=True)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._queue: queue.Queue = queue.Queue()
        self.hello: dict | None = None
        self._thread = threading.Thread(target=self._serve, name="neoxmii-forkserver", daemon=True)
        self._thread.start()

    def running(self) -> bool:
        return self.process.poll() is None

    def status_path(self, pid: int) -> Path:
        return self.status_dir / f"{pid}.exit"

    def start(self, module: str, args: list[str], env: dict[str, str], cwd: str, log_path: Path,
              cmd: list[str], imports: tuple[str, ...] = ()) -> ForkedProcess:
        """A worker running `python -m module *args` with `env`, forked once the server has imported
        `imports`; returns at once (see ForkedProcess)."""
        request = {"module": module, "args": list(args), "env": dict(env), "cwd": cwd, "log": str(log_path),
                   "imports": list(imports)}
        handle = ForkedProcess(self, request, cmd)
        self.handles.append(handle)
        if self.failed:
            handle._claim()
            handle._start_by_exec(self.failed)
        else:
            self._queue.put(handle)
        return handle

    def idle(self) -> bool:
        """No worker of this server is starting or running."""
        return all(h.started and h.poll() is not None for h in self.handles)

    def close(self) -> None:
        """No more workers: the server exits once the ones it forked have (it still reports their exits).
        Waited for a moment, which is all an idle server takes: an unreaped one is a ResourceWarning when
        the pytest process exits (ten of them after the unit suite, before this wait)."""
        self._queue.put(None)
        self._thread.join(timeout=5)
        try:
            self._conn.close()
        except OSError:
            pass
        if self.idle():
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def _fail(self, why: str) -> None:
        self.failed = why
        if self.running():
            self.process.kill()

    def _serve(self) -> None:
        try:
            if not self._conn.poll(HELLO_TIMEOUT_S):
                self._fail(f"the fork server was not ready after {HELLO_TIMEOUT_S:.0f} s")
            else:
                self.hello = self._conn.recv()
                if not self.hello.get("ok"):
                    self._fail(f"the fork server cannot serve here: {self.hello.get('why')}")
        except (EOFError, OSError):
            self._fail(f"the fork server exited while importing (its log: {self.log_path})")
        while True:
            handle = self._queue.get()
            if handle is None:
                return
            if not handle._claim():
                continue
            if self.failed:
                handle._start_by_exec(self.failed)
                continue
            try:
                self._conn.send(handle._request)
                reply = self._conn.recv()
            except (EOFError, OSError):
                self._fail(f"the fork server exited (its log: {self.log_path})")
                handle._start_by_exec(self.failed)
                continue
            if "pid" in reply:
                handle._forked_as(reply["pid"])
            else:
                handle._start_by_exec(reply.get("why", "the fork server refused it"))


def spawner(module: str, args: list[str], imports: tuple[str, ...] = ()):
    """processes.start's `spawn` for `python -u -m module *args`, whose module imports `imports` first:
    forked from the process's fork server, or None (exec) where that would not give the same process
    (server_for)."""
    def spawn(cmd: list[str], env: dict[str, str], cwd: str, log_path: Path) -> ForkedProcess | None:
        server = server_for(env) if _room_fits(_tags(env)) else None
        if server is None:
            return None
        with open(log_path, "ab") as log:
            log.write(f"(asked of the fork server, pid {server.process.pid}, which has imported what the "
                      f"worker needs)\n".encode())
        return server.start(module, args, env, cwd, log_path, cmd, imports)
    return spawn


_SERVER: ForkServer | None = None
_RETIRED: list[ForkServer] = []      # replaced servers, polled until they have exited (no zombie left)
_LOCK = threading.Lock()


def server_for(env: dict[str, str]) -> ForkServer | None:
    """The process's fork server for a worker with environment `env`, started if need be; None where the
    worker must be started by exec: forking is off or impossible here, or the server's imports saw another
    environment than this worker's (then an idle server is replaced by one for the new environment)."""
    global _SERVER
    if os.environ.get(DISABLE_ENV, "") == "0" or not sys.platform.startswith("linux") or gpus_present():
        return None
    if any(env.get(k) is not None and not (env[k].isdigit() and int(env[k]) > 0) for k in THREADS_ENV):
        return None                      # a thread setting torch.set_num_threads cannot reproduce
    with _LOCK:
        _RETIRED[:] = [old for old in _RETIRED if old.running()]
        if _SERVER is not None and _SERVER.import_env != import_env(env):
            if not _SERVER.idle():
                return None
            _SERVER.close()
            _RETIRED.append(_SERVER)
            _SERVER = None
        if _SERVER is None:
            _SERVER = ForkServer(env)
            atexit.register(_SERVER.close)
        return None if _SERVER.failed else _SERVER


# -- the server ------------------------------------------------------------------------------------------

def _environ_room() -> tuple[int, int]:
    """Address and length of the ROOM_ENV entry in the memory /proc/self/environ shows."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    env_start = int(fields[47])          # field 50 of proc(5); the fields after the name start at 3
    with open("/proc/self/environ", "rb") as f:
        block = f.read()
    key = ROOM_ENV.encode() + b"="
    offset = 0 if block.startswith(key) else block.find(b"\0" + key) + 1
    if offset == 0 and not block.startswith(key):
        raise RuntimeError(f"{ROOM_ENV} is not in /proc/self/environ")
    return env_start + offset, block.index(b"\0", offset) - offset


def _tags(env: dict[str, str]) -> dict[str, str]:
    return {k: env[k] for k in (TAG_ENV, HOSTS_ENV) if k in env}


def _room_fits(entries: dict[str, str]) -> bool:
    return sum(len(f"{k}={v}\0".encode()) for k, v in entries.items()) <= ROOM_SIZE


def _write_room(room: tuple[int, int], entries: dict[str, str]) -> None:
    """Overwrite the placeholder with `entries`, NUL-separated, then the placeholder's rest (same length)."""
    address, length = room
    text = b"".join(f"{k}={v}\0".encode() for k, v in entries.items())
    pad = length - len(text) - len(ROOM_ENV) - 1
    if pad < 0:
        raise ValueError(f"{len(text)} bytes of tags do not fit the {length}-byte placeholder")
    data = text + ROOM_ENV.encode() + b"=" + b"." * pad
    ctypes.memmove(address, data, length)


def _room_works(room: tuple[int, int]) -> str | None:
    """Whether the kernel shows what the placeholder is overwritten with (then restored)."""
    with open("/proc/self/environ", "rb") as f:
        before = f.read()
    _write_room(room, {"NEOXMII_ROOM_CHECK": "1"})
    with open("/proc/self/environ", "rb") as f:
        seen = f.read()
    _write_room(room, {})
    with open("/proc/self/environ", "rb") as f:
        restored = f.read()
    if b"\0NEOXMII_ROOM_CHECK=1\0" not in b"\0" + seen or restored != before:
        return "a child's tags would not show in /proc/PID/environ"
    return None


def _default_threads() -> int:
    """torch's thread count in a process whose environment sets none: asked of a child forked before any
    import, with the thread settings removed, as an exec'd worker would start."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            for key in THREADS_ENV:
                os.environ.pop(key, None)
            import torch
            os.write(write, str(torch.get_num_threads()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return int(answer)


def _cuda_initialised() -> bool:
    """Whether this process initialised the CUDA driver. torch maps libcuda at import without initialising
    it; cuCtxGetCurrent answers CUDA_ERROR_NOT_INITIALIZED (3) until cuInit, and initialises nothing."""
    with open("/proc/self/maps") as f:
        if "libcuda.so" not in f.read():
            return False
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    context = ctypes.c_void_p()
    return libcuda.cuCtxGetCurrent(ctypes.byref(context)) != 3


def _unsafe_to_fork(after: str = "the imports") -> str | None:
    tasks = sorted(os.listdir("/proc/self/task"))
    if len(tasks) != 1:
        names = []
        for task in tasks:
            try:
                with open(f"/proc/self/task/{task}/comm") as f:
                    names.append(f.read().strip())
            except OSError:
                pass
        return (f"{len(tasks)} threads after {after} ({', '.join(names)}): a fork keeps one, and the locks "
                "the others hold stay held")
    if _cuda_initialised():
        return f"{after} initialised the CUDA driver: a forked child could not use CUDA"
    return None


def _child(request: dict, conn: Connection, room: tuple[int, int], threads: int) -> None:
    """In the forked child: become the worker `request` describes, then run its module as __main__."""
    code = 1
    try:
        conn.close()
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)                  # first: whatever goes wrong below is in the worker's own log
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        env = request["env"]
        os.environ.clear()               # before the overwrite: C's environ no longer points at the placeholder
        _write_room(room, _tags(env))
        os.environ.update(env)
        os.chdir(request["cwd"])
        sys.path[0] = request["cwd"]     # `python -m` puts the cwd first
        import importlib
        importlib.invalidate_caches()
        import torch
        torch.set_num_threads(threads)
        import runpy
        sys.argv = [request["module"], *request["args"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reap(children: set[int], status_dir: Path) -> None:
    """Write each exited child's status, then reap it: until its status is written, its pid is not free."""
    while children:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        tmp = status_dir / f"{info.si_pid}.exit.tmp"
        tmp.write_text(str(code))
        os.replace(tmp, status_dir / f"{info.si_pid}.exit")
        os.waitpid(info.si_pid, 0)
        children.discard(info.si_pid)


def _import_for_forking(modules, preloaded: list[str]) -> str | None:
    """Import `modules` (those not imported yet), checking after each that forking is still safe: why not,
    or None. A module that cannot be imported is left to the worker, which says why in its own log."""
    import importlib
    for module in modules:
        if module in sys.modules:
            continue
        try:
            importlib.import_module(module)
            preloaded.append(module)
        except ImportError:
            continue
        problem = _unsafe_to_fork(f"importing {module}")
        if problem:
            return problem
    return None


def serve(fd: int, status_dir: Path) -> int:
    conn = Connection(fd)
    volunteer_for_oom_killer()           # before the test process, as every worker it forks (they inherit it)
    # The session's thread settings (the same for every worker forked: they are part of import_env).
    given = json.loads(os.environ.pop("NEOXMII_FORKSERVER_THREADS", "{}"))
    t0 = time.monotonic()
    preloaded: list[str] = []
    try:
        setting = next((given[k] for k in THREADS_ENV if given.get(k)), None)
        threads = int(setting) if setting else _default_threads()
        room = _environ_room()
        # checked after each import: a refusal comes as early as it can
        problem = _import_for_forking(PRELOAD, preloaded) or _unsafe_to_fork() or _room_works(room)
        # What the imports made stays as it is: a child's garbage collector would otherwise walk (and so
        # write, and copy) every page of it.
        gc.freeze()
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    conn.send({"ok": problem is None, "why": problem, "import_s": time.monotonic() - t0,
               "preloaded": preloaded if problem is None else []})
    if problem is not None:
        shutil.rmtree(status_dir, ignore_errors=True)
        return 0
    children: set[int] = set()
    refusal: str | None = None           # once an import has made forking unsafe, every later worker is exec'd
    while True:
        _reap(children, status_dir)
        try:
            if not conn.poll(0.05):
                continue
            request = conn.recv()
        except (EOFError, OSError):
            break
        if refusal is None and any(m not in sys.modules for m in request.get("imports", ())):
            try:
                refusal = _import_for_forking(request["imports"], preloaded)
            except Exception as exc:     # a module broken here, not merely absent: never fork after it
                refusal = f"importing {', '.join(request['imports'])}: {type(exc).__name__}: {exc}"
            gc.freeze()                  # what the new imports made, as above
        if refusal is not None:
            conn.send({"why": f"the fork server cannot fork any more: {refusal}"})
            continue
        pid = os.fork()
        if pid == 0:
            _child(request, conn, room, threads)
        children.add(pid)
        conn.send({"pid": pid})
    while children:                      # the session is done: report the exits of what is still running
        _reap(children, status_dir)
        time.sleep(0.05)
    shutil.rmtree(status_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), Path(sys.argv[2])))
