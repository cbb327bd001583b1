"""Where DeepSpeed's JIT-built ops are kept between runs, and whether this run finds them built.

DeepSpeed compiles its ops on first use through torch.utils.cpp_extension (41-61 s for transformer_inference
on a GPU: docs/STACK.md trap 6) into
TORCH_EXTENSIONS_DIR. torch's own default (~/.cache/torch_extensions/py<ver>_<accelerator>) is shared by every
torch and DeepSpeed version, and torch rebuilds only when the sources change, so an upgraded torch can load an
op built against the old one. Unless TORCH_EXTENSIONS_DIR is set (then it is honoured as it is), the plugin
points it at a folder of this Python, torch and DeepSpeed under torch's default root: every process the
session starts inherits it, and a built op found there was built for exactly this stack.

A cold session builds the ops in a process of its own (BackgroundBuild) from the end of collection on, while
the model is built and the workers start and import; a worker's own build then waits on torch's lock for
that build and loads its result, instead of starting from scratch seconds later.

Versions come from package metadata: nothing here imports torch or deepspeed (the build process does).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_neoxmii.versions import version_of

ENV = "TORCH_EXTENSIONS_DIR"

# The ops the backends JIT-build, by device: kernel injection on a GPU (ds, mii). On the CPU none: every
# engine runs in a one-process world there, whose shared-memory allreduce is not built (docs/STACK.md trap 9,
# backends/deepspeed_inference.skip_shared_memory_allreduce).
OPS = {"cuda": ("transformer_inference",), "cpu": ()}
# DeepSpeed's builder of each op (deepspeed.ops.op_builder)
BUILDERS = {"transformer_inference": "InferenceBuilder"}


def default_dir() -> Path:
    """~/.cache/torch_extensions/py<maj><min>-torch<version>-deepspeed<version> ($XDG_CACHE_HOME honoured, as
    torch does); torch's version carries its CUDA build where the wheel says it (2.11.0+cu130)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    torch, deepspeed = (version_of(dist) or "none" for dist in ("torch", "deepspeed"))
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch}-deepspeed{deepspeed}"
    return root / tag.replace("/", "_")


@dataclass(frozen=True)
class KernelCache:
    directory: Path
    from_env: bool                  # TORCH_EXTENSIONS_DIR was set by the user (else the plugin's default)
    device: str                     # "cuda" or "cpu"
    found: dict                     # op name -> path of its built library, or None

    @property
    def missing(self) -> list[str]:
        """The ops the cache lacks: built on first use (or by BackgroundBuild)."""
        return [op for op, path in self.found.items() if path is None]

    def describe(self) -> str:
        where = f"{self.directory} ({ENV}{'' if self.from_env else ', default of the plugin'})"
        parts = [f"{op} {'cached' if path else 'not built yet: built on first use'}"
                 for op, path in self.found.items()]
        return f"kernels: DeepSpeed JIT ops in {where}: " + (", ".join(parts) or f"none needed on the {self.device}")

    def as_json(self) -> dict:
        return {"directory": str(self.directory), "from_env": self.from_env, "device": self.device,
                "cached": {op: path is not None for op, path in self.found.items()}}


def built_library(directory: Path, op: str) -> Path | None:
    """The op's built library in the extensions directory: <op>/<op>.so, or torch's versioned rebuild
    <op>_v<N>/<op>_v<N>.so."""
    for folder in sorted(directory.glob(f"{op}*"), reverse=True):
        for lib in folder.glob(f"{op}*.so"):
            if lib.is_file():
                return lib
    return None


def prepare(device: str, environ=os.environ) -> KernelCache:
    """Set TORCH_EXTENSIONS_DIR to the plugin's default unless the user set it, and say which of the device's
    ops are already built there (looked at before anything deploys)."""
    from_env = bool(environ.get(ENV))
    directory = Path(environ[ENV]).expanduser() if from_env else default_dir()
    if not from_env:
        environ[ENV] = str(directory)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return KernelCache(directory=directory, from_env=from_env, device=kind,
                       found={op: built_library(directory, op) for op in OPS[kind]})


class BackgroundBuild:
    """The ops not yet built, JIT-built by `python -m pytest_neoxmii.kernels OP ...` in a process tree of its
    own (deploy/processes.py: its own session, its log, torn down with the session). Its outcome is not
    judged here: a worker's own load of the op then reports a failed build as it always did."""

    command = [sys.executable, "-u", "-m", __name__]      # + the ops (a stand-in's in the unit tests)

    def __init__(self, ops: list[str]):
        from pytest_neoxmii.deploy import processes
        self.ops = list(ops)
        self.tag = processes.new_tag("kernel-build")
        self.log_path = processes.run_dir(self.tag) / "build.log"
        self.started = time.monotonic()
        self.seconds: float | None = None          # once it has ended
        self.cut_short = False                     # still running when the session ended, and stopped
        self.tree = processes.start([*self.command, *self.ops], name="kernel build", log_path=self.log_path,
                                    tag=self.tag)
        self._waiter = threading.Thread(target=self._note_end, name="neoxmii-kernel-build", daemon=True)
        self._waiter.start()

    def _note_end(self) -> None:
        self.tree.popen.wait()
        self.seconds = time.monotonic() - self.started

    @property
    def running(self) -> bool:
        return self.tree.popen.poll() is None

    def wait(self) -> None:
        """Until the build has ended, whatever its outcome (nothing is timed beside a compiler)."""
        self._waiter.join()

    def describe(self) -> str:
        if self.cut_short:
            state = "stopped when the session ended"
        elif self.seconds is None:
            state = "still running"
        else:
            code = self.tree.popen.returncode
            state = f"{'done' if code == 0 else f'failed (exit code {code}), log {self.log_path}'} in {self.seconds:.1f} s"
        return f"kernels: {', '.join(self.ops)} built in the background from the end of collection: {state}"

    def close(self, directory: Path) -> None:
        """End the build if it still runs (a session cut short), and take away the lock torch's build then
        leaves in each op's folder: left behind, it would make every later build wait for it forever. The
        log is kept where the build failed or was cut short."""
        import shutil
        from pytest_neoxmii.deploy import processes
        cut_short = self.cut_short = self.running
        processes.teardown([self.tree], name="kernel build", tag=self.tag, term_timeout=5.0, kill_timeout=5.0)
        if cut_short:
            for op in self.ops:
                for lock in directory.glob(f"{op}*/lock"):
                    try:
                        lock.unlink()
                    except OSError:
                        pass
        else:
            self.wait()
            if self.tree.popen.returncode == 0:
                shutil.rmtree(self.log_path.parent, ignore_errors=True)


def build(ops: list[str]) -> int:
    """Build (or load, where built) each op through DeepSpeed's builder; the exit code says whether all did."""
    from deepspeed.ops import op_builder
    code = 0
    for op in ops:
        t0 = time.monotonic()
        try:
            getattr(op_builder, BUILDERS[op])().load()
            print(f"kernel build: {op} ready in {time.monotonic() - t0:.1f} s", flush=True)
        except Exception as exc:        # the worker's own load says it again, in its test's outcome
            print(f"kernel build: {op} failed after {time.monotonic() - t0:.1f} s: {type(exc).__name__}: {exc}",
                  flush=True)
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(build([op for op in sys.argv[1:] if op in BUILDERS]))
