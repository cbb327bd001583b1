"""Freed CPU memory kept for reuse in a process whose models run on the CPU (docs/STACK.md trap 23).

glibc's malloc gives every block over its mmap threshold (32 MB at most) to the kernel on free and asks for
fresh pages on the next malloc, which the kernel zeroes page by page on first touch. A CPU session's large
blocks come and go at every call: a 2016-token case's logits (400 MB), each layer's attention scores
(195 MB), each float64 chunk of the judge. In the acceptance suite on a 2-core AMD EPYC with AVX2 only
(pythia-160m, fp32) that was 12.5 M page faults and 66 s of kernel time of the test process's 216 CPU-s.
Keeping freed blocks in the heap (no mmap for large blocks, no trimming) is what PyTorch's CPU performance
guide gets from jemalloc or tcmalloc; glibc's mallopt does it for the allocator already loaded. The cost: a
process keeps its peak (the acceptance suite's test process 4.7 GB against 3.8 GB). Not in CUDA sessions:
their large blocks are on the GPU, and returning host memory matters there (ZeRO keeps its weights in it).

A user who tunes glibc's malloc in the environment keeps their own settings."""
from __future__ import annotations

import ctypes
import functools
import os
import sys

# mallopt(3) parameters. -1 as the trim threshold disables trimming; 0 mmapped blocks disables mmap.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

# The environment through which glibc is tuned without code: the user's choice wins over ours.
_USER_TUNING = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def _user_tunes_malloc(environ) -> bool:
    return any(environ.get(name) for name in _USER_TUNING) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


@functools.lru_cache(maxsize=1)
def _mallopt():
    """glibc's mallopt, or None where the C library is another (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version          # glibc only: musl also has a mallopt, which does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


_kept = False


def should_keep_freed_memory(device: str, environ=None) -> bool:
    """Whether a process running models on `device` keeps freed memory (the header says so)."""
    environ = os.environ if environ is None else environ
    return device == "cpu" and not _user_tunes_malloc(environ) and _mallopt() is not None


def keep_freed_memory(device: str, environ=None) -> bool:
    """Keep freed memory in this process's heap if it runs models on the CPU (once; before the first load).
    Returns whether it does now."""
    global _kept
    if _kept:
        return True
    if not should_keep_freed_memory(device, environ):
        return False
    mallopt = _mallopt()
    # mallopt answers 1 on success; glibc applies them one by one, so both are asked even if one failed.
    _kept = bool(mallopt(_M_MMAP_MAX, 0)) & bool(mallopt(_M_TRIM_THRESHOLD, -1))
    return _kept


def describe(device: str, environ=None) -> str | None:
    """The header's line, or None where nothing changes."""
    if not should_keep_freed_memory(device, environ):
        return None
    return ("CPU memory: freed blocks kept for reuse in the processes that run models (glibc mallopt: "
            "no mmap, no trim), not returned to the kernel page by page at every call")


def give_back_freed_memory() -> bool:
    """Return the heap's free pages to the kernel now (glibc's malloc_trim), where freed memory is kept: after
    a model is released so that another fits the host's memory, the kept pages would otherwise still count
    (pythia-1b's fp32 reference released in a 6 GiB container: the test process still held 5.6 GB). Returns
    whether anything was given back."""
    if not _kept:
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return bool(trim(0))
