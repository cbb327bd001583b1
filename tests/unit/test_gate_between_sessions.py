"""python -m pytest_neoxmii.gate_between_sessions, behind docs/SPEED.md's twenty-second round: each session of a
set taken as the latency baseline of each other one, judged by the gate itself."""
from __future__ import annotations

import json
import re
from pathlib import Path

from pytest_neoxmii import gate_between_sessions as gate_between
from pytest_neoxmii.gpu_work import GpuWork
from pytest_neoxmii.latency import LatencyResult


def rounds(median_s: float, n: int = 12) -> list[float]:
    """n distinct rounds spread +-3 % around median_s (no ties: the U test's exact form)."""
    return [median_s * (1 + 0.06 * (i / (n - 1) - 0.5)) for i in range(n)]


def report(tmp_path: Path, name: str, medians: dict[str, float], work: dict[str, GpuWork] | None = None) -> Path:
    """A session's neoxmii-summary.json with one figure per backend, as the session writes it (with its GPU
    work per call where `work` gives one: --neox-gpu-work)."""
    latency = []
    for backend, median in medians.items():
        e2e = rounds(median)
        latency.append(LatencyResult(backend=backend, dtype="fp16", device="cuda:0", batch_size=1, prompt_len=64,
                                     new_tokens=32, rounds=len(e2e), warmup=1, e2e=e2e, prefill=[0.01] * len(e2e),
                                     stop_reason="time-box", timing_s=4.0,
                                     gpu_work=(work or {}).get(backend)).as_dict())
    directory = tmp_path / name
    directory.mkdir()
    (directory / "neoxmii-summary.json").write_text(json.dumps({"latency": latency}))
    return directory


def test_a_session_30_percent_slower_on_one_engine_fails_its_pair_and_sets_the_threshold_needed(tmp_path, capsys):
    first = report(tmp_path, "a", {"hf": 0.200, "ds": 0.100})
    second = report(tmp_path, "b", {"hf": 0.201, "ds": 0.130})     # ds +30 % in the second session only
    assert gate_between.main([str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "4 comparisons (each session the baseline of each other one): 1 would fail the gate at a threshold of 0.1" in out
    assert re.search(r"baseline session 1, current session 2: ds fp16 generate-bs1-p64-n32: median 100\.00 ms -> "
                     r"130\.00 ms \(\+30\.0%.*: regression", out)
    assert "1 of 2 ordered pairs of sessions: at least one latency test would fail" in out
    assert "smallest threshold under which none fails: 0.30" in out
    # the same sessions under a threshold above the shift: nothing fails, and the threshold needed is the same
    assert gate_between.main([str(first), str(second), "--threshold", "0.35"]) == 0
    out = capsys.readouterr().out
    assert "0 would fail" in out and "0 of 2 ordered pairs" in out
    assert "smallest threshold under which none fails: 0.30" in out


def test_steady_sessions_raise_no_alarm(tmp_path, capsys):
    sessions = [report(tmp_path, name, {"hf": 0.200 * f, "ds": 0.100 * f}) for name, f in (("a", 1), ("b", 1.01))]
    assert gate_between.main([str(s) for s in sessions]) == 0
    out = capsys.readouterr().out
    assert "0 would fail" in out and "no comparison was a significant slowdown" in out


def test_unusable_reports_are_one_line_each_and_two_usable_ones_are_needed(tmp_path, capsys):
    good = report(tmp_path, "a", {"hf": 0.2})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"latency": []}))
    assert gate_between.main([str(good), str(broken), str(empty)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"gate_between_sessions: skipped: cannot read {broken}: ")
    assert err[1] == f"gate_between_sessions: skipped: {empty} has no latency figure with its rounds (no latency test ran)"
    assert err[2] == "gate_between_sessions: needs two usable reports"


def test_gpu_work_is_replayed_too_where_the_sessions_measured_it(tmp_path, capsys):
    """The sessions of docs/SPEED.md's twenty-third round in small: the wall clock shifts by 40 %, the GPU work
    does not, and the tool says both; a session whose ds runs more operations is a GPU work alarm."""
    steady = {"hf": GpuWork(11688, 0.02436), "ds": GpuWork(8333, 0.01904)}
    first = report(tmp_path, "a", {"hf": 0.200, "ds": 0.100}, steady)
    second = report(tmp_path, "b", {"hf": 0.280, "ds": 0.140}, {"hf": GpuWork(11688, 0.02437),
                                                                 "ds": GpuWork(8333, 0.01916)})
    assert gate_between.main([str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 ordered pairs of sessions: at least one latency test would fail" in out   # the slower one
    assert ("GPU work per call (--neox-gpu-work): 4 comparisons, 0 would fail at 5%; the largest change of either "
            "figure: 0.6%\n  none") in out
    lost = report(tmp_path, "c", {"hf": 0.200, "ds": 0.100}, {**steady, "ds": GpuWork(11688, 0.02436)})
    assert gate_between.main([str(first), str(lost)]) == 0
    out = capsys.readouterr().out
    assert "4 comparisons, 1 would fail at 5%" in out
    assert ("baseline session 1, current session 2: ds fp16 generate-bs1-p64-n32: GPU work per call 8333 -> 11688 "
            "operations (+40.3%), 19.04 -> 24.36 ms busy (+27.9%), threshold 5%: regression") in out
    # sessions without the flag: no GPU work section at all
    plain = [report(tmp_path, n, {"hf": 0.2}) for n in ("d", "e")]
    assert gate_between.main([str(p) for p in plain]) == 0
    assert "GPU work" not in capsys.readouterr().out
