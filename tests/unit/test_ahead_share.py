"""How an engine's calls worked ahead are dealt to the workers sharing them (ahead_share.py)."""
from __future__ import annotations

from pytest_neoxmii import ahead_share
from pytest_neoxmii.hardware import host_memory_available


def gen(name: str, tokens: int = 32):
    return ("generate", (name, tokens, 5))


def score(name: str):
    return ("score", (name,))


def test_a_greedy_call_costs_its_new_tokens_and_a_score_one_forward():
    assert ahead_share.call_cost(gen("a", 32)) == 32 and ahead_share.call_cost(gen("a", 0)) == 1
    assert ahead_share.call_cost(score("a")) == 1


def test_calls_are_dealt_so_that_the_shares_finish_together_each_in_test_order():
    # the suite's shape: 6 greedy calls of 32 tokens, then 7 scores
    calls = [gen(f"g{i}") for i in range(6)] + [score(f"s{i}") for i in range(7)]
    own, helper = ahead_share.split_calls(calls, 2)
    assert own + helper != calls and sorted(own + helper) == sorted(calls)       # each call exactly once
    assert [c for c in calls if c in own] == own and [c for c in calls if c in helper] == helper
    cost = [sum(map(ahead_share.call_cost, share)) for share in (own, helper)]
    assert abs(cost[0] - cost[1]) <= 1, cost
    # uneven calls: a long one balances against several short ones
    own, helper = ahead_share.split_calls([gen("long", 64), gen("a", 16), gen("b", 16), gen("c", 16),
                                           gen("d", 16)], 2)
    assert own == [gen("long", 64)] and len(helper) == 4


def test_one_share_is_everything_and_more_shares_than_calls_leave_some_empty():
    calls = [gen("a"), score("b")]
    assert ahead_share.split_calls(calls, 1) == [calls] and ahead_share.split_calls(calls, 0) == [calls]
    assert ahead_share.split_calls(calls, 3) == [[gen("a")], [score("b")], []]
    assert ahead_share.split_calls([], 2) == [[], []]


def test_workers_share_only_what_half_the_available_host_memory_holds_twice_over():
    gb = 10**9
    assert ahead_share.host_memory_allows(1, 24 * gb, None)                  # one worker: always
    assert ahead_share.host_memory_allows(2, 0.32 * gb, 100 * gb)            # pythia-160m fp16
    assert ahead_share.host_memory_allows(2, 24 * gb, 192 * gb)              # exactly at half
    assert not ahead_share.host_memory_allows(2, 24 * gb, 192 * gb - 1)      # pythia-12b fp16, short by a byte
    assert not ahead_share.host_memory_allows(2, 0.32 * gb, None)            # unknown: no helper


def test_a_helper_is_reported_under_its_engines_name():
    assert ahead_share.helper_key("zero:fp16", 1) == "zero helper 1:fp16"


def test_host_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemAvailable:    1000 kB\n")
    assert host_memory_available(str(meminfo)) == 1024000
    meminfo.write_text("MemTotal:       131072000 kB\n")
    assert host_memory_available(str(meminfo)) is None
    assert host_memory_available(str(tmp_path / "absent")) is None


def test_the_accounts_of_work_ahead_list_each_deployment_then_its_helpers_whatever_order_they_came_in():
    """A helper's account is taken when its share is done, often before its deployment's: the report still
    lists the deployment first, then its helpers by number, the deployments in the order first seen."""
    came = {"zero helper 2:fp16": {"n": 1}, "ds:fp16": {"n": 2}, "zero helper 1:fp16": {"n": 3},
            "zero:fp16": {"n": 4}, "zero helper 10:fp16": {"n": 5}, "mii:fp16": {"n": 6}}
    ordered = ahead_share.in_report_order(came)
    assert list(ordered) == ["zero:fp16", "zero helper 1:fp16", "zero helper 2:fp16", "zero helper 10:fp16",
                             "ds:fp16", "mii:fp16"]
    assert ordered == came                              # the same accounts, none lost or changed
    assert list(ahead_share.in_report_order({"my helper x:fp16": {}, "a:fp32": {}})) == ["my helper x:fp16", "a:fp32"]
