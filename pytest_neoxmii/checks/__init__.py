"""The pytest layer of judging: each check fetches outputs through the session (each computed once), judges
them with the pytest-free engines (parity.py, golden.py, latency.py, stats.py), records the verdict for the
report and fails with a readable message; baseline_policy.py decides record / compare / skip for the checks
that have a stored baseline.

    parity.py           check_greedy, check_teacher_forced (against the fp32 HF reference)
    golden.py           check_golden, check_golden_perplexity (against the golden outputs)
    latency.py          check_latency (the regression gate against the latency baseline)
    baseline_policy.py  BaselinePolicy: record, compare, or skip with the command that records
"""
from pytest_neoxmii.checks.golden import check_golden, check_golden_perplexity
from pytest_neoxmii.checks.latency import check_latency
from pytest_neoxmii.checks.parity import (check_greedy, check_teacher_forced, config_note, localize,
                                          mark_known_issue, noise_floor)

__all__ = ["check_golden", "check_golden_perplexity", "check_greedy", "check_latency", "check_teacher_forced",
           "config_note", "localize", "mark_known_issue", "noise_floor"]
