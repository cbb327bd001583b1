"""summary.md: the session's verdict and latency tables in Markdown, rendered from the JSON summary (so it
says exactly what neoxmii-summary.json says). Inside GitHub Actions ($GITHUB_STEP_SUMMARY set) the same text
is appended to the job's step summary."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pytest_neoxmii.report_tables import GPU_WORK_LEGEND, has_gpu_work, latency_cells, latency_headers, verdict_rows
from pytest_neoxmii.table import format_markdown_table

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


def _origin(summary: dict) -> str:
    from pytest_neoxmii.plot import weights_label
    hw = summary.get("hardware", {})
    return (f"{weights_label(summary['model'])}, {summary['dtype']}, tp {summary.get('tp', 1)}, on "
            f"{hw.get('description') or 'no GPU'}")


def render(summary: dict) -> str:
    model = summary["model"]
    v = summary.get("versions", {})
    lines = [f"## pytest-neoxmii: {model['name']}", "",
             f"{_origin(summary)}; " + ", ".join(f"{k} {v[k]}" for k in v), ""]
    for engine, config in (summary.get("configs") or {}).items():
        lines += [f"{engine} serving config `{config['file']}` (digest {config['digest']}), merged over the "
                  f"plugin's defaults: `{json.dumps(config['values'], sort_keys=True)}`", ""]
    for key, reason in (summary.get("unavailable") or {}).items():
        lines.append(f"- skipped {key}: {reason}")
    lines += [f"- {line}" for line in summary.get("reference_first") or []]
    if summary.get("unavailable") or summary.get("reference_first"):
        lines.append("")
    table = verdict_rows(summary.get("verdicts") or {})
    lines += ["### Verdicts per backend", ""]
    lines += [format_markdown_table(*table), ""] if table else ["no parity or golden checks ran", ""]
    if summary.get("config_warnings"):
        lines += ["### Cases the serving config does not fit (run anyway)", ""]
        lines += [f"- {w}" for w in summary["config_warnings"]] + [""]
    changes = [*(f"golden {c['backend']}: {c['summary']}" for c in summary.get("golden_changes", [])),
               *(f"{c.get('change') or 'latency ' + str(c['verdict'])}: {c['summary']}"
                 for c in summary.get("latency_changes", []))]
    if changes:
        lines += ["### Changes against the baselines", ""] + [f"- {c}" for c in changes] + [""]
    rows = summary.get("latency") or []
    lines += ["### Latency", ""]
    if rows:
        lines += ["+-CI %: half-width of the 95% confidence interval of the end-to-end median; rounds: measured "
                  "rounds/why they stopped (ci, box: time box, max: round limit). x/HF: median end-to-end over the "
                  "HF peer's in this session; floor %: weight-streaming floor "
                  "/ TPOT." + (f" {GPU_WORK_LEGEND}." if has_gpu_work(rows) else ""), "",
                  format_markdown_table(latency_headers(rows), latency_cells(rows)), ""]
    else:
        lines += ["no latency results in this session", ""]
    if summary.get("plot"):
        lines += [f"Plot: `{summary['plot']}`", ""]
    return "\n".join(lines)


def write_markdown(summary: dict, path: Path) -> Path:
    text = render(summary)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    step_summary = os.environ.get(STEP_SUMMARY_ENV)
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return path
