"""The HF-vs-DS latency plot (matplotlib, Agg): per model and batch size, grouped bars of the median
end-to-end latency of hf / ds / mii / zero with the p90 as a whisker and each backend's ratio to HF written
above its bar, and beside it the decode time per output token against the weight-streaming floor. In the
spirit of the 'HF Vs DS Inference Comparison' plot of the EleutherAI DeepSpeed-inference notes.

It reads the JSON summary the report writes (neoxmii-summary.json), so plots can also be redrawn or
combined across models later:

    python -m pytest_neoxmii.plot report-160m/neoxmii-summary.json report-1b/neoxmii-summary.json -o hf-vs-ds.png

With reports of two or more models it draws the sweep of the EleutherAI notes instead (plot_sweep): latency
against model size, HF vs DS (and MII, ZeRO), each model's parity verdict marked on its point.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

# The engine registry (order, labels, colours) is imported where a figure is drawn, not at import: it
# imports torch, which `python -m pytest_neoxmii.plot --help` should not wait for.


def colour_of(backend: str) -> str:
    from pytest_neoxmii.backends import ENGINES
    from pytest_neoxmii.backends.base import Backend
    return ENGINES[backend].colour if backend in ENGINES else Backend.colour


def label_of(backend: str) -> str:
    from pytest_neoxmii.backends import ENGINES
    return (ENGINES[backend].label or backend) if backend in ENGINES else backend


def weights_label(model: dict) -> str:
    """'synthetic weights, seed 0' / 'real weights @<revision>' / 'local weights': said on every plot."""
    source = model.get("source")
    if source == "synthetic":
        return f"synthetic weights, seed {model.get('seed')}"
    if source == "hub":
        rev = str(model.get("revision") or "?")
        return f"real weights @{rev[:12]}"
    return f"local weights {model.get('weights', '')}"


def title_for(summary: dict) -> str:
    model = summary["model"]
    gpu = summary["hardware"].get("gpu_name") or "CPU (no GPU)"
    return f"{model['name']}: {weights_label(model)}, {summary['dtype']}, {gpu}"


def footer(summaries: list[dict]) -> str:
    """Where the numbers come from: versions, GPU (driver, CUDA), when."""
    s = summaries[0]
    v = s.get("versions", {})
    hw = s.get("hardware", {})
    gpu = hw.get("description") or "no GPU"
    soft = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "deepspeed", "deepspeed-mii") if k in v)
    return f"{soft}; {gpu}; pytest-neoxmii summary of {s.get('created_at', '?')}"


def _rows(summary: dict) -> list[dict]:
    return [r for r in summary.get("latency", []) if r.get("e2e_p50_s") is not None]


def _shape(row: dict) -> tuple:
    return row.get("prompt_tokens"), row.get("new_tokens")


def main_shape(rows: list[dict]) -> tuple | None:
    """The shape most of a session's latency rows share: hf's first row's, else the most common one."""
    from collections import Counter

    from pytest_neoxmii import backends as engines
    if not rows:
        return None
    return next((_shape(r) for r in rows if engines.is_reference(r["backend"])),
                Counter(_shape(r) for r in rows).most_common(1)[0][0])


def plotted_rows(summary: dict) -> list[dict]:
    """One row per backend and batch size. A session times most engines on one shape, and an engine that
    streams its weights on fewer new tokens (latency.STREAMING_NEW_TOKENS); hf may then have a row on that
    shape too, for the ratio. The session's main shape (main_shape) is drawn wherever a backend has it: a bar
    of another shape would stand beside bars it cannot be compared with."""
    rows = _rows(summary)
    main = main_shape(rows)
    chosen: dict[tuple, dict] = {}
    for r in rows:
        key = (r["backend"], r["batch_size"])
        if key not in chosen or (_shape(chosen[key]) != main and _shape(r) == main):
            chosen[key] = r
    return list(chosen.values())


def off_shape_note(row: dict, main: tuple) -> str:
    """What a bar timed on another shape than the plot's says under its label."""
    return "" if _shape(row) == main else f"\n({row.get('new_tokens')} tok)"


def _draw_model(ax_e2e, ax_tpot, summary: dict) -> None:
    import numpy as np

    from pytest_neoxmii import backends as engines

    rows = plotted_rows(summary)
    main = main_shape(rows)
    batches = sorted({r["batch_size"] for r in rows})
    backends = engines.display_order(r["backend"] for r in rows)
    width = 0.8 / max(len(backends), 1)
    x = np.arange(len(batches))
    by = {(r["backend"], r["batch_size"]): r for r in rows}
    for metric, ax, ylabel in (("e2e", ax_e2e, "end-to-end latency, ms (median, whisker p90)"),
                               ("tpot", ax_tpot, "decode time per output token, ms (median)")):
        heights_all = []
        for i, b in enumerate(backends):
            heights, upper = [], []
            for bs in batches:
                r = by.get((b, bs))
                p50 = None if r is None else r.get(f"{metric}_p50_s")
                p90 = None if r is None else r.get(f"{metric}_p90_s")
                heights.append(float("nan") if p50 is None else p50 * 1e3)
                upper.append(0.0 if p50 is None or p90 is None else max(p90 - p50, 0.0) * 1e3)
            pos = x - 0.4 + width * (i + 0.5)
            bars = ax.bar(pos, heights, width, color=colour_of(b), label=label_of(b),
                          yerr=[[0.0] * len(upper), upper], capsize=3, error_kw={"elinewidth": 1})
            heights_all += [h + u for h, u in zip(heights, upper) if h == h]   # whisker tops: labels sit there
            for bs, bar, h, up in zip(batches, bars, heights, upper):
                r = by.get((b, bs))
                if r is None or h != h:
                    continue
                if metric == "e2e":
                    ratio = r.get("ratio_to_hf")
                    text = "HF" if engines.is_reference(b) else ("" if ratio is None else f"x{ratio:.2f}")
                    text += off_shape_note(r, main)
                else:
                    pct = r.get("floor_pct")
                    text = "" if pct is None else f"floor\n{pct:.0f}%" if pct >= 10 else f"floor\n{pct:.2g}%"
                if text:
                    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, h + up), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=7)
        floors = {r.get("floor_s") for r in rows if r.get("floor_s")}
        if metric == "tpot" and floors:
            floor_ms = min(floors) * 1e3
            ax.axhline(floor_ms, color="black", linestyle="--", linewidth=1,
                       label="weight-streaming floor (weights / memory bandwidth)")
            ax.annotate(f"floor {floor_ms:.3g} ms", (1.0, floor_ms), xycoords=("axes fraction", "data"),
                        xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom", fontsize=7)
            heights_all.append(floor_ms)
        if metric == "tpot" and not floors:
            ax.text(0.99, 0.98, "weight-streaming floor: unknown for this device", transform=ax.transAxes,
                    ha="right", va="top", fontsize=7, color="#555555")
        positive = [h for h in heights_all if h > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")
            ax.set_ylim(min(positive) * 0.7, max(positive) * 4)     # room for the labels above the bars
        elif positive:
            ax.set_ylim(0, max(positive) * 1.15)
        ax.set_xticks(x)
        ax.set_xticklabels([f"batch {bs}" for bs in batches])
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=8)
    rounds = sorted({r.get("rounds") for r in rows if r.get("rounds")})
    spread = "" if not rounds else f"{rounds[0]} rounds" if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]} rounds"
    others = any(_shape(r) != main for r in rows)
    ax_e2e.set_title(f"{main[0]}-token prompt, {main[1]} new tokens (greedy){' unless said' if others else ''}"
                     f"{', ' + spread if spread else ''}; label: ratio to HF on the same shape", fontsize=8)
    ax_tpot.set_title("(end-to-end - TTFT) / (new tokens - 1); label: floor as % of it", fontsize=8)


def plot_summaries(summaries: list[dict], path: Path) -> Path:
    """One row per model (summary): end-to-end latency and decode time per token, HF vs DS."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [s for s in summaries if _rows(s)]
    if not summaries:
        raise ValueError("no latency results to plot")
    height = 4.6 * len(summaries)
    fig, axes = plt.subplots(len(summaries), 2, figsize=(12, height), squeeze=False)
    single = len(summaries) == 1
    for i, s in enumerate(summaries):
        _draw_model(axes[i][0], axes[i][1], s)
        if not single:
            title = title_for(s)
            if sum(title_for(o) == title for o in summaries) > 1:     # the same model twice: say which session
                title += f" (session of {s.get('created_at', '?')[:16]})"
            text = axes[i][0].text(0.0, 1.08, title, transform=axes[i][0].transAxes, fontsize=10,
                                   fontweight="bold", ha="left", va="bottom")
            text.set_in_layout(False)       # may run across both columns: not a reason to shrink the axes
    fig.suptitle("HF vs DS inference comparison" + (f"\n{title_for(summaries[0])}" if single else ""),
                 fontsize=12)
    handles: dict = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, 1 - (0.4 if single else 0.3) / height), frameon=False)
    fig.text(0.01, 0.005, footer(summaries), fontsize=7, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.9 / height))
    fig.subplots_adjust(top=1 - (0.92 if single else 1.05) / height)
    if not single:
        fig.subplots_adjust(hspace=0.42)      # room for each row's title (kept out of tight_layout)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_summary(summary: dict, path: Path) -> Path:
    return plot_summaries([summary], path)


# --- the sweep over model sizes ----------------------------------------------------------------------------

PARITY_CHECKS = ("greedy", "teacher-forced", "golden", "golden-perplexity")


def parity_verdict(summary: dict, backend: str) -> str:
    """One word for a backend's parity in a report: "FAILED" (any check failed, or a strict known issue
    XPASSed), "xfail [key]" (only known issues failed, as expected), "passed", or "not judged"."""
    per = (summary.get("verdicts") or {}).get(backend) or {}
    counts = [per[c] for c in PARITY_CHECKS if c in per]
    if any(n.get("failed") or n.get("xpass") for n in counts):
        return "FAILED"
    keys = sorted({k for n in counts for k in n.get("known_issues", ()) if n.get("xfail")})
    if keys:
        return "xfail " + " ".join(f"[{k}]" for k in keys)
    if any(n.get("passed") for n in counts):
        return "passed"
    return "not judged"


@dataclass(frozen=True)
class SweepPoint:
    model: str
    parameters: int
    backend: str
    batch_size: int
    e2e_p50_ms: float
    ratio_to_hf: float | None
    parity: str                  # parity_verdict of this backend in this model's report ("reference" for hf)
    shape_note: str = ""         # off_shape_note: timed on fewer new tokens than the report's other engines


def sweep_points(summaries: list[dict]) -> list[SweepPoint]:
    """Median end-to-end latency per (model, backend, batch size), ordered by model size. A model given twice
    keeps its latest report."""
    from pytest_neoxmii import backends as engines
    latest: dict[str, dict] = {}
    for s in summaries:
        name = s["model"]["name"]
        if name not in latest or s.get("created_at", "") >= latest[name].get("created_at", ""):
            latest[name] = s
    points = []
    for s in sorted(latest.values(), key=lambda s: s["model"].get("parameters") or 0):
        rows = plotted_rows(s)
        main = main_shape(rows)
        for r in rows:
            b = r["backend"]
            points.append(SweepPoint(s["model"]["name"], int(s["model"].get("parameters") or 0), b,
                                     r["batch_size"], r["e2e_p50_s"] * 1e3, r.get("ratio_to_hf"),
                                     "reference" if engines.is_reference(b) else parity_verdict(s, b),
                                     off_shape_note(r, main).strip().replace("\n", " ")))
    return points


def _marker(parity: str, color: str) -> tuple[str, str, str]:
    """(marker, face colour, edge colour) of a point by its parity verdict."""
    if parity == "FAILED":
        return "X", "#d62728", "#d62728"
    if parity.startswith("xfail"):
        return "s", "#ff7f0e", color
    if parity == "not judged":
        return "o", "none", color
    return "o", color, color          # passed, or the hf reference itself


def plot_sweep(summaries: list[dict], path: Path) -> Path:
    """The EleutherAI notes' figure, from reports: x = model size, y = median end-to-end latency, one line per
    backend (HF vs DS, MII, ZeRO), one panel per batch size; each deployment's point shows its parity verdict
    (filled: passed, red X: FAILED, hollow: not judged, square: xfail under a known issue) and its ratio to HF."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    from pytest_neoxmii import backends as engines

    points = sweep_points(summaries)
    if not points:
        raise ValueError("no latency results to plot")
    batches = sorted({p.batch_size for p in points})
    models = sorted({(p.parameters, p.model) for p in points})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 5.2), squeeze=False)
    for ax, bs in zip(axes[0], batches):
        at_bs = [p for p in points if p.batch_size == bs]
        backends = engines.display_order(p.backend for p in at_bs)
        # The first judged engine's labels sit below its line, the others' above: close lines don't overprint.
        first_judged = next((b for b in backends if not engines.is_reference(b)), None)
        for b in backends:
            line = sorted((p for p in at_bs if p.backend == b), key=lambda p: p.parameters)
            color = colour_of(b)
            ax.plot([p.parameters for p in line], [p.e2e_p50_ms for p in line], "-", color=color, linewidth=1.5,
                    label=label_of(b))
            for p in line:
                marker, face, edge = _marker(p.parity, color)
                ax.plot([p.parameters], [p.e2e_p50_ms], marker=marker, markersize=9 if marker == "X" else 7,
                        markerfacecolor=face, markeredgecolor=edge, linestyle="none")
                if not engines.is_reference(b):
                    label = (("" if p.ratio_to_hf is None else f"x{p.ratio_to_hf:.2f} ") + p.parity
                             + (f" {p.shape_note}" if p.shape_note else ""))
                    ax.annotate(label, (p.parameters, p.e2e_p50_ms), xytext=(5, -3 if b == first_judged else 6),
                                textcoords="offset points", fontsize=7, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([m[0] for m in models])
        ax.set_xticklabels([f"{m[1]}\n{m[0] / 1e9:.2g}B" for m in models], fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("model size (parameters)", fontsize=9)
        ax.set_ylabel("end-to-end latency, ms (median)", fontsize=9)
        ax.set_title(f"batch {bs}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", color="#444444", linestyle="none", label="parity passed"),
                Line2D([], [], marker="X", color="#d62728", linestyle="none", label="parity FAILED"),
                Line2D([], [], marker="s", color="#444444", markerfacecolor="#ff7f0e", linestyle="none",
                       label="xfail (known issue)"),
                Line2D([], [], marker="o", color="#444444", markerfacecolor="none", linestyle="none",
                       label="parity not judged")]
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0.89),
               frameon=False)
    fig.suptitle("HF vs DS inference across model sizes\n" + sweep_subtitle(summaries), fontsize=11)
    fig.text(0.01, 0.005, footer(summaries), fontsize=7, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.83))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_subtitle(summaries: list[dict]) -> str:
    """Weights, dtype and machine, said once when every report agrees, else listed (never hidden)."""
    def one(key):
        values = sorted({key(s) for s in summaries})
        return values[0] if len(values) == 1 else "mixed: " + " / ".join(values)
    return (f"{one(lambda s: weights_label(s['model']))}, {one(lambda s: s['dtype'])}, "
            f"{one(lambda s: s['hardware'].get('gpu_name') or 'CPU (no GPU)')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_neoxmii.plot",
                                     description="Plot HF vs DS latency from neoxmii-summary.json files.")
    parser.add_argument("summaries", nargs="+", type=Path, help="neoxmii-summary.json files (one per model)")
    parser.add_argument("-o", "--output", type=Path, default=Path("hf-vs-ds.png"))
    parser.add_argument("--kind", choices=("auto", "sweep", "models"), default="auto",
                        help="sweep: latency against model size, each model's parity marked; models: one row "
                             "of bar charts per report; auto (default): sweep for two or more models")
    args = parser.parse_args(argv)
    summaries = []
    for p in args.summaries:
        try:
            summaries.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"{p}: not a readable JSON summary ({exc})")
    kind = args.kind
    if kind == "auto":
        kind = "sweep" if len({s["model"]["name"] for s in summaries}) >= 2 else "models"
    try:
        out = plot_sweep(summaries, args.output) if kind == "sweep" else plot_summaries(summaries, args.output)
    except ValueError as exc:
        parser.error(str(exc))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
