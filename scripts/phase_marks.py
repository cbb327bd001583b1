"""Where a pytest command's seconds go outside the session's own figure: a pytest plugin that prints, at the
process's exit, the seconds from the process's start (Linux's /proc/self/stat) to each phase (docs/SPEED.md,
the twenty-ninth round):

    PYTHONPATH=scripts python -m pytest -p phase_marks ...         (or NEOX_EXTRA="-p phase_marks" for bench_suite.sh)

Lines on stderr, in time order: `phase_marks   2.55 s  session started`. The plugin's own import comes after
the plugins before it on the command line (`-p pytest_neoxmii.plugin` first: its import of torch counts before
"plugins imported"). What follows the last line (the interpreter's exit) is the caller's clock's to measure."""
from __future__ import annotations

import atexit
import os
import sys
import time

import pytest


def process_start(stat: str | None = None, uptime: str | None = None, ticks: int | None = None) -> float:
    """The wall-clock time this process started: its start in clock ticks after boot (/proc/self/stat, field
    22), against the seconds since boot now (/proc/uptime)."""
    if stat is None:
        with open("/proc/self/stat") as f:
            stat = f.read()
    if uptime is None:
        with open("/proc/uptime") as f:
            uptime = f.read()
    ticks = ticks or os.sysconf("SC_CLK_TCK")
    started_ticks = int(stat.rsplit(")", 1)[1].split()[19])     # (the command name may hold spaces)
    return time.time() - (float(uptime.split()[0]) - started_ticks / ticks)


try:
    STARTED = process_start()
except (OSError, ValueError, IndexError):      # not Linux: from this plugin's import instead, and said so
    STARTED = None
IMPORTED = time.time()
MARKS: dict[str, float] = {"plugins imported": IMPORTED}


def mark(what: str) -> None:
    MARKS[what] = time.time()          # a repeated phase keeps its last time (the last test to finish)


@pytest.hookimpl(trylast=True)
def pytest_configure(config) -> None:
    mark("configured")


def pytest_sessionstart(session) -> None:
    mark("session started")


def pytest_collection_finish(session) -> None:
    mark("collected")


def pytest_runtest_logstart(nodeid, location) -> None:
    if "first test started" not in MARKS:
        mark("first test started")


def pytest_runtest_logfinish(nodeid, location) -> None:
    mark("last test finished")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter) -> None:
    mark("terminal summary written")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    mark("unconfigured")


def lines(marks: dict[str, float], started: float | None) -> list[str]:
    origin = "the process's start" if started is not None else "this plugin's import (no /proc here)"
    zero = started if started is not None else marks["plugins imported"]
    return [f"phase_marks: seconds from {origin}"] + [
        f"phase_marks {t - zero:8.2f} s  {what}" for what, t in sorted(marks.items(), key=lambda kv: kv[1])]


def _report() -> None:
    mark("exit handlers")
    sys.stderr.write("\n".join(lines(MARKS, STARTED)) + "\n")


if __name__ == "phase_marks":     # loaded by `-p phase_marks` (not by a test importing it under another name)
    atexit.register(_report)     # registered early, so run late: after the handlers torch and the plugin register
