"""The worker process of an isolated engine (backends/isolated.py): the engine's own class, loaded here and
not in the test process, answering the session over the authenticated channel (deploy/channel.py).

    python -m pytest_neoxmii.worker --address 127.0.0.1:PORT --engine MODULE:CLASS --request FILE

DeepSpeed keeps process-wide state (the inference workspace sized by the first forward, `container_g`, ZeRO's
patch of torch.nn.functional.linear) and its kernels can abort the process (docs/STACK.md, the pythia-2.8b
abort). Here that state dies with the worker and an abort is the worker's death, which the session reports
as a test result. The worker builds DeepSpeed's kernels first when the engine injects them (timed apart from
the load), loads the engine from the session's LoadRequest, reports ready with what it runs, then answers
generate / score / trace, query_texts for text-only engines, and measure_latency, which times the engine
here exactly as the test process times an engine it holds (CUDA events around each call). Load failures
are reported, not raised: an engine that cannot run here is a skip with its reason, a kernel injection that
matched nothing is a failure, anything else is a deployment error with the traceback.

Working ahead (--ahead FILE): the calls the session knows its selected tests will make of this engine (the
parity and golden cases) run right after the ready report, and their results are kept, so that several
engines compute side by side, with each other and with the reference in the test process. They run in a
thread beside the request loop; each result is handed over once, as soon as it is computed and asked for.
Any other request waits until that work is done: the session's `ahead_done` request is how it knows that no
engine is still computing before it times anything."""
from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
import threading
import time
import traceback
from pathlib import Path

OPS = ("generate", "score", "trace", "query_texts", "measure_latency", "ahead_done")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pytest_neoxmii.worker")
    p.add_argument("--address", required=True, help="host:port the test session listens on")
    p.add_argument("--engine", required=True, help="module:Class of the engine (a backends.base.Backend)")
    p.add_argument("--request", required=True, type=Path, help="the pickled backends.base.LoadRequest")
    p.add_argument("--ahead", type=Path, help="pickled {'calls': [(op, args), ...], 'threads': n or None} to run "
                   "right after the load")
    p.add_argument("--ahead-done", type=Path, help="a file to create once every call ahead has run")
    return p.parse_args(argv)


def engine_class(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class Served:
    """What the worker answers: the engine's own calls, and its latency timed in this process.

    Working ahead runs in a thread beside the request loop, and each result is handed over as soon as it is
    computed: a test needing the first call's result does not wait for the last. The engine is only ever
    called by one thread at a time: a request for anything else than a result being worked ahead waits
    until the work ahead is done."""

    def __init__(self, backend):
        self.backend = backend
        self._ahead: dict[str, object] = {}       # call_key -> result, until the session asks for it
        self._pending: set[str] = set()            # call_keys still to be computed ahead
        self._busy = False                         # the thread working ahead has not finished
        self._cond = threading.Condition()
        self._ahead_report = {"calls": 0, "computed": 0, "seconds": 0.0, "finished": True}
        self._ahead_started = time.monotonic()

    def start_ahead(self, calls, done_marker: Path | None = None, threads: int | None = None) -> threading.Thread:
        """Work `calls` ahead in a thread; once it is done, `done_marker` is created (the session reads it
        without asking this worker anything: IsolatedEngine.finished_ahead). threads: torch's thread count
        while working ahead (a CPU session's share of the cores), the process's own again afterwards."""
        with self._cond:
            self._pending = {call_key(op, args) for op, args in calls}
            self._busy = True
            self._ahead_report = {"calls": len(calls), "computed": 0, "seconds": 0.0, "finished": False,
                                  "threads": threads}
            self._ahead_started = time.monotonic()
        thread = threading.Thread(target=self.run_ahead, args=(calls, done_marker, threads), name="working-ahead",
                                  daemon=True)
        thread.start()
        return thread

    def run_ahead(self, calls, done_marker: Path | None = None, threads: int | None = None) -> None:
        """Run the session's calls now and keep the results. A call that fails is left for the session's
        own request, which then fails with the error; a crash ends the worker as during any request, and
        the log's last line names the call."""
        from pytest_neoxmii.backends.worker_deployment import describe_request
        from pytest_neoxmii.hardware import torch_threads
        if threads is not None:
            print(f"worker {os.getpid()}: working ahead on {threads} thread(s)", flush=True)
        try:
            # the process's own count is back before the requests waiting on this thread (wait_idle) compute
            with torch_threads(threads):
                for op, args in calls:
                    key = call_key(op, args)
                    print(f"worker {os.getpid()}: working ahead: {describe_request(op, args)}", flush=True)
                    try:
                        result = getattr(self.backend, op)(*args)
                    except Exception as exc:
                        print(f"worker {os.getpid()}: {op} ahead failed ({type(exc).__name__}), left for the "
                              f"session's own request", flush=True)
                        result = _MISSING
                    with self._cond:
                        if result is not _MISSING:
                            self._ahead[key] = result
                            self._ahead_report["computed"] += 1
                        self._pending.discard(key)
                        self._cond.notify_all()
        finally:
            with self._cond:
                report = self._ahead_report
                report.update(seconds=round(time.monotonic() - self._ahead_started, 3), finished=True)
                self._pending.clear()
                self._busy = False
                self._cond.notify_all()
            # the line a crash's excerpt is read against: after it, a crash is not in the work ahead
            print(f"worker {os.getpid()}: worked ahead: {report['computed']}/{report['calls']} calls in "
                  f"{report['seconds']:.1f} s", flush=True)
            if done_marker is not None:
                try:
                    done_marker.touch()
                except OSError:             # only an early signal: ahead_done still answers
                    pass

    def wait_idle(self) -> None:
        """Wait until nothing is computed ahead any more: the engine is then this thread's alone."""
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)

    def ahead_done(self, wait: bool = True) -> dict:
        """What was computed ahead, and how many of those results the session has not asked for (yet).
        wait=False answers at once, with how far it got ("finished" False while it still works)."""
        if wait:
            self.wait_idle()
        with self._cond:
            report = {**self._ahead_report, "unclaimed": len(self._ahead)}
            if not report["finished"]:
                report["seconds"] = round(time.monotonic() - self._ahead_started, 3)
            return report

    def _answer(self, op: str, args):
        key = call_key(op, args)
        with self._cond:
            self._cond.wait_for(lambda: key not in self._pending)     # being worked ahead: its result
            kept = self._ahead.pop(key, _MISSING)
        if kept is not _MISSING:
            return kept
        self.wait_idle()
        return getattr(self.backend, op)(*args)

    def generate(self, *args):
        return self._answer("generate", args)

    def score(self, *args):
        return self._answer("score", args)

    def trace(self, *args):
        self.wait_idle()
        return self.backend.trace(*args)

    def query_texts(self, *args):
        self.wait_idle()
        return self.backend.query_texts(*args)

    def measure_latency(self, batch, new_tokens, rounds, warmup, spec, hardware, min_warmup_s, gpu_work=False):
        from pytest_neoxmii.latency import measure_backend
        self.wait_idle()
        return measure_backend(self.backend, batch, new_tokens, rounds, warmup, spec=spec, hardware=hardware,
                               min_warmup_s=min_warmup_s, gpu_work=gpu_work)


_MISSING = object()


def call_key(op: str, args) -> str:
    """A call's identity: its op and arguments (a PromptBatch and ints, whose repr is their content)."""
    return repr((op, tuple(args)))


AHEAD_WAIT_S = 300.0


def read_ahead(path: Path, timeout: float = AHEAD_WAIT_S) -> dict:
    """The work ahead: {"calls": [(op, args), ...], "threads": torch's thread count for them, or None}. The
    session may write it only after launching this worker (it launches the workers first, then builds the
    cases, which imports transformers' tokenizer: seconds): wait for the file, which appears whole. A session
    that never writes it (it stopped) leaves no calls after `timeout`."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            print(f"worker {os.getpid()}: no calls to work ahead arrived in {timeout:.0f} s ({path})", flush=True)
            return {"calls": [], "threads": None}
        time.sleep(0.05)
    return pickle.loads(path.read_bytes())


def build_kernels(cls, request) -> float | None:
    """DeepSpeed's inference op, JIT-built or loaded from TORCH_EXTENSIONS_DIR (set by the session, see
    kernels.py), before the load: seconds it took, None where the engine injects no kernels here."""
    if not (cls.injects_kernels and request.device.startswith("cuda")):
        return None
    from deepspeed.ops.op_builder import InferenceBuilder
    t0 = time.monotonic()
    InferenceBuilder().load()
    return time.monotonic() - t0


def load(cls, request) -> tuple[object | None, dict]:
    """The engine, and the message for the session: ready with what runs, or failed with why."""
    from pytest_neoxmii.deploy import cpu_heap, gpu_cap
    from pytest_neoxmii.errors import BackendUnavailable
    from pytest_neoxmii.deploy.processes import DeploymentError
    from pytest_neoxmii.injection import InjectionFailed
    try:
        here = not cls.runs_in_worker     # a hosted deployment's own processes apply the cap themselves
        if here:
            gpu_cap.apply(request.device)
        cpu_heap.keep_freed_memory(request.device)
        kernel_s = build_kernels(cls, request)
        t0 = time.monotonic()
        backend = cls.load(request)
        load_s = time.monotonic() - t0
        over = gpu_cap.exceeded(request.device) if here else None
        if over:                          # the configuration does not fit the cards it claims to: a failure
            backend.close()
            return None, {"op": "failed", "kind": "over-cap", "message": over}
    except BackendUnavailable as exc:
        return None, {"op": "failed", "kind": "unavailable", "message": str(exc)}
    except ImportError as exc:            # e.g. deepspeed-mii not installed: a skip for this engine alone
        return None, {"op": "failed", "kind": "unavailable", "message": f"{type(exc).__name__}: {exc}"}
    except InjectionFailed as exc:
        return None, {"op": "failed", "kind": "injection", "message": str(exc)}
    except DeploymentError as exc:        # says what failed in full (e.g. weights not matching their config)
        return None, {"op": "failed", "kind": "deployment", "message": str(exc)}
    except Exception as exc:
        short = gpu_cap.out_of_memory(exc, request.device)
        if short:                         # one line, not DeepSpeed's traceback (that stays in the log)
            traceback.print_exc()
            return None, {"op": "failed", "kind": "out-of-memory", "message": short}
        return None, {"op": "failed", "kind": "error", "message": traceback.format_exc()}
    # ready_at: CLOCK_MONOTONIC, one clock for every process of the machine, so that the session can say
    # when the worker was ready, not when a test first asked for it
    return backend, {"op": "ready", "info": backend.info, "pid": os.getpid(), "kernel_build_s": kernel_s,
                     "load_s": load_s, "ready_at": time.monotonic()}


def main(argv=None) -> int:
    args = parse_args(argv)
    from pytest_neoxmii import compat, lean_imports
    compat.install()                          # both also armed by the child sitecustomize; idempotent
    lean_imports.install()
    from pytest_neoxmii.backends.worker_loop import serve
    from pytest_neoxmii.deploy.channel import connect, send
    request = pickle.loads(args.request.read_bytes())
    cls = engine_class(args.engine)
    conn = connect(args.address)
    backend, message = load(cls, request)
    print(f"worker {os.getpid()}: {message['op']}: "
          f"{message['info'].describe() if backend else message['message']}", flush=True)
    send(conn, message)
    if backend is None:
        return 1 if message["kind"] in ("error", "deployment") else 0
    served = Served(backend)
    try:
        if args.ahead is not None:
            work = read_ahead(args.ahead)
            served.start_ahead(work["calls"], done_marker=args.ahead_done, threads=work["threads"])
        return serve(conn, served, rank=0, world=1, broadcast=lambda r: r, ops=OPS)
    finally:
        served.wait_idle()                        # never close the engine under the thread working ahead
        backend.close()


if __name__ == "__main__":
    code = main()
    # The engine is closed (main's finally): skip the interpreter's own teardown (module by module, the exit
    # handlers of torch and DeepSpeed), which the session's teardown would wait for; the memory check after
    # the exit still applies, and the driver releases the CUDA context with the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
