"""A pytest process that ran a session exits without walking its whole heap again.

At its exit the interpreter runs its cyclic garbage collector over every object still alive: with torch and
transformers imported, 1.0-1.3 s of a pytest process's end on a 2-core AMD EPYC, and 1.5-2.2 s of a warm
acceptance run's end on one H200 went to that exit (docs/SPEED.md, the twenty-ninth round). After a session,
prepare() has the exit collect the garbage that exists then (its finalizers run as they would have), then freeze
what survives: the collections of the interpreter's own shutdown skip it. Python does not promise to run the
finalizers of objects still alive at exit, and files the plugin writes are closed when written (files.py)."""
from __future__ import annotations

import atexit
import gc

_PREPARED = False


def collect_then_freeze() -> None:
    gc.collect()
    gc.freeze()


def prepare() -> None:
    """Register collect_then_freeze to run at this process's exit, once however many sessions ran in it (pytester
    and IDEs run pytest in-process). Registered at a session's end, it runs before the exit handlers registered
    earlier (atexit runs them last in, first out), which may still create and free objects of their own."""
    global _PREPARED
    if not _PREPARED:
        atexit.register(collect_then_freeze)
        _PREPARED = True
