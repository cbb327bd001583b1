"""scripts/cpu_sampler.py, the tool behind docs/SPEED.md's fourteenth round: it names the threads that were on
the CPU, with their CPU time, and leaves out those that were not."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cpu_sampler.py"

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")

BUSY = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"


def test_a_busy_process_is_named_with_its_cpu_time_and_a_sleeping_one_is_not(tmp_path):
    out = tmp_path / "cpu.jsonl"
    # asleep before the sampler starts (a Python process starting up uses tens of ms of CPU)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; print('asleep', flush=True); time.sleep(30)"],
                               stdout=subprocess.PIPE, text=True)
    assert sleeper.stdout.readline() == "asleep\n"
    sampler = subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--seconds", "30"])
    try:
        time.sleep(0.3)                                  # its first reading is taken before the busy one starts
        busy = subprocess.run([sys.executable, "-c", BUSY], timeout=60)   # 0.4 s of its own CPU time, then exits
        assert busy.returncode == 0
        time.sleep(0.3)
    finally:
        sampler.terminate()
        sampler.wait(timeout=10)
        sleeper.kill()
        sleeper.wait()
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    samples = [line for line in lines if "t" in line]
    commands = {line["pid"]: line["cmd"] for line in lines if "pid" in line}
    assert len(samples) >= 5 and all(b["t"] > a["t"] for a, b in zip(samples, samples[1:]))
    busy_pids = [pid for pid, cmd in commands.items() if "process_time" in cmd]
    assert len(busy_pids) == 1, commands
    used = sum(ms for s in samples for pid, _tid, _comm, ms in s["threads"] if pid == busy_pids[0])
    # 400 ms of its own CPU time and its start-up, less what it used before the sampler first read it
    assert 150 <= used <= 520, used
    assert sleeper.pid not in commands                   # asleep the whole time: never over 2 ms a sample


def _sampler():
    import importlib.util
    spec = importlib.util.spec_from_file_location("cpu_sampler", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_proc_it_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    module = _sampler()
    monkeypatch.setattr(module.os.path, "isdir", lambda path: False)
    assert module.main([str(tmp_path / "out.jsonl"), "--seconds", "0.1"]) == 2
    assert capsys.readouterr().err == "cpu_sampler: needs Linux's /proc (per-thread schedstat)\n"
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("args, said", [
    (["--interval", "0"], "--interval and --seconds are seconds above 0, got 0.0 and None"),
    (["--seconds", "-1"], "--interval and --seconds are seconds above 0, got 0.05 and -1.0"),
])
def test_a_bad_duration_is_one_line_and_writes_nothing(tmp_path, capsys, args, said):
    assert _sampler().main([str(tmp_path / "out.jsonl"), *args]) == 2
    assert capsys.readouterr().err == f"cpu_sampler: {said}\n"
    assert not (tmp_path / "out.jsonl").exists()


def test_a_file_it_cannot_create_is_one_line(tmp_path, capsys):
    out = tmp_path / "no-such-dir" / "out.jsonl"
    assert _sampler().main([str(out), "--seconds", "0.1"]) == 2
    assert capsys.readouterr().err == f"cpu_sampler: cannot write {out}: No such file or directory\n"
