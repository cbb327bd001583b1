"""Where the plugin's and pytest's own time goes (the session's "other": wall time outside every timed
phase): before the first test (start-up, configure, collection), inside the tests (the part of each test's
run that is no model load, model call, judging or timing), and after the last test until the summary is
built. The report lists the largest, so that an overhead can be found without a profiler. The JSON summary
also keeps each test's start and end (the session's time line), which shows what a session waited on, and the
seconds each test spent in each timed phase, which shows what a long test waited for (a worker's load, the
teardown of another deployment, its own model calls)."""
from __future__ import annotations

import time

TOP = 5


class OverheadLog:
    def __init__(self, started: float):
        self.started = started
        self.first_test_at: float | None = None
        self.last_test_end: float | None = None
        self.in_tests: list[tuple[str, float]] = []     # (nodeid, seconds outside any timed phase)
        self.spans: list[tuple[str, float, float, float]] = []   # (nodeid, began, ended, seconds in timed phases)
        self.phases: dict[str, dict[str, float]] = {}    # nodeid -> {phase: seconds}, phases it spent time in

    def test_ran(self, nodeid: str, began: float, ended: float, accounted: float,
                 phases: dict[str, float] | None = None) -> None:
        """One test's run (setup, call, teardown) from `began` to `ended`, `accounted` seconds of it in the
        session's timed phases (`phases`: those seconds by phase)."""
        if self.first_test_at is None:
            self.first_test_at = began
        self.last_test_end = ended
        self.in_tests.append((nodeid, max(ended - began - accounted, 0.0)))
        self.spans.append((nodeid, began, ended, accounted))
        spent = {phase: round(seconds, 3) for phase, seconds in (phases or {}).items() if round(seconds, 3) > 0}
        if spent:
            self.phases[nodeid] = spent

    def timeline(self) -> list[list]:
        """[nodeid, start, end, seconds in timed phases] of each test in the order run, from the session's
        start."""
        return [[nodeid, round(began - self.started, 3), round(ended - self.started, 3), round(accounted, 3)]
                for nodeid, began, ended, accounted in self.spans]

    def as_dict(self, now: float | None = None) -> dict:
        now = time.perf_counter() if now is None else now
        largest = sorted(self.in_tests, key=lambda t: -t[1])[:TOP]
        return {
            "before the first test": round((self.first_test_at or now) - self.started, 3),
            "in tests": round(sum(s for _, s in self.in_tests), 3),
            "after the last test": round(now - (self.last_test_end or now), 3) if self.in_tests else 0.0,
            "largest in tests": [[nodeid, round(s, 3)] for nodeid, s in largest],
        }

    def describe(self, now: float | None = None) -> str:
        d = self.as_dict(now)
        worst = ", ".join(f"{nodeid.rsplit('::', 1)[-1]} {s:.1f} s" for nodeid, s in d["largest in tests"][:3])
        return (f"other, where: {d['before the first test']:.1f} s before the first test (start-up, collection), "
                f"{d['in tests']:.1f} s in tests" + (f" (most: {worst})" if worst else "")
                + f", {d['after the last test']:.1f} s after the last one")
