"""scripts/time_box_whatif.py, behind docs/SPEED.md's sixteenth round: it replays the session's own stop rule on
the rounds a report kept, so a shorter box must be exactly what the rule would have stopped at."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pytest_neoxmii import latency
from pytest_neoxmii.latency import LatencyResult, StopRule, Timer, run_rounds

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "time_box_whatif.py"
spec = importlib.util.spec_from_file_location("time_box_whatif", SCRIPT)
whatif = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = whatif          # dataclasses look their module up there
spec.loader.exec_module(whatif)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def timed_figure(durations, rule: StopRule, warmup_rounds: int = 2, prefill_s: float = 0.01) -> dict:
    """A figure as the session writes it (LatencyResult.as_dict), timed by run_rounds on a fake clock whose
    full calls last `durations` in turn; the warm-up's calls come first and count against the box."""
    clock = FakeClock()
    it = iter(durations)

    def prefill():
        clock.now += prefill_s

    def full():
        clock.now += next(it)

    timed = run_rounds(prefill, full, Timer(clock=clock), rule, warmup_rounds)
    return LatencyResult(backend="ds", dtype="fp16", device="cuda:0", batch_size=1, prompt_len=64, new_tokens=32,
                         rounds=len(timed.e2e), warmup=timed.warmup, e2e=timed.e2e, prefill=timed.prefill,
                         stop_reason=timed.stop_reason, timing_s=timed.seconds).as_dict()


# A host that drifts: steady rounds, then a slow phase, then steady again (what the H200 VMs show).
DRIFTING = [0.2 * (1 + 0.03 * ((i * 7) % 5 - 2)) * (1.6 if 12 <= i < 20 else 1.0) for i in range(300)]


def test_the_box_the_figure_ran_with_gives_back_exactly_what_it_measured():
    rule = StopRule(min_rounds=6, max_rounds=100, time_box_s=5.0, target_ci=0.02)
    figure = timed_figure(DRIFTING, rule)
    assert figure["stop_reason"] == "time-box" and figure["rounds"] > 6
    r = whatif.replay(figure["e2e_samples_s"], figure["prefill_samples_s"], figure["timing_s"], rule)
    assert (r.rounds, r.reason, r.ran_out) == (figure["rounds"], "time-box", False)
    assert r.seconds == pytest.approx(figure["timing_s"])
    assert r.half_width_pct == pytest.approx(figure["e2e_ci_half_width_pct"])


@pytest.mark.parametrize("box", [1.5, 2.5, 3.5])
def test_a_shorter_box_is_what_the_rule_would_have_stopped_at_on_the_same_rounds(box):
    recorded = timed_figure(DRIFTING, StopRule(6, 100, 5.0, 0.02))
    shorter = StopRule(6, 100, box, 0.02)
    r = whatif.replay(recorded["e2e_samples_s"], recorded["prefill_samples_s"], recorded["timing_s"], shorter)
    rerun = timed_figure(DRIFTING, shorter)            # the same rounds timed again with the shorter box
    assert (r.rounds, r.reason) == (rerun["rounds"], rerun["stop_reason"])
    assert r.rounds < recorded["rounds"]
    assert r.seconds == pytest.approx(rerun["timing_s"])
    assert r.half_width_pct == pytest.approx(rerun["e2e_ci_half_width_pct"])


def test_a_box_longer_than_the_recorded_one_says_its_rounds_ran_out():
    recorded = timed_figure(DRIFTING, StopRule(6, 100, 3.0, 0.02))
    r = whatif.replay(recorded["e2e_samples_s"], recorded["prefill_samples_s"], recorded["timing_s"],
                      StopRule(6, 100, 60.0, 0.0001))
    assert r.ran_out and r.rounds == recorded["rounds"] and r.reason == "ran out"


def test_the_gates_minimum_outlasts_any_box():
    slow = [0.9 * (1 + 0.1 * ((i * 7) % 5 - 2)) for i in range(50)]    # +-20 %: never within 0.01 %
    recorded = timed_figure(slow, StopRule(6, 100, 5.0, 0.0001))
    r = whatif.replay(recorded["e2e_samples_s"], recorded["prefill_samples_s"], recorded["timing_s"],
                      StopRule(6, 100, 1.0, 0.0001))
    assert (r.rounds, r.reason) == (6, "time-box")


def _report(tmp_path: Path, name: str, figures: list[dict]) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "neoxmii-summary.json").write_text(json.dumps({"latency": figures}))
    return d


def test_the_command_line_prints_each_report_and_the_totals(tmp_path, capsys):
    figure = timed_figure(DRIFTING, StopRule(6, 100, 5.0, 0.02))
    a = _report(tmp_path, "a", [figure])
    b = _report(tmp_path, "b", [figure, figure])
    assert whatif.main([str(a), str(b / "neoxmii-summary.json"), "--box", "3", "5"]) == 0
    out = capsys.readouterr().out
    assert "ds bs1" in out and out.count("\n  timed ") == 2
    assert "2 reports" in out
    total_5 = next(line for line in out.splitlines() if line.strip().startswith("box 5 s"))
    assert "(+0.0 s;" in total_5 and "within 2 %: 0 of 3" in total_5


def test_a_report_it_cannot_use_is_one_line_and_none_usable_is_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    fixed = _report(tmp_path, "fixed", [dict(timed_figure([0.2] * 20, StopRule(6, 6)), stop_reason="fixed")])
    edited = timed_figure(DRIFTING, StopRule(6, 100, 5.0, 0.02))
    edited["e2e_samples_s"][2] = "fast"
    garbled = _report(tmp_path, "garbled", [edited])
    assert whatif.main([str(broken), str(fixed), str(tmp_path / "missing"), str(garbled)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("time_box_whatif: ") for line in err)
    assert "cannot read" in err[0] and "fixed round count" in err[1] and "cannot read" in err[2]
    assert "ds bs1 figure's rounds or seconds are not all numbers" in err[3] and "no report had" in err[4]


@pytest.mark.parametrize("args, says", [(["--box", "0"], "--box and --ci must be positive"),
                                        (["--ci", "nan"], "--box and --ci must be positive"),
                                        (["--min-rounds", "200"], "--min-rounds must be between 1 and")])
def test_a_setting_the_rule_cannot_take_is_a_usage_error(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as exc:
        whatif.main([str(tmp_path), *args])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_the_defaults_are_the_gpu_profiles():
    assert whatif.GPU_PROFILE is latency.GPU_PROFILE
