"""The end-of-session report from a session filled with known results: the terminal tables (latency per
backend with the ratio to HF, % of floor and gate verdicts; verdicts per backend and check), the JSON
summary's schema, and the HF-vs-DS PNG (written, non-empty, a real image naming weights and GPU)."""
from __future__ import annotations

import json
import time
import types

import pytest

from pytest_neoxmii import report
from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.hardware import Gpu, Hardware
from pytest_neoxmii.latency import LatencyResult, memory_bandwidth
from pytest_neoxmii.plot import main as plot_main
from pytest_neoxmii.plot import title_for
from pytest_neoxmii.precision import DtypeChoice
from pytest_neoxmii.registry import lookup
from pytest_neoxmii.session import Record
from pytest_neoxmii.weights import ResolvedModel

H100 = "NVIDIA H100 80GB HBM3"


def _lat(backend, bs, e2e, ttft, *, ratio=None, gate=None, device="cuda:0"):
    spec = lookup("pythia-160m")
    n = 32
    prefill = [ttft * (1 + 0.01 * i) for i in range(10)]
    samples = [e2e * (1 + 0.01 * i) for i in range(10)]
    r = LatencyResult(backend=backend, dtype="fp16", device=device, batch_size=bs, prompt_len=64, new_tokens=n,
                      rounds=10, warmup=3, e2e=samples, prefill=prefill, weight_bytes=spec.weight_bytes("fp16"),
                      gpu_name=H100 if device != "cpu" else None,
                      bandwidth=memory_bandwidth(H100) if device != "cpu" else None,
                      peak_gpu_memory_bytes=512 * 2**20 if device != "cpu" else None, ratio_to_hf=ratio, gate=gate)
    return r


def fake_session(tmp_path, *, source="synthetic", gpus=True):
    spec = lookup("pythia-160m")
    if source == "synthetic":
        model = ResolvedModel(spec=spec, source="synthetic", weights_key="synthetic-seed0-v2", seed=0)
    else:
        model = ResolvedModel(spec=spec, source="hub", weights_key="hub@50f5173d932e8e61f858120bcb800b97af589f46",
                              revision="50f5173d932e8e61f858120bcb800b97af589f46")
    hw = Hardware(gpus=(Gpu(0, H100, 85_045_870_592, (9, 0)),) if gpus else (),
                  cuda_version="13.0" if gpus else None, driver_version="580.159.04" if gpus else None)
    results = [
        _lat("hf", 1, 0.250, 0.012, ratio=1.0, gate={"verdict": "unchanged"}),
        _lat("ds", 1, 0.173, 0.009, ratio=0.692, gate={"verdict": "improvement"}),
        _lat("hf", 4, 0.300, 0.015, ratio=1.0, gate={"verdict": "no-baseline"}),
        _lat("ds", 4, 0.200, 0.011, ratio=0.667, gate={"verdict": "regression"}),
        _lat("zero", 1, 2.27, 0.07, ratio=9.08),
    ]
    records = [
        Record("greedy", "ds", "short-b1-len4", True),
        Record("teacher-forced", "ds", "long-b1-len2016", False, {"kl_max": 3.0}, "KL max 3 vs floor 1e-4"),
        Record("golden", "ds", "batch-b4-len32", False, {"status": "changed"},
               "batch-b4-len32: changed (row 2: step 7 token 13 -> 77 ...)"),
        Record("golden", "hf", "short-b1-len4", True, {"status": "near-tie"}, "short-b1-len4: near-tie (row 0 ...)"),
        Record("latency", "ds", "generate-bs1-p64-n32", True, {"gate_verdict": "improvement"},
               "ds generate-bs1-p64-n32 on NVIDIA-H100-80GB-HBM3: median 250.00 ms -> 173.00 ms (-30.8%, ...)"),
        Record("latency", "ds", "generate-bs4-p64-n32", False, {"gate_verdict": "regression", "x": float("inf")},
               "ds generate-bs4-p64-n32: regression"),
        Record("latency", "hf", "generate-bs4-p64-n32", None, {"gate_verdict": "no-baseline"}, "no baseline"),
        # a strict known issue, failing as expected
        Record("greedy", "ds", "padded-b4-len8x64x23x41", False, {}, "rows diverge", "ds-left-padded-decode"),
    ]
    return types.SimpleNamespace(
        model=model, hardware=hw, dtype="fp16", dtype_choice=DtypeChoice("fp16", None),
        options=types.SimpleNamespace(dtype=None, tp=1, report_dir=tmp_path / "rep"),
        infos={"hf:fp16": BackendInfo("hf", "fp16", "cuda:0", kernels="none (HF eager)"),
               "ds:fp16": BackendInfo("ds", "fp16", "cuda:0", kernels="injected 12/12 layers")},
        unavailable={"mii:fp16": "deepspeed-mii is not importable"},
        known_blocked={"zero:fp16": "known issue [made-up]: a condition"},
        crashed={"ds:bf16": "ds tp=1: worker crashed (killed by SIGABRT) during generate(...); last lines:\n  x"},
        reference_releases=[REFERENCE_FIRST],
        records=records, latency={(r.backend, r.dtype, r.bench): r for r in results},
        timings={"kernel build": 55.0, "model load": 10.0, "model calls": 20.0, "timed benchmark calls": 30.0},
        prelaunched=["ds", "mii"], started=time.perf_counter() - 130.0, reference_ahead=7, reference_ahead_s=12.34,
        redeployed=["ds deployed again after known issue [ds-left-padded-decode] ran: a later decode crashed"],
        ahead_reports={"ds:fp16": {"calls": 13, "computed": 13, "seconds": 2.2, "unclaimed": 0},
                       "mii:fp16": {"calls": 13, "computed": 12, "seconds": 3.6, "unclaimed": 2},
                       "zero:fp16": {"calls": 13, "computed": 4, "seconds": 9.5, "unclaimed": 1,
                                     "finished": False}})


REFERENCE_FIRST = ("reference first: 7 cases precomputed, hf fp32 + fp16 released before ds (needed hf fp32 "
                   "11.1 GB + hf fp16 5.6 GB + ds fp16 5.6 GB, x 1.2 = 26.6 GB > 15.8 GB of GPU 0)")


class FakeTerminal:
    def __init__(self):
        self.lines = []

    def section(self, title, **kw):
        self.lines.append(f"== {title} ==")

    def write_line(self, line, **kw):
        self.lines.extend(str(line).splitlines())


def test_json_summary_schema(tmp_path):
    s = report.build_summary(fake_session(tmp_path))
    json.dumps(s, allow_nan=False)                       # standard JSON: no NaN/Infinity anywhere
    assert s["schema"] == "pytest-neoxmii/summary" and s["schema_version"] == 1
    assert s["model"]["name"] == "pythia-160m" and s["model"]["weights"] == "synthetic-seed0-v2"
    assert s["model"]["source"] == "synthetic" and s["model"]["seed"] == 0
    assert s["hardware"]["gpu_name"] == H100 and s["hardware"]["gpu_count"] == 1
    assert s["hardware"]["gpu_class"] == "NVIDIA-H100-80GB-HBM3" and s["hardware"]["driver_version"] == "580.159.04"
    assert set(s["versions"]) == {"torch", "transformers", "deepspeed", "deepspeed-mii"}
    assert s["known_issue_not_deployed"] == {"zero:fp16": "known issue [made-up]: a condition"}
    assert "killed by SIGABRT" in s["crashed"]["ds:bf16"]
    assert s["reference_first"] == [REFERENCE_FIRST]
    assert [(r["backend"], r["batch_size"]) for r in s["latency"]] == [("hf", 1), ("hf", 4), ("ds", 1), ("ds", 4),
                                                                     ("zero", 1)]
    ds1 = s["latency"][2]
    for field in ("e2e_p50_s", "e2e_p90_s", "e2e_p99_s", "ttft_p50_s", "tpot_p50_s", "tokens_per_s",
                  "peak_gpu_memory_bytes", "ratio_to_hf", "floor_s", "floor_pct", "e2e_samples_s", "gate"):
        assert field in ds1, field
    assert ds1["ratio_to_hf"] == 0.692 and ds1["gate"] == {"verdict": "improvement"}
    assert len(ds1["e2e_samples_s"]) == 10
    assert 0 < ds1["floor_pct"] < 100
    assert s["latency"][4]["floor_s"] is None            # ZeRO: weights stream over PCIe
    counts = {"passed": 0, "failed": 0, "xfail": 0, "xpass": 0, "informational": 0, "known_issues": [],
              "outside_config": 0}
    assert s["verdicts"]["ds"]["golden"] == {**counts, "failed": 1}
    assert s["verdicts"]["hf"]["latency"] == {**counts, "informational": 1}
    assert s["verdicts"]["ds"]["greedy"] == {**counts, "passed": 1, "xfail": 1,
                                             "known_issues": ["ds-left-padded-decode"]}
    assert s["records"][-1]["known_issue"] == "ds-left-padded-decode"
    assert [g["case"] for g in s["golden_changes"]] == ["batch-b4-len32", "short-b1-len4"]
    assert [(c["backend"], c["verdict"]) for c in s["latency_changes"]] == [("ds", "improvement"),
                                                                           ("ds", "regression")]
    assert s["records"][5]["metrics"]["x"] is None       # inf is not JSON
    t = s["timings_s"]
    assert t["timed benchmark calls"] == 30.0 and t["session"] >= 130.0
    assert t["other (plugin and pytest)"] == pytest.approx(t["session"] - 115.0, abs=1.0)
    assert s["plot"] == "latency-pythia-160m.png"
    assert s["prelaunched"] == ["ds", "mii"]
    assert s["reference_computed_while_workers_loaded"] == 7 and s["reference_computed_s"] == 12.34
    assert s["redeployed"] == ["ds deployed again after known issue [ds-left-padded-decode] ran: a later decode "
                               "crashed"]
    assert s["worked_ahead"]["mii:fp16"] == {"calls": 13, "computed": 12, "seconds": 3.6, "unclaimed": 2}


def test_report_files_are_written_and_the_plot_is_a_real_image(tmp_path):
    session = fake_session(tmp_path)
    path, png, why = report.write_report(session, tmp_path / "rep")
    assert why is None
    assert path == tmp_path / "rep" / "neoxmii-summary.json"
    assert json.loads(path.read_text())["model"]["weights"] == "synthetic-seed0-v2"
    assert png == tmp_path / "rep" / "latency-pythia-160m.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import matplotlib.image
    height, width = matplotlib.image.imread(str(png)).shape[:2]
    assert width >= 1000 and height >= 400
    assert not list((tmp_path / "rep").glob("*.tmp"))


def test_markdown_summary_has_the_verdict_and_latency_tables(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    report.write_report(fake_session(tmp_path), tmp_path / "rep")
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert md.startswith("## pytest-neoxmii: pythia-160m\n")
    assert f"synthetic weights, seed 0, fp16, tp 1, on 1 x {H100}" in md
    lines = md.splitlines()
    verdict_header = lines.index("### Verdicts per backend") + 2
    assert lines[verdict_header] == "| backend | greedy | teacher-forced | golden | latency |"
    ds = next(ln for ln in lines[verdict_header:] if ln.startswith("| ds |"))
    assert ds.split(" | ")[1] == "1/1 passed, 1 xfail [ds-left-padded-decode]"
    assert ds.split(" | ")[2] == "0/1 passed FAILED"
    latency_header = next(i for i, ln in enumerate(lines) if ln.startswith("| backend | dtype | batch |"))
    assert lines[latency_header + 1].startswith("|---|---|---:|---:|")
    ds1 = lines[latency_header + 4].split(" | ")     # hf bs1, hf bs4, ds bs1
    assert ds1[0] == "| ds" and ds1[2] == "1" and "0.692" in ds1 and ds1[-1] == "improvement |"
    assert "- latency regression: ds generate-bs4-p64-n32: regression" in lines
    assert f"- {REFERENCE_FIRST}" in lines


def test_markdown_summary_is_appended_to_the_github_step_summary(tmp_path, monkeypatch):
    step = tmp_path / "step-summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    report.write_report(fake_session(tmp_path), tmp_path / "rep")
    report.write_report(fake_session(tmp_path), tmp_path / "rep2")
    text = step.read_text()
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert text == "earlier step\n" + md + "\n" + md + "\n"


def test_markdown_table_escapes_pipes_and_aligns_numbers():
    from pytest_neoxmii.table import format_markdown_table
    assert format_markdown_table(["a", "n"], [["x|y", 1.5], ["z", None]]).splitlines() == [
        "| a | n |", "|---|---:|", "| x\\|y | 1.5 |", "| z | - |"]


def test_plot_titles_say_weights_dtype_and_gpu(tmp_path):
    s = report.build_summary(fake_session(tmp_path))
    assert title_for(s) == f"pythia-160m: synthetic weights, seed 0, fp16, {H100}"
    real = report.build_summary(fake_session(tmp_path, source="hub", gpus=False))
    assert title_for(real) == "pythia-160m: real weights @50f5173d932e, fp16, CPU (no GPU)"


def test_no_latency_no_plot(tmp_path):
    session = fake_session(tmp_path)
    session.latency = {}
    path, png, why = report.write_report(session, tmp_path / "rep")
    assert png is None and why == "no latency results in this session"
    assert json.loads(path.read_text())["plot"] is None


def test_terminal_summary(tmp_path):
    tr = FakeTerminal()
    session = fake_session(tmp_path)
    report.terminal_summary(tr, session)
    text = "\n".join(tr.lines)
    assert tr.lines[0] == "== neoxmii summary =="
    assert "skip mii:fp16   deepspeed-mii is not importable" in tr.lines
    assert "xfail zero:fp16 not deployed: known issue [made-up]: a condition" in tr.lines
    assert "CRASH ds:bf16   ds tp=1: worker crashed (killed by SIGABRT) during generate(...); last lines:" in tr.lines
    assert REFERENCE_FIRST in tr.lines
    header = next(ln for ln in tr.lines if ln.startswith("backend  dtype  batch"))
    for col in ("TTFT ms", "TPOT ms", "e2e p50 ms", "p90 ms", "p99 ms", "tokens/s", "peak MiB", "x/HF",
                "floor ms", "floor %", "gate"):
        assert col in header
    ds1 = next(ln.split() for ln in tr.lines if ln.startswith("ds ") and " 1 " in ln and "improvement" in ln)
    assert ds1[0:3] == ["ds", "fp16", "1"] and "0.692" in ds1 and ds1[-1] == "improvement"
    zero = next(ln.split() for ln in tr.lines if ln.startswith("zero "))
    assert "unknown" in zero                                       # no floor for ZeRO
    verdict_header = next(ln for ln in tr.lines if ln.startswith("backend  greedy"))
    assert "teacher-forced" in verdict_header and "golden" in verdict_header and "latency" in verdict_header
    ds_verdicts = next(ln for ln in tr.lines if ln.startswith("ds ") and "FAILED" in ln)
    assert "1/1 passed, 1 xfail [ds-left-padded-decode]" in ds_verdicts and "0/1 passed FAILED" in ds_verdicts
    cells = [c.strip() for c in ds_verdicts.split("  ") if c.strip()]
    assert cells[1] == "1/1 passed, 1 xfail [ds-left-padded-decode]"   # no FAILED: the failure is expected
    assert "latency improvement: ds generate-bs1-p64-n32 on NVIDIA-H100-80GB-HBM3" in text
    assert "latency regression: ds generate-bs4-p64-n32: regression" in text
    assert "golden changed: ds batch-b4-len32: changed (row 2: step 7 token 13 -> 77 ...)" in text
    assert "workers launched when the session started, loading side by side: ds, mii (model load above" in text
    assert "; meanwhile the reference's outputs of 7 cases were computed (12.3 s, its load included)" in text
    assert "ds deployed again after known issue [ds-left-padded-decode] ran: a later decode crashed" in text
    assert ("worked ahead, side by side: ds 13/13 calls in 2.2 s, mii 12/13 calls in 3.6 s (2 never asked for: "
            "tests that did not run, or did not get that far), zero 4/13 calls in 9.5 s (1 never asked for: tests "
            "that did not run, or did not get that far) (still working ahead when the session ended)") in text
    assert "golden near-tie (accepted): hf short-b1-len4" in text
    assert "timed benchmark calls 30.0 s" in text
    rep = tmp_path / "rep"
    assert f"report: {rep / 'neoxmii-summary.json'}, {rep / 'summary.md'}, plot {rep / 'latency-pythia-160m.png'}" \
        in tr.lines


def test_plot_cli_combines_models(tmp_path, capsys):
    a = report.build_summary(fake_session(tmp_path))
    b = json.loads(json.dumps(a))
    b["model"]["name"] = "pythia-1b"
    paths = []
    for i, s in enumerate((a, b)):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps(s))
    out = tmp_path / "both.png"
    assert plot_main([str(p) for p in paths] + ["-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 30_000


# --- the sweep over model sizes (python -m pytest_neoxmii.plot over several reports) -------------------------

def sweep_reports(tmp_path) -> list[dict]:
    """Three reports in the shapes of pythia-160m, 410m and 1b (latency growing with size): 410m's ds has a
    parity failure, 1b's ds only the strict known issue."""
    from pytest_neoxmii.registry import lookup
    out = []
    for i, name in enumerate(("pythia-1b", "pythia-160m", "pythia-410m")):     # unsorted on purpose
        s = report.build_summary(fake_session(tmp_path))
        spec = lookup(name)
        s["model"].update(name=name, parameters=spec.parameter_count())
        scale = {"pythia-160m": 1.0, "pythia-410m": 1.6, "pythia-1b": 2.4}[name]
        for r in s["latency"]:
            r["e2e_p50_s"] *= scale
        counts = {"passed": 3, "failed": 0, "xfail": 0, "xpass": 0, "informational": 0, "known_issues": [],
                  "outside_config": 0}
        ds = {"greedy": dict(counts), "teacher-forced": dict(counts)}
        if name == "pythia-410m":
            ds["teacher-forced"]["failed"] = 1
        if name == "pythia-1b":
            ds["greedy"].update(xfail=1, known_issues=["ds-left-padded-decode"])
        s["verdicts"] = {"hf": {}, "ds": ds, "zero": {}}
        out.append(s)
    return out


def test_sweep_points_are_ordered_by_size_with_each_models_verdict(tmp_path):
    from pytest_neoxmii.plot import sweep_points
    points = sweep_points(sweep_reports(tmp_path))
    ds1 = [p for p in points if p.backend == "ds" and p.batch_size == 1]
    assert [p.model for p in ds1] == ["pythia-160m", "pythia-410m", "pythia-1b"]
    assert [p.parity for p in ds1] == ["passed", "FAILED", "xfail [ds-left-padded-decode]"]
    assert ds1[0].parameters < ds1[1].parameters < ds1[2].parameters
    assert [round(p.e2e_p50_ms / ds1[0].e2e_p50_ms, 2) for p in ds1] == [1.0, 1.6, 2.4]
    assert {p.parity for p in points if p.backend == "hf"} == {"reference"}
    assert {p.parity for p in points if p.backend == "zero"} == {"not judged"}


def test_plot_cli_draws_the_sweep_over_several_reports(tmp_path, capsys):
    paths = []
    for i, s in enumerate(sweep_reports(tmp_path)):
        paths.append(tmp_path / f"r{i}" / "neoxmii-summary.json")
        paths[-1].parent.mkdir()
        paths[-1].write_text(json.dumps(s))
    out = tmp_path / "sweep.png"
    assert plot_main([str(p) for p in paths] + ["-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    import matplotlib.image
    height, width = matplotlib.image.imread(str(out)).shape[:2]
    assert width >= 1000 and height >= 500                  # one panel per batch size (1 and 4)
    from pytest_neoxmii.plot import sweep_subtitle
    assert sweep_subtitle(sweep_reports(tmp_path)) == f"synthetic weights, seed 0, fp16, {H100}"


def test_plot_cli_refuses_an_unreadable_report(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit) as exc:
        plot_main([str(bad), "-o", str(tmp_path / "x.png")])
    assert exc.value.code == 2 and f"{bad}: not a readable JSON summary" in capsys.readouterr().err


def test_the_plot_draws_each_backends_row_on_the_sessions_main_shape():
    """A streaming engine is timed on fewer new tokens and hf may have a row on that shape too (for the ratio):
    hf's bar is its 32-token row, not the one measured later on 8 tokens; ZeRO's 8-token bar says so."""
    from pytest_neoxmii.plot import off_shape_note, plotted_rows, sweep_points
    row = lambda b, bs, n, ms: {"backend": b, "batch_size": bs, "prompt_tokens": 64, "new_tokens": n,
                                "e2e_p50_s": ms / 1e3, "rounds": 6}
    rows = [row("hf", 1, 32, 188.5), row("ds", 1, 32, 117.9), row("zero", 1, 8, 520.1), row("hf", 1, 8, 47.7)]
    summary = {"latency": rows, "model": {"name": "pythia-160m", "parameters": 162_322_944}}
    chosen = {(r["backend"], r["batch_size"]): r["e2e_p50_s"] * 1e3 for r in plotted_rows(summary)}
    assert chosen == {("hf", 1): 188.5, ("ds", 1): 117.9, ("zero", 1): 520.1}
    assert off_shape_note(rows[2], (64, 32)) == "\n(8 tok)" and off_shape_note(rows[1], (64, 32)) == ""
    points = {p.backend: p for p in sweep_points([summary])}
    assert points["hf"].e2e_p50_ms == 188.5 and points["zero"].shape_note == "(8 tok)"
    assert points["ds"].shape_note == ""
