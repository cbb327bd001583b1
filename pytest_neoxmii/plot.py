"""The HF-vs-DS latency plot (matplotlib, Agg): per model and batch size, grouped bars of the median
end-to-end latency of hf / ds / mii / zero with the p90 as a whisker and each backend's ratio to HF written
above its bar, and beside it the decode time per output token against the weight-streaming floor. In the
spirit of the 'HF Vs DS Inference Comparison' plot of the EleutherAI DeepSpeed-inference notes.

It reads the JSON summary the report writes (neoxmii-summary.json), so plots can also be redrawn or
combined across models later:

    python -m pytest_neoxmii.plot report-160m/neoxmii-summary.json report-1b/neoxmii-summary.json -o hf-vs-ds.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BACKEND_ORDER = ("hf", "ds", "mii", "zero")
COLORS = {"hf": "#7f7f7f", "ds": "#1f77b4", "mii": "#2ca02c", "zero": "#d62728"}
LABELS = {"hf": "HF transformers", "ds": "DeepSpeed inference", "mii": "DeepSpeed-MII", "zero": "ZeRO-Inference"}


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


def _draw_model(ax_e2e, ax_tpot, summary: dict) -> None:
    import numpy as np

    rows = _rows(summary)
    batches = sorted({r["batch_size"] for r in rows})
    backends = [b for b in BACKEND_ORDER if any(r["backend"] == b for r in rows)]
    backends += sorted({r["backend"] for r in rows} - set(backends))
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
            bars = ax.bar(pos, heights, width, color=COLORS.get(b, "#9467bd"), label=LABELS.get(b, b),
                          yerr=[[0.0] * len(upper), upper], capsize=3, error_kw={"elinewidth": 1})
            heights_all += [h + u for h, u in zip(heights, upper) if h == h]   # whisker tops: labels sit there
            for bs, bar, h, up in zip(batches, bars, heights, upper):
                r = by.get((b, bs))
                if r is None or h != h:
                    continue
                if metric == "e2e":
                    ratio = r.get("ratio_to_hf")
                    text = "HF" if b == "hf" else ("" if ratio is None else f"x{ratio:.2f}")
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
    r0 = rows[0]
    rounds = r0.get("rounds")
    ax_e2e.set_title(f"{r0['prompt_tokens']}-token prompt, {r0['new_tokens']} new tokens (greedy), "
                     f"{rounds} rounds; label: ratio to HF", fontsize=8)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_neoxmii.plot",
                                     description="Plot HF vs DS latency from neoxmii-summary.json files.")
    parser.add_argument("summaries", nargs="+", type=Path, help="neoxmii-summary.json files (one per model)")
    parser.add_argument("-o", "--output", type=Path, default=Path("hf-vs-ds.png"))
    args = parser.parse_args(argv)
    summaries = [json.loads(p.read_text()) for p in args.summaries]
    print(plot_summaries(summaries, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
