"""Validation of the tensor-parallel deployments on a machine with 2 GPUs (run through
scripts/validate_multi_gpu.sh). Phases, in order, each only if what is left of the time budget allows;
the results go to $OUT/multi_gpu.json after every phase, so a run cut short keeps what it measured.

  env      GPUs, driver, versions
  kernels  DeepSpeed's transformer_inference op built (or loaded) once, while the synthetic models build
  parity   pythia-1b (synthetic) tp=2: ds under the DeepSpeed launcher and mii as MII LOCAL, against the
           fp32 HF reference (parity engine rules), teardown check: pytest on
           pytest_neoxmii/suite/test_multi_gpu.py
  cycles   10 consecutive deploy/teardown cycles in this process (MII LOCAL tp=2, pythia-70m): processes of
           the deployment and GPU memory (nvidia-smi and torch.cuda.mem_get_info per GPU) before and after
  sigint   a pytest session holding a MII tp=2 deployment, SIGINT mid-run: afterwards no process of the
           deployment alive and GPU memory back within 100 MB of its level before the session
  large    the largest of pythia-6.9b, pythia-2.8b (and gpt-neox-20b, which the memory arithmetic rules
           out for parity) whose GPU memory fits and whose estimated time fits the budget left
           (LARGE_MODEL=pythia-6.9b runs that one whatever the estimate)
  neox20b  gpt-neox-20b fp16 tp=2 through MII LOCAL, deploy and one greedy generation (no parity: its fp32
           reference does not fit one GPU); only if the estimate fits, so in practice a run of its own

Usage: python3 scripts/validate_multi_gpu.py [PHASE ...]   (default: env kernels parity cycles sigint large)"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT", "/tmp/out"))
CACHE = Path(os.environ.get("NEOXMII_CACHE", "/tmp/neoxmii-cache"))
START = float(os.environ.get("VALIDATE_START", time.time()))
BUDGET = float(os.environ.get("VALIDATE_BUDGET_S", 560))
PARITY_MODEL = os.environ.get("PARITY_MODEL", "pythia-1b")
SMALL_MODEL = os.environ.get("SMALL_MODEL", "pythia-70m")          # cycles and the SIGINT session
CYCLES = int(os.environ.get("CYCLES", 10))
CYCLES_BACKEND = os.environ.get("CYCLES_BACKEND", "mii")           # mii, ds or alternate
DEVICE, DTYPE = os.environ.get("CYCLES_DEVICE", "cuda:0"), os.environ.get("CYCLES_DTYPE", "fp16")
TOLERANCE_MB = 100.0                                                # "within 100 MB" (decimal MB)
TOLERANCE_MIB = TOLERANCE_MB * 1e6 / 2**20
DEFAULT_PHASES = ["env", "kernels", "parity", "cycles", "sigint", "large"]

RESULTS: dict = {"budget_s": BUDGET, "phases": {}}


def left() -> float:
    return BUDGET - (time.time() - START)


def save() -> None:
    RESULTS["wall_s"] = round(time.time() - START, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "multi_gpu.json").write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")


def log(msg: str) -> None:
    print(f"[validate {time.time() - START:6.1f} s] {msg}", flush=True)


# -- measurements --------------------------------------------------------------------------------------

def smi(query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def smi_used() -> dict[int, float]:
    return {int(i): float(m) for i, m in smi("index,memory.used")}


def torch_used() -> dict[int, float]:
    import torch
    return {i: (lambda f, t: (t - f) / 2**20)(*torch.cuda.mem_get_info(i)) for i in range(torch.cuda.device_count())}


def deployment_pids(owner: int | None = None) -> list[int]:
    """Processes carrying a deployment tag (NEOXMII_DEPLOYMENT), of one owner pid if given."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        tags = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"NEOXMII_DEPLOYMENT=")]
        if tags and state not in ("Z", "X") and (owner is None or f"-{owner}-" in tags[0]):
            found.append(int(p))
    return found


def snapshot(with_torch: bool = True) -> dict:
    # torch first: its first call creates this process's own CUDA context (~527 MiB per GPU on H200), and an
    # nvidia-smi reading taken before that would count our own context as the deployment's leak afterwards.
    torch_mib = torch_used() if with_torch else None
    snap = {"deployment_processes": len(deployment_pids()),
            "host_processes": sum(p.isdigit() for p in os.listdir("/proc")),
            "nvidia_smi_used_mib": smi_used()}
    if with_torch:
        snap["torch_mem_get_info_used_mib"] = torch_mib
    return snap


def within(after: dict[int, float], start: dict[int, float]) -> dict[int, float]:
    """GPUs whose memory is more than 100 MB away from the starting level: {gpu: MiB}."""
    return {i: after[i] - start[i] for i in start if abs(after[i] - start[i]) > TOLERANCE_MIB}


def build(name: str) -> tuple[Path, float]:
    from pytest_neoxmii.registry import lookup
    from pytest_neoxmii.weights import build_synthetic
    t0 = time.time()
    path = build_synthetic(lookup(name), 0, CACHE)
    return path, time.time() - t0


# -- pytest sessions -----------------------------------------------------------------------------------

def _plugin_args() -> list[str]:
    try:
        import importlib.metadata
        importlib.metadata.distribution("pytest-neoxmii")
        return []                        # installed: its entry point loads the plugin
    except Exception:
        return ["-p", "pytest_neoxmii.plugin"]


def pytest_cmd(model: str, backends: str, junit: Path | None, extra: list[str]) -> list[str]:
    # The SIGINT run_pytest sends at the timeout must raise KeyboardInterrupt in pytest, whatever SIGINT
    # disposition this script inherited.
    from pytest_neoxmii.interrupt import INTERRUPTIBLE_PYTEST
    cmd = [sys.executable, "-c", INTERRUPTIBLE_PYTEST, "pytest_neoxmii/suite/test_multi_gpu.py", *_plugin_args(),
           f"--neox-model={model}", "--neox-weights=synthetic", f"--neox-cache-dir={CACHE}", "--neox-tp=2",
           f"--neox-backends={backends}", "-p", "no:cacheprovider", "-rs", "-o", "junit_family=xunit1", *extra]
    if junit is not None:
        cmd.append(f"--junitxml={junit}")
    return cmd


def run_pytest(cmd: list[str], logfile: Path, timeout: float) -> dict:
    """Run a pytest session; past the timeout it gets SIGINT (a clean teardown), then SIGKILL."""
    t0 = time.time()
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    return {"cmd": " ".join(cmd), "rc": rc, "timed_out": timed_out, "wall_s": round(time.time() - t0, 1),
            "log": str(logfile), "tail": logfile.read_text(errors="replace").splitlines()[-40:]}


def junit_results(path: Path) -> dict:
    if not path.is_file():
        return {"error": f"{path} not written"}
    tests, counts = {}, {}
    for tc in ET.parse(path).iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = tc.find(tag)
            if node is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), (node.get("message") or "")[:1500]
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        tests[tc.get("name")] = {"outcome": outcome, "time_s": float(tc.get("time") or 0), "message": message,
                                 "properties": props}
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"counts": counts, "tests": tests}


def session_phase(name: str, model: str, backends: str, timeout: float, extra: list[str] = ()) -> dict:
    junit = OUT / f"junit-{name}.xml"
    res = run_pytest(pytest_cmd(model, backends, junit, list(extra)), OUT / f"pytest-{name}.log", timeout)
    res.update(junit_results(junit))
    res["leaks_reported"] = [ln for ln in res["tail"] if "LEAK after teardown" in ln]
    return res


# -- phases --------------------------------------------------------------------------------------------

def phase_env() -> dict:
    import importlib.metadata as md
    info = {"gpus": [dict(zip(("index", "name", "memory_total_mib", "driver"), row))
                     for row in smi("index,name,memory.total,driver_version")],
            "python": sys.version.split()[0], "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")}
    for dist in ("torch", "transformers", "deepspeed", "deepspeed-mii", "psutil", "grpcio"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = "not installed"
    info["mem_total_gib"] = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    info["disk_free_gb"] = shutil.disk_usage(CACHE.parent if CACHE.parent.exists() else "/").free / 1e9
    if len(info["gpus"]) < 2:
        raise SystemExit(f"needs 2 GPUs, found {len(info['gpus'])}")
    return info


def phase_kernels() -> dict:
    """The JIT build of transformer_inference (~55 s on 16 cores the first time, then cached) in a separate
    process, overlapped with building the synthetic models the later phases use."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "from deepspeed.ops.op_builder import InferenceBuilder; "
                             "InferenceBuilder().load()"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    builds = {}
    for model in (SMALL_MODEL, PARITY_MODEL):
        path, seconds = build(model)
        builds[model] = {"path": str(path), "build_s": round(seconds, 1)}
    out, _ = proc.communicate(timeout=max(left(), 60))
    return {"rc": proc.returncode, "kernel_build_s": round(time.time() - t0, 1), "tail": out.splitlines()[-5:],
            "synthetic_builds": builds}


# Seconds kept for the phases after parity: 10 cycles of ~17 s on pythia-70m, one interrupted session.
RESERVE = {"cycles": 190, "sigint": 70}


def phase_parity() -> dict:
    reserve = sum(RESERVE.get(p, 0) for p in PHASES[PHASES.index("parity") + 1:]) + 10
    return session_phase("parity", PARITY_MODEL, "ds,mii", timeout=min(max(left() - reserve, 180), 400))


def phase_cycles() -> dict:
    # Deployed as the plugin deploys them (backends.load_backend): mii tp=2 is its gRPC servers hosted in a
    # worker process, ds tp=2 its ranks under the DeepSpeed launcher; this process never imports either.
    from pytest_neoxmii.backends import load_backend
    from pytest_neoxmii.outputs import PromptBatch
    from pytest_neoxmii.registry import lookup
    path, _ = build(SMALL_MODEL)
    torch_used()                          # CUDA contexts of this process exist before the starting level
    start = snapshot()
    cycles, failures = [], 0
    for i in range(CYCLES):
        kind = CYCLES_BACKEND if CYCLES_BACKEND != "alternate" else ("mii", "ds")[i % 2]
        if left() < 30 + sum(RESERVE.get(p, 0) for p in PHASES[PHASES.index("cycles") + 1:]):
            cycles.append({"cycle": i, "skipped": f"time budget: {left():.0f} s left"})
            break
        cycle = {"cycle": i, "backend": kind, "before": snapshot()}
        t0, backend = time.time(), None
        try:
            backend = load_backend(kind, path=path, dtype=DTYPE, device=DEVICE, tp=2, max_tokens=256,
                                   spec=lookup(SMALL_MODEL), max_batch=1)
            cycle["deploy_s"] = round(time.time() - t0, 1)
            t1 = time.time()
            gen = backend.generate(PromptBatch(rows=(tuple(range(10, 42)),), pad_token_id=1), 8)
            cycle.update(query_s=round(time.time() - t1, 3), tokens=gen.tokens[0], info=backend.info.describe())
            cycle["loaded"] = snapshot()
            cycle["deployment_pids"] = sorted(set().union(*(t.pids() for t in backend._trees)))
        except Exception as exc:
            cycle["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
            failures += 1
        finally:
            if backend is not None:
                backend.close()
                cycle["teardown"] = backend.teardown_report.as_dict()
        cycle["after"] = after = snapshot()
        cycle["smi_off_start_mib"] = within(after["nvidia_smi_used_mib"], start["nvidia_smi_used_mib"])
        cycle["torch_off_start_mib"] = within(after["torch_mem_get_info_used_mib"],
                                              start["torch_mem_get_info_used_mib"])
        cycle["ok"] = ("error" not in cycle and not cycle.get("teardown", {}).get("leaked", True)
                       and after["deployment_processes"] <= start["deployment_processes"]
                       and not cycle["smi_off_start_mib"]
                       and not cycle["torch_off_start_mib"])
        cycle["wall_s"] = round(time.time() - t0, 1)
        log(f"cycle {i} ({kind}): deploy {cycle.get('deploy_s')} s, ok={cycle['ok']}, "
            f"GPU MiB {after['nvidia_smi_used_mib']} (start {start['nvidia_smi_used_mib']})")
        cycles.append(cycle)
        if failures >= 2:
            break
    done = [c for c in cycles if "skipped" not in c]
    return {"model": SMALL_MODEL, "start": start, "cycles": cycles, "completed": len(done),
            "all_ok": len(done) == CYCLES and all(c["ok"] for c in done),
            "tolerance_mb": TOLERANCE_MB}


def phase_sigint() -> dict:
    path, _ = build(SMALL_MODEL)
    before = snapshot()
    logfile = OUT / "pytest-sigint.log"
    cmd = pytest_cmd(SMALL_MODEL, "mii", None, ["-v", "-k", "greedy"])
    t0 = time.time()
    f = open(logfile, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    answered = re.compile(r"test_tp_greedy_parity\[mii-.*(PASSED|FAILED|XFAIL|ERROR)")
    res = {"cmd": " ".join(cmd), "before": before}
    deadline = time.time() + min(left() - 60, 240)
    while time.time() < deadline and proc.poll() is None and not answered.search(logfile.read_text(errors="replace")):
        time.sleep(0.5)
    res["deployment_answered"] = bool(answered.search(logfile.read_text(errors="replace")))
    res["during"] = snapshot()
    res["during_deployment_pids"] = deployment_pids(proc.pid)
    res["sigint_after_s"] = round(time.time() - t0, 1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        t1 = time.time()
        try:
            res["rc"] = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            res["rc"] = "did not exit within 120 s of SIGINT"
            proc.kill()
            proc.wait()
        res["exit_after_sigint_s"] = round(time.time() - t1, 1)
    else:
        res["rc"] = proc.returncode
        res["note"] = "the session ended before it could be interrupted"
    f.close()
    time.sleep(1)
    res["after"] = after = snapshot()
    res["alive_after"] = deployment_pids(proc.pid)
    res["smi_off_start_mib"] = within(after["nvidia_smi_used_mib"], before["nvidia_smi_used_mib"])
    text = logfile.read_text(errors="replace")
    res["tail"] = text.splitlines()[-30:]
    res["interrupted"] = "KeyboardInterrupt" in text
    res["ok"] = (res["deployment_answered"] and res["interrupted"] and not res["alive_after"]
                 and not res["smi_off_start_mib"] and len(res["during_deployment_pids"]) > 0)
    return res


def _estimate(spec, build_rate: float, parity_wall: float | None, parity_params: float) -> dict:
    """Seconds to build the synthetic model and to run its tp=2 session. The session of the parity model
    (measured in this run, else 240 s) is mostly fixed cost: process starts, imports, deploys, ~7-10 ms
    per decode step whatever the size. What grows with the model is moving weights: about 16 bytes a
    parameter are read, converted or copied across the session (fp32 reference, fp16 peer, two tp=2
    deployments of two ranks, two tp=1 copies), taken here at ~0.65 GB/s overall: 25 s per 1e9 params."""
    p = spec.parameter_count()
    build_s = p / build_rate + 2 * p / 1.0e9 * 2        # generate, then hash and write 2 bytes a param at ~1 GB/s
    session_s = (parity_wall or 240.0) + 25e-9 * max(p - parity_params, 0)
    return {"params": p, "build_s": round(build_s), "session_s": round(session_s),
            "total_s": round(build_s + session_s)}


def _memory_plan(spec, gpu_bytes: list[int], host_bytes: int, disk_free: float) -> tuple[bool, list[str]]:
    """GPU 0 holds the fp32 reference and the fp16 peer (noise floor) of the session, rank 0's shard, and
    for the latency test a tp=1 copy: 4P + 2P + 1.2 P + 2.4 P bytes. Host memory holds each rank's copy
    loaded with system memory plus the fp32 reference on its way to the GPU."""
    p = spec.parameter_count()
    reasons, ok = [], True
    tp2, why = spec.fits("fp16", 2, gpu_bytes)
    reasons.append(why)
    ok &= tp2
    gpu0 = 9.6 * p
    reasons.append(f"GPU 0 in the parity session: fp32 reference {4 * p / 1e9:.1f} GB + fp16 peer "
                   f"{2 * p / 1e9:.1f} GB"
                   f" + rank 0 shard and tp=1 copy {3.6 * p / 1e9:.1f} GB = {gpu0 / 1e9:.1f} GB of "
                   f"{gpu_bytes[0] / 1e9:.1f} GB")
    ok &= gpu0 <= gpu_bytes[0]
    host = 2 * 2 * p + 4 * p
    reasons.append(f"host memory: 2 ranks x {2 * p / 1e9:.1f} GB + reference {4 * p / 1e9:.1f} GB = "
                   f"{host / 1e9:.1f} GB of {host_bytes / 1e9:.1f} GB")
    ok &= host <= host_bytes
    reasons.append(f"disk: {2 * p / 1e9:.1f} GB of weights, {disk_free / 1e9:.0f} GB free")
    ok &= 2 * p < disk_free
    return bool(ok), reasons


def phase_large() -> dict:
    from pytest_neoxmii.registry import lookup
    gpu_bytes = [int(float(m) * 2**20) for _, m in smi("index,memory.total")]
    host = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    disk = shutil.disk_usage(CACHE.parent if CACHE.parent.exists() else "/").free
    builds = RESULTS["phases"].get("kernels", {}).get("synthetic_builds", {})
    measured = [(lookup(m).parameter_count(), b["build_s"]) for m, b in builds.items() if b["build_s"] > 1]
    build_rate = (sum(p for p, _ in measured) / sum(s for _, s in measured)) if measured else 1.0e8
    parity = RESULTS["phases"].get("parity", {})
    parity_wall = parity.get("wall_s") if parity.get("rc") == 0 or parity.get("counts") else None
    candidates = {}
    chosen = None
    for name in ("gpt-neox-20b", "pythia-6.9b", "pythia-2.8b"):
        spec = lookup(name)
        fits, reasons = _memory_plan(spec, gpu_bytes, host, disk)
        est = _estimate(spec, build_rate, parity_wall, lookup(PARITY_MODEL).parameter_count())
        if "kernels" not in RESULTS["phases"]:
            est["total_s"] += 60                         # the session JIT-builds the kernels first
        fits_time = est["total_s"] <= left() - 30 or name == os.environ.get("LARGE_MODEL")
        candidates[name] = {"memory_fits": fits, "memory": reasons, "estimate": est,
                            "time_fits": fits_time, "time_left_s": round(left())}
        if chosen is None and fits and fits_time:
            chosen = name
    res = {"build_rate_params_per_s": round(build_rate), "candidates": candidates, "chosen": chosen}
    if chosen is None:
        res["skipped"] = ("no candidate fits both the memory and the time left; run "
                          "`bash scripts/validate_multi_gpu.sh large` as a call of its own")
        return res
    path, seconds = build(chosen)
    res["build_s"] = round(seconds, 1)
    res["session"] = session_phase("large", chosen, "ds,mii", timeout=left() - 15)
    return res


def phase_neox20b() -> dict:
    from pytest_neoxmii.registry import lookup
    spec = lookup("gpt-neox-20b")
    gpu_bytes = [int(float(m) * 2**20) for _, m in smi("index,memory.total")]
    fits, reason = spec.fits("fp16", 2, gpu_bytes)
    est = _estimate(spec, 1.0e8, None, lookup(PARITY_MODEL).parameter_count())
    res = {"fit": reason, "estimate": est, "time_left_s": round(left())}
    if not fits or est["build_s"] + 240 > left():
        res["skipped"] = "does not fit" if not fits else f"estimated {est['build_s'] + 240} s > {left():.0f} s left"
        return res
    path, seconds = build("gpt-neox-20b")
    res["build_s"] = round(seconds, 1)
    res["session"] = session_phase("neox20b", "gpt-neox-20b", "mii", timeout=left() - 15,
                                   extra=["-k", "20b or kernels"])
    return res


PHASES = sys.argv[1:] or DEFAULT_PHASES


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NEOXMII_RUN_DIR", str(OUT / "runs"))   # logs of failed deployments come back
    for name in PHASES:
        fn = globals().get(f"phase_{name}")
        if fn is None:
            RESULTS["phases"][name] = {"error": f"unknown phase {name!r}"}
            continue
        if left() < 20:
            RESULTS["phases"][name] = {"skipped": f"time budget: {left():.0f} s left of {BUDGET:.0f} s"}
            save()
            continue
        log(f"phase {name} ({left():.0f} s left)")
        t0 = time.time()
        try:
            RESULTS["phases"][name] = fn()
        except BaseException as exc:     # keep going: each phase's result is worth having on its own
            RESULTS["phases"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                       "traceback": traceback.format_exc()[-4000:]}
            if isinstance(exc, KeyboardInterrupt):
                save()
                raise
        RESULTS["phases"][name]["phase_wall_s"] = round(time.time() - t0, 1)
        save()
        log(f"phase {name} done in {time.time() - t0:.0f} s")
    from pytest_neoxmii.deploy import processes
    RESULTS["leaks_in_this_process"] = processes.leak_summary_lines()
    RESULTS["deployment_processes_left"] = deployment_pids()
    save()
    print(json.dumps({k: (v.get("ok", v.get("all_ok", v.get("counts", v.get("skipped", v.get("error")))))
                          if isinstance(v, dict) else v) for k, v in RESULTS["phases"].items()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
