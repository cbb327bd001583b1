"""scripts/phase_marks.py, the tool behind docs/SPEED.md's twenty-ninth round: where a pytest command's seconds go
outside the session's own figure, from the process's start to its exit handlers."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
ORDER = ["plugins imported", "configured", "session started", "collected", "first test started",
         "last test finished", "terminal summary written", "unconfigured", "exit handlers"]


def _module():
    spec = importlib.util.spec_from_file_location("phase_marks_under_test", SCRIPTS / "phase_marks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_every_phase_is_printed_in_order_from_the_processs_start(tmp_path):
    (tmp_path / "test_two.py").write_text("import time\n\ndef test_a():\n    time.sleep(0.3)\n\n"
                                          "def test_b():\n    time.sleep(0.2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    began = time.time()
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "phase_marks", "-p", "no:neoxmii",
                          "-p", "no:cacheprovider", "-q", "test_two.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.time() - began
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("phase_marks")]
    assert lines[0] == "phase_marks: seconds from the process's start", lines
    marks = {m.group(2): float(m.group(1)) for m in
             (re.fullmatch(r"phase_marks +([0-9.]+) s  (.+)", line) for line in lines[1:]) if m}
    assert list(marks) == ORDER, lines                      # every phase, in the order it happened
    assert marks["plugins imported"] > 0                    # the interpreter started before the plugin loaded
    # both tests' sleeps (0.5 s), less the 0.01 s that printing each time to two decimals may take off the difference
    assert marks["last test finished"] - marks["first test started"] >= 0.49
    assert marks["exit handlers"] <= took


def test_the_start_is_read_after_a_command_name_with_spaces_and_parentheses():
    module = _module()
    # fields 3.. after the name: the state, then 18 more, then field 22 (the start, in clock ticks after boot)
    stat = "4242 (py (a) b) " + " ".join(["S"] + ["0"] * 18 + ["500"]) + " 7 8\n"
    started = module.process_start(stat=stat, uptime="10.00 3.00\n", ticks=100)   # 5 s after boot, 10 s now
    assert abs(started - (time.time() - 5.0)) < 0.5


def test_without_proc_the_lines_say_they_count_from_the_plugins_import():
    module = _module()
    lines = module.lines({"plugins imported": 100.0, "collected": 101.5}, None)
    assert lines == ["phase_marks: seconds from this plugin's import (no /proc here)",
                     "phase_marks     0.00 s  plugins imported", "phase_marks     1.50 s  collected"]
