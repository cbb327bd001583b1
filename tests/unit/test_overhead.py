"""Where the session's "other" time goes (overhead.py): before the first test, in tests, after the last."""
from pytest_neoxmii.overhead import OverheadLog


def test_other_time_is_split_before_in_and_after_the_tests():
    log = OverheadLog(started=100.0)
    log.test_ran("suite/test_a.py::test_one", began=103.0, ended=110.0, accounted=6.5)    # 0.5 s other
    log.test_ran("suite/test_a.py::test_two", began=110.0, ended=112.0, accounted=0.0)    # 2.0 s other
    log.test_ran("suite/test_b.py::test_three", began=112.0, ended=113.0, accounted=1.2)  # timed > wall: 0
    d = log.as_dict(now=115.5)
    assert d["before the first test"] == 3.0 and d["after the last test"] == 2.5
    assert d["in tests"] == 2.5
    assert d["largest in tests"][:2] == [["suite/test_a.py::test_two", 2.0], ["suite/test_a.py::test_one", 0.5]]
    assert log.describe(now=115.5) == ("other, where: 3.0 s before the first test (start-up, collection), 2.5 s in "
                                       "tests (most: test_two 2.0 s, test_one 0.5 s, test_three 0.0 s), 2.5 s "
                                       "after the last one")
    assert log.timeline() == [["suite/test_a.py::test_one", 3.0, 10.0, 6.5],
                              ["suite/test_a.py::test_two", 10.0, 12.0, 0.0],
                              ["suite/test_b.py::test_three", 12.0, 13.0, 1.2]]


def test_a_session_without_tests_says_nothing_ran_after_them():
    d = OverheadLog(started=10.0).as_dict(now=12.0)
    assert d == {"before the first test": 2.0, "in tests": 0.0, "after the last test": 0.0, "largest in tests": []}


def test_each_tests_seconds_are_kept_by_phase_and_phases_it_did_not_enter_are_left_out():
    log = OverheadLog(started=0.0)
    log.test_ran("t.py::test_latency[hf-bs1]", began=1.0, ended=8.0, accounted=6.5,
                 phases={"model teardown": 1.2, "timed benchmark calls": 5.3, "model calls": 0.0, "kernel build": 2e-4})
    log.test_ran("t.py::test_quick", began=8.0, ended=8.1, accounted=0.0, phases={"model calls": 0.0})
    log.test_ran("t.py::test_old_caller", began=8.1, ended=9.0, accounted=0.4)          # no phases given
    assert log.phases == {"t.py::test_latency[hf-bs1]": {"model teardown": 1.2, "timed benchmark calls": 5.3}}
