"""The rows of the session's two tables, verdicts (backend x check) and latency (backend x metric): the
terminal summary (report.py) and summary.md (markdown_summary.py) show the same cells."""
from __future__ import annotations

from pytest_neoxmii import backends as engines

VERDICT_CHECKS = ("greedy", "teacher-forced", "golden", "golden-perplexity", "latency")


def _ms(x):
    return None if x is None else x * 1e3


LATENCY_HEADERS = ["backend", "dtype", "batch", "TTFT ms", "TPOT ms", "e2e p50 ms", "+-CI %", "rounds", "p90 ms",
                   "p99 ms", "tokens/s", "peak MiB", "x/HF", "floor ms", "floor %", "gate"]
# --neox-gpu-work's figures (gpu_work.py), as two more columns where any result has them
GPU_WORK_HEADERS = ["GPU ops", "GPU busy ms"]
GPU_WORK_LEGEND = "GPU ops, GPU busy ms: the GPU work of one call (--neox-gpu-work)"
# the gates' verdicts that a report names as a change against the baseline
CHANGES = ("regression", "improvement")
# why the rounds stopped, in the table's rounds column (latency.StopRule)
STOP_MARKS = {"ci": "ci", "time-box": "box", "max-rounds": "max", "fixed": "fixed"}


def latency_change(metrics: dict) -> str | None:
    """What a latency record's gate found beyond 'unchanged', e.g. 'latency regression' or 'GPU work
    regression', or both; None when nothing changed."""
    found = [f"{what} {metrics.get(key)}" for what, key in (("latency", "gate_verdict"), ("GPU work", "gpu_work_verdict"))
             if metrics.get(key) in CHANGES]
    return ", ".join(found) or None


def has_gpu_work(rows: list[dict]) -> bool:
    return any(r.get("gpu_operations_per_call") is not None for r in rows)


def latency_headers(rows: list[dict]) -> list[str]:
    return LATENCY_HEADERS[:-1] + (GPU_WORK_HEADERS if has_gpu_work(rows) else []) + LATENCY_HEADERS[-1:]


def latency_cells(rows: list[dict]) -> list[list]:
    """One table row per latency result (the terminal table and summary.md share them), under
    latency_headers(rows)."""
    with_work = has_gpu_work(rows)
    out = []
    for r in rows:
        peak = r.get("peak_gpu_memory_bytes")
        gate = (r.get("gate") or {}).get("verdict") or "-"
        work = (r.get("gate") or {}).get("gpu_work_verdict")
        if work in CHANGES:
            gate += f", GPU work {work}"
        ci = r.get("e2e_ci_half_width_pct")
        stop = r.get("stop_reason")
        rounds = f"{r['rounds']}/{STOP_MARKS.get(stop, stop)}" if stop else r["rounds"]
        out.append([r["backend"], r["dtype"], r["batch_size"], _ms(r["ttft_p50_s"]), _ms(r["tpot_p50_s"]),
                    _ms(r["e2e_p50_s"]), "-" if ci is None else ci, rounds, _ms(r["e2e_p90_s"]), _ms(r["e2e_p99_s"]), r["tokens_per_s"],
                    None if peak is None else peak / 2**20, r["ratio_to_hf"],
                    _ms(r["floor_s"]), r["floor_pct"] if r["floor_pct"] is not None else "unknown"]
                   + ([r.get("gpu_operations_per_call") or "-", _ms(r.get("gpu_busy_s_per_call")) or "-"] if with_work
                      else []) + [gate])
    return out


def _verdict_cell(n: dict) -> str:
    keys = " ".join(f"[{k}]" for k in n.get("known_issues", ()))
    judged = n["passed"] + n["failed"]
    parts = [f"{n['passed']}/{judged} passed" + (" FAILED" if n["failed"] else "")] if judged else []
    if n.get("xfail"):
        parts.append(f"{n['xfail']} xfail {keys}")
    if n.get("xpass"):
        parts.append(f"{n['xpass']} XPASS(strict) {keys}")
    if n["informational"]:
        parts.append(f"{n['informational']} not judged")
    if n.get("outside_config"):
        parts.append(f"{n['outside_config']} outside the serving config")
    return ", ".join(parts)


def verdict_rows(v: dict) -> tuple[list[str], list[list[str]]] | None:
    """Headers and rows of the per-backend verdict table (backend x check), None when nothing was judged."""
    checks = [c for c in VERDICT_CHECKS if any(c in per for per in v.values())]
    checks += sorted({c for per in v.values() for c in per} - set(checks))
    if not checks:
        return None
    rows = []
    for backend in engines.display_order(v):
        rows.append([backend] + [_verdict_cell(v[backend][c]) if c in v[backend] else "-" for c in checks])
    return ["backend"] + checks, rows
