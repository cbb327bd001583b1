from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.cases import plan_cases
from pytest_neoxmii.known_issues import KNOWN_ISSUES, match

PLANS = {p.family: p for p in plan_cases(2048, 32)}
INJECTED = BackendInfo(backend="ds", dtype="fp16", device="cuda:0", kernels="injected 12/12 layers")


def test_padded_decode_issue_applies_only_to_injected_ds_on_padded_greedy():
    issue = match("greedy", INJECTED, PLANS["padded"])
    assert issue is not None and issue.key == "ds-left-padded-decode"
    assert "github.com/deepspeedai/DeepSpeed/issues/" in issue.reason()


def test_no_known_issue_for_equal_lengths_other_checks_backends_or_cpu():
    assert match("greedy", INJECTED, PLANS["batch"]) is None            # equal lengths: must pass
    assert match("teacher-forced", INJECTED, PLANS["padded"]) is None   # prefill is fixed by the adapter
    mii = BackendInfo(backend="mii", dtype="fp16", device="cuda:0", kernels="injected 12/12 layers")
    assert match("greedy", mii, PLANS["padded"]) is None                # MII generates row by row
    cpu = BackendInfo(backend="ds", dtype="fp16", device="cpu", kernels="none (CPU: no kernel injection)")
    assert match("greedy", cpu, PLANS["padded"]) is None


def test_every_known_issue_names_an_upstream_issue_and_a_condition():
    for issue in KNOWN_ISSUES:
        assert issue.upstream.startswith("https://github.com/")
        assert len(issue.condition) > 40

# The strict xfail itself, through the plugin's check in a real pytest run: tests/unit/test_checks.py
# (test_known_issue_is_a_strict_xfail_in_a_real_test_run).
