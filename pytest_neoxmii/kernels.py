"""Where DeepSpeed's JIT-built ops are kept between runs, and whether this run finds them built.

DeepSpeed compiles its ops on first use through torch.utils.cpp_extension (41-61 s for transformer_inference
on a GPU: docs/STACK.md trap 6) into
TORCH_EXTENSIONS_DIR. torch's own default (~/.cache/torch_extensions/py<ver>_<accelerator>) is shared by every
torch and DeepSpeed version, and torch rebuilds only when the sources change, so an upgraded torch can load an
op built against the old one. Unless TORCH_EXTENSIONS_DIR is set (then it is honoured as it is), the plugin
points it at a folder of this Python, torch and DeepSpeed under torch's default root: every process the
session starts inherits it, and a built op found there was built for exactly this stack.

Versions come from package metadata: nothing here imports torch or deepspeed.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pytest_neoxmii.versions import version_of

ENV = "TORCH_EXTENSIONS_DIR"

# The ops the backends JIT-build, by device: kernel injection on a GPU (ds, mii). On the CPU none: every
# engine runs in a one-process world there, whose shared-memory allreduce is not built (docs/STACK.md trap 9,
# backends/deepspeed_inference.skip_shared_memory_allreduce).
OPS = {"cuda": ("transformer_inference",), "cpu": ()}


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
