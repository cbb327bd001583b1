"""End-of-session report: what ran (per backend), the verdicts per check and case family, and where the
time went (kernel build, model load, model calls, the plugin's own overhead)."""
from __future__ import annotations

import time
from collections import defaultdict

from pytest_neoxmii.table import format_table


def terminal_summary(terminalreporter, session) -> None:
    tr = terminalreporter
    tr.section("neoxmii summary")
    tr.write_line(f"model: {session.model.describe()}; GPUs: {session.hardware.describe()}")
    for key, info in session.infos.items():
        tr.write_line(f"ran  {key:<10} {info.describe()}")
    for key, reason in session.unavailable.items():
        tr.write_line(f"skip {key:<10} {reason}")
    groups = defaultdict(lambda: [0, 0, 0])
    for rec in session.records:
        family = rec.case.split("-b")[0] if "-b" in rec.case else rec.case
        g = groups[(rec.backend, rec.check, family)]
        g[0 if rec.passed else 1 if rec.passed is False else 2] += 1
    if groups:
        rows = [[b, c, f, p, fl] for (b, c, f), (p, fl, _) in sorted(groups.items())]
        tr.write_line(format_table(["backend", "check", "case family", "passed", "failed"], rows))
    wall = time.perf_counter() - session.started
    t = session.timings
    accounted = sum(t.values())
    tr.write_line("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items())
                  + f", other (plugin and pytest) {max(wall - accounted, 0):.1f} s, session {wall:.1f} s")
