"""interpreter_exit: after a session, the process's exit collects the garbage there is, then freezes the rest,
so that the interpreter's shutdown does not walk torch's and transformers' objects again (docs/SPEED.md, the
twenty-ninth round)."""
from __future__ import annotations

import gc

import pytest

from pytest_neoxmii import interpreter_exit

# Registered at import, before the session ends: atexit runs it after the plugin's handler (last in, first out).
EXIT_PROBE = """
import atexit, gc, os

class Cycle:
    def __del__(self):
        open(os.environ["FINALIZED"], "w").write("finalized")

AT_IMPORT = gc.get_freeze_count()     # what the interpreter froze before (0 here; 375 on the lent GPU image)

def _report():
    open(os.environ["FROZEN"], "w").write(str(gc.get_freeze_count() - AT_IMPORT))

atexit.register(_report)

def test_drops_a_cycle():
    gc.disable()                       # the cycle stays garbage until the exit collects it
    a = Cycle()
    a.me = a
    del a
"""


@pytest.mark.parametrize("with_session", [True, False])
def test_the_exit_after_a_session_collects_then_freezes(pytester, synthetic_14m, monkeypatch, with_session):
    pytester.makepyfile(test_exit=EXIT_PROBE)
    frozen, finalized = pytester.path / "frozen", pytester.path / "finalized"
    monkeypatch.setenv("FROZEN", str(frozen))
    monkeypatch.setenv("FINALIZED", str(finalized))
    args = synthetic_14m if with_session else ["-p", "no:cacheprovider"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    count = int(frozen.read_text())      # frozen after the test module's import
    if with_session:
        assert count > 10_000, count     # torch's and transformers' objects, skipped by the shutdown's collections
    else:
        assert count == 0                # no session ran: the exit is the interpreter's own
    assert finalized.read_text() == "finalized"     # garbage at exit still has its finalizer run


def test_prepare_registers_once(monkeypatch):
    registered = []
    monkeypatch.setattr(interpreter_exit.atexit, "register", registered.append)
    monkeypatch.setattr(interpreter_exit, "_PREPARED", False)
    interpreter_exit.prepare()
    interpreter_exit.prepare()                       # a second in-process session
    assert registered == [interpreter_exit.collect_then_freeze]


def test_collect_then_freeze_leaves_nothing_to_collect(monkeypatch):
    calls = []
    monkeypatch.setattr(interpreter_exit.gc, "collect", lambda: calls.append("collect") or 0)
    monkeypatch.setattr(interpreter_exit.gc, "freeze", lambda: calls.append("freeze"))
    interpreter_exit.collect_then_freeze()
    assert calls == ["collect", "freeze"]            # the garbage first, with its finalizers; then the survivors
    assert gc.isenabled()
