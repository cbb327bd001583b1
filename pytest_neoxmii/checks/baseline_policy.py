"""The one baseline policy of the acceptance checks (golden outputs, golden perplexity, latency): where a
check's baseline is filed (store, key, GPU class), and the decision every check makes with it:

* record, under --neox-update-baselines: the write goes through the store (locked, validated, atomic), and a
  refused or failed write fails the test with the store's one line; the old file stays whole;
* compare: the stored baseline is read before any model call, and an unusable file fails the test with the
  store's one line ('<file>: <problem>'), no traceback;
* skip, when there is nothing to compare with, with the command that records it: this very invocation plus
  --neox-update-baselines."""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import pytest

from pytest_neoxmii.errors import BaselineError
from pytest_neoxmii.storage import BaselineKey, BaselineStore

UPDATE_FLAG = "--neox-update-baselines"

T = TypeVar("T")


def key_for(neox, backend_name: str, dtype: str, tp: int = 1) -> BaselineKey:
    """Model (registry name), weights (synthetic seed + generator version, hub revision or local digest),
    dtype, backend and tensor-parallel degree. The GPU class is not in the key: it selects an entry inside
    the file, so one file holds the numbers of every GPU kind. A backend deployed with the user's serving
    config (--neox-ds-config / --neox-mii-config) is keyed `<backend>-config-<digest of its content>`: a
    baseline recorded under one config is never compared under another."""
    config = getattr(neox, "serving_configs", {}).get(backend_name)
    backend = backend_name if config is None else f"{backend_name}-config-{config.digest}"
    return BaselineKey(model=neox.model.spec.name, weights=neox.model.weights_key, dtype=dtype,
                       backend=backend, tp=int(tp))


def update_command(config: pytest.Config) -> str:
    """The command that records the missing baseline: this very invocation plus --neox-update-baselines."""
    args = [a for a in config.invocation_params.args if a != UPDATE_FLAG]
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m", "pytest", *args,
                                              UPDATE_FLAG])


@dataclass(frozen=True)
class BaselinePolicy:
    store: BaselineStore
    key: BaselineKey
    gpu_class: str
    recording: bool              # --neox-update-baselines: record, never compare
    request: pytest.FixtureRequest | None = None   # the test; a skip tells the user to repeat its invocation

    @classmethod
    def of(cls, neox, backend_name: str, info, request=None) -> BaselinePolicy:
        """The policy of one backend (as it runs: `info` is its BackendInfo) in this session; `request`
        gives the invocation the record command repeats (without it, the command is just the flag)."""
        return cls(store=BaselineStore(neox.options.baseline_dir),
                   key=key_for(neox, backend_name, info.dtype, info.tensor_parallel),
                   gpu_class=neox.hardware.gpu_class,
                   recording=bool(neox.options.update_baselines),
                   request=request)

    @property
    def record_command(self) -> str:
        """What a skip tells the user to run."""
        # Read only when a skip needs it: stand-in requests (helpers, unit tests) have no config.
        return UPDATE_FLAG if self.request is None else update_command(self.request.config)

    @property
    def where(self) -> str:
        """The baseline file, as messages show it."""
        return self.store.shown_path(self.key)

    def read(self, read: Callable[[BaselineStore], T]) -> T:
        """read(store); an unusable file fails the test with the store's one line."""
        try:
            return read(self.store)
        except BaselineError as exc:
            problem = str(exc)
        # Outside the except block: failing inside it would chain the store's exception into the report.
        pytest.fail(f"unusable baseline: {problem}", pytrace=False)

    def expected(self, read: Callable[[BaselineStore], T | None], what: str, *, plural: bool = False) -> T | None:
        """What this run compares with: None when recording; else read(store), skipping with the record
        command when it finds nothing ("no <what> in <file>; create it with: <command>")."""
        if self.recording:
            return None
        found = self.read(read)
        if found is None:
            self.skip_missing(what, plural=plural)
        return found

    def missing(self, what: str, where: str | None = None, *, plural: bool = False) -> str:
        """The reason of a skip for a missing baseline, with the command that records it."""
        return (f"no {what} in {where or self.where}; create {'them' if plural else 'it'} with: "
                f"{self.record_command}")

    def skip_missing(self, what: str, where: str | None = None, *, plural: bool = False) -> NoReturn:
        pytest.skip(self.missing(what, where, plural=plural))

    def skip_stale(self, why: str) -> NoReturn:
        """The stored baseline answers another question (other prompt ids, fewer tokens): it must be
        recorded again."""
        pytest.skip(f"{why}; re-record it with {UPDATE_FLAG}")

    def record(self, write: Callable[[BaselineStore], Path]) -> Path:
        """write(store) under --neox-update-baselines; a refused or failed write fails the test with the
        store's one line."""
        if not self.recording:
            raise RuntimeError("a baseline is recorded only under --neox-update-baselines")
        try:
            return write(self.store)
        except BaselineError as exc:
            problem = str(exc)
        pytest.fail(f"cannot write baseline: {problem}", pytrace=False)
