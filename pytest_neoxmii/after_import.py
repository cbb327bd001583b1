"""Run a function on a module right after its first import, wherever that import happens (a library's own
import chain included): how the plugin adjusts transformers and DeepSpeed in processes where it does not
control the order of imports (compat.py, lean_imports.py)."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable

Callback = Callable[[object], None]


class _AfterImport(importlib.abc.MetaPathFinder):
    """One per process, first on sys.meta_path: finds nothing itself, but hands out the real spec of a watched
    module with its loader's exec_module wrapped, so that the callbacks run once the module has executed."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callback]] = {}

    def find_spec(self, fullname, path, target=None):
        callbacks = self.callbacks.get(fullname)
        if not callbacks:
            return None
        sys.meta_path.remove(self)          # the real finders answer; this one only wraps their answer
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module, _orig=original_exec):
            _orig(module)
            for callback in list(callbacks):
                callback(module)

        spec.loader.exec_module = exec_module
        return spec


def _finder() -> _AfterImport:
    for finder in sys.meta_path:
        if isinstance(finder, _AfterImport):
            return finder
    finder = _AfterImport()
    sys.meta_path.insert(0, finder)
    return finder


def arm(name: str, callback: Callback) -> None:
    """`callback(module)` now if `name` is imported already, and after every later first import of it (a
    module dropped from sys.modules and imported again gets it again). Idempotent per (name, callback)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
    callbacks = _finder().callbacks.setdefault(name, [])
    if callback not in callbacks:
        callbacks.append(callback)
