"""Workers forked from the fork server (pytest_neoxmii/deploy/forkserver.py) are what exec'd ones are, to
everything the session looks at; where forking cannot give that, the worker is started by exec."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_neoxmii.deploy import forkserver, processes

pytestmark = pytest.mark.skipif(forkserver.gpus_present(), reason="needs a machine without GPUs, found GPUs: "
                                "there the session starts every worker by exec (deploy/forkserver.py)")

# Says what it is and where it runs, then waits for its go file (so the test can look at it while it runs),
# then does some multi-threaded torch work and exits as told.
PROBE = '''
import json, os, sys, time
import torch
started_with = "transformers" in sys.modules      # imported before this module ran: by the fork server
print(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0), "argv": sys.argv[1:],
                  "cwd": os.getcwd(), "path0": sys.path[0], "tag": os.environ.get("NEOXMII_DEPLOYMENT"),
                  "threads": torch.get_num_threads(), "preloaded": started_with,
                  "imported": sorted(m for m in ("transformers", "deepspeed") if m in sys.modules),
                  "setting": os.environ.get("NEOXMII_PROBE_SETTING"),
                  "import_setting": os.environ.get("PROBE_IMPORT"),
                  "oom_score_adj": open("/proc/self/oom_score_adj").read().strip()}),
      flush=True)
go = os.environ.get("NEOXMII_PROBE_GO")
while go and not os.path.exists(go):
    time.sleep(0.02)
a = torch.randn(600, 600)
for _ in range(3):
    a = (a @ a).clamp(-1, 1)                         # a parallel region: hangs if OpenMP was left broken
print("computed", flush=True)
how = os.environ.get("NEOXMII_PROBE_END", "0")
if how == "abort":
    os.abort()
sys.exit(int(how))
'''


@pytest.fixture
def probe_dir(tmp_path, monkeypatch):
    (tmp_path / "neoxmii_probe.py").write_text(PROBE)
    monkeypatch.delenv(forkserver.DISABLE_ENV, raising=False)     # these tests are about forking
    monkeypatch.chdir(tmp_path)         # `python -m neoxmii_probe` finds it in the cwd, forked or not
    yield tmp_path
    # Every tree a test started is torn down, its reaper with it (left, the reapers outlived the test).
    for tag, tree in _STARTED:
        processes.teardown([tree], name=tree.name, tag=tag, term_timeout=10)
    _STARTED.clear()


_STARTED: list = []


def _start(probe_dir: Path, name: str, *, fork: bool = True, env: dict[str, str] | None = None,
           tag: str | None = None, imports: tuple[str, ...] = ("transformers",)):
    """A probe whose engine would import `imports` (the fork server imports them before forking it)."""
    tag = tag or processes.new_tag("probe")
    log = probe_dir / f"{name}.log"
    extra = {"NEOXMII_PROBE_GO": str(probe_dir / f"{name}.go"), **(env or {})}
    spawn = forkserver.spawner("neoxmii_probe", ["--x", name], imports) if fork else None
    tree = processes.start([sys.executable, "-u", "-m", "neoxmii_probe", "--x", name], name=name,
                           log_path=log, tag=tag, env_extra=extra, spawn=spawn)
    _STARTED.append((tag, tree))
    return tag, tree


def _said(tree, deadline_s: float = 120) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for line in tree.log_path.read_text().splitlines():
            if line.startswith("{"):
                return json.loads(line)
        assert tree.popen.poll() is None, tree.log_path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{tree.name} said nothing in {deadline_s} s:\n{tree.log_path.read_text()}")


def _finish(probe_dir: Path, name: str, tree) -> int:
    (probe_dir / f"{name}.go").touch()
    return tree.popen.wait(timeout=120)


def test_a_forked_worker_is_what_an_exec_started_one_is(probe_dir):
    tag_f, forked = _start(probe_dir, "forked")
    tag_e, execd = _start(probe_dir, "execd", fork=False)
    f, e = _said(forked), _said(execd)
    assert forked.popen.forked is True and f["preloaded"] and not e["preloaded"], (f, e)
    for said, tag in ((f, tag_f), (e, tag_e)):
        assert said["sid"] == said["pgid"] == said["pid"]                 # its own session and group
        assert said["tag"] == tag
        # the teardown and the reaper find it by the tag in /proc/PID/environ
        assert processes.tagged(tag) == {said["pid"]}
    for key in ("cwd", "path0", "threads"):
        assert f[key] == e[key], key
    # first in the OOM killer's line, the test process not (processes.OOM_SCORE_ADJ)
    assert f["oom_score_adj"] == e["oom_score_adj"] == "1000", (f, e)
    assert open("/proc/self/oom_score_adj").read().strip() != "1000"
    assert f["argv"] == ["--x", "forked"] and e["argv"] == ["--x", "execd"]
    assert _finish(probe_dir, "forked", forked) == 0 and _finish(probe_dir, "execd", execd) == 0
    assert "computed" in forked.log_path.read_text()
    assert forked.log_path.read_text().startswith("$ ") and "asked of the fork server" in forked.log_path.read_text()


@pytest.mark.parametrize("end, code, described", [("3", 3, "exit code 3"), ("abort", -6, "killed by SIGABRT")])
def test_a_forked_workers_exit_is_reported_as_an_exec_started_ones(probe_dir, end, code, described):
    _, tree = _start(probe_dir, "ends", env={"NEOXMII_PROBE_END": end})
    _said(tree)
    assert _finish(probe_dir, "ends", tree) == code
    log = tree.log_path.read_text()
    assert processes.describe_exit(tree.popen.poll(), log) == described, log
    with pytest.raises(processes.ServerDied, match=described):
        tree.check_alive()


def test_a_killed_forked_worker_reads_as_killed_and_a_teardown_right_after_the_start_leaves_nothing(probe_dir):
    _, tree = _start(probe_dir, "killed")
    pid = _said(tree)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert tree.popen.wait(timeout=30) == -signal.SIGKILL
    # Torn down before the server has forked it (or just after): it must not start behind the teardown.
    tag, pending = _start(probe_dir, "pending")
    report = processes.teardown([pending], name="pending", tag=tag, term_timeout=10)
    assert report.survivors == [] and processes.tagged(tag) == set()
    assert pending.popen.wait(timeout=10) in (-signal.SIGTERM, -signal.SIGKILL)


def test_a_worker_whose_import_environment_differs_is_started_by_exec_while_the_server_has_others(
        probe_dir, monkeypatch):
    _, first = _start(probe_dir, "first")
    assert _said(first)["preloaded"]
    # An environment setting the server's imports may have read: not forked by a server that imported
    # without it while it still has a worker running; the setting reaches the worker.
    monkeypatch.setenv("PROBE_IMPORT", "other")
    _, other = _start(probe_dir, "other")
    said = _said(other)
    assert isinstance(other.popen, subprocess.Popen) and not said["preloaded"] and said["import_setting"] == "other"
    assert "not forked" not in other.log_path.read_text()          # an exec'd start, as processes.start logs it
    assert _finish(probe_dir, "other", other) == 0 and _finish(probe_dir, "first", first) == 0
    # Idle now: the next worker gets a server of its own environment, and a run-time setting does not matter.
    monkeypatch.setenv("NEOXMII_PROBE_SETTING", "runtime")
    _, again = _start(probe_dir, "again")
    said = _said(again)
    assert again.popen.forked is True and said["preloaded"] and said["import_setting"] == "other"
    assert said["setting"] == "runtime"
    assert _finish(probe_dir, "again", again) == 0


def test_a_server_imports_what_each_worker_needs_before_forking_it_and_nothing_else(probe_dir, own_fork_server):
    _, bare = _start(probe_dir, "bare", imports=())
    said = _said(bare)
    # An engine needing neither (a stand-in, a user's engine on another library): the server has imported
    # torch and the worker's modules only.
    assert bare.popen.forked is True and said["imported"] == [], said
    _, neox = _start(probe_dir, "neox", imports=("transformers", "deepspeed"))
    said = _said(neox)
    assert neox.popen.forked is True and said["imported"] == ["deepspeed", "transformers"], said
    assert _finish(probe_dir, "bare", bare) == 0 and _finish(probe_dir, "neox", neox) == 0


def test_an_import_that_leaves_a_thread_stops_the_forking_and_the_worker_starts_by_exec(probe_dir, own_fork_server):
    # A module of this engine starts a thread when imported: a fork would keep only the server's main
    # thread, with whatever locks the other holds. The server refuses this worker and every later one.
    (probe_dir / "threadmaker.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    # The test's own server starts in probe_dir: `python -m` finds threadmaker there.
    _, first = _start(probe_dir, "first", imports=("threadmaker",))
    said = _said(first)
    log = first.log_path.read_text()
    assert first.popen.forked is False and not said["preloaded"], log
    assert "not forked: the fork server cannot fork any more: 2 threads after importing threadmaker" in log, log
    _, later = _start(probe_dir, "later", imports=())
    _said(later)
    assert later.popen.forked is False and "cannot fork any more" in later.log_path.read_text()
    assert _finish(probe_dir, "first", first) == 0 and _finish(probe_dir, "later", later) == 0


def test_tags_longer_than_the_servers_placeholder_start_the_worker_by_exec(probe_dir):
    tag = processes.new_tag("x" * forkserver.ROOM_SIZE)
    _, tree = _start(probe_dir, "long", tag=tag)
    said = _said(tree)
    assert isinstance(tree.popen, subprocess.Popen) and not said["preloaded"]
    assert said["tag"] == tag and processes.tagged(tag) == {said["pid"]}
    assert _finish(probe_dir, "long", tree) == 0


def test_forking_off_starts_every_worker_by_exec(probe_dir, monkeypatch):
    monkeypatch.setenv(forkserver.DISABLE_ENV, "0")
    _, tree = _start(probe_dir, "off")
    assert isinstance(tree.popen, subprocess.Popen) and not _said(tree)["preloaded"]
    assert _finish(probe_dir, "off", tree) == 0


def test_a_process_with_another_thread_is_not_forked_from():
    # A fork keeps only the calling thread; the server refuses to serve when its imports left another.
    code = ("import threading, time; threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); "
            "from pytest_neoxmii.deploy.forkserver import _unsafe_to_fork; print(_unsafe_to_fork())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("2 threads after the imports"), out.stdout + out.stderr


def test_the_server_exits_once_its_workers_have_and_leaves_no_files(probe_dir):
    env = processes.deployment_env(None, {"NEOXMII_PROBE_GO": str(probe_dir / "own.go")})
    server = forkserver.ForkServer(env)
    early = server.start("neoxmii_probe", [], env, str(probe_dir), probe_dir / "early.log",
                         [sys.executable, "-u", "-m", "neoxmii_probe"])
    early.cancel_if_pending()
    assert early.started and early.poll() == -signal.SIGTERM and early.pid is None
    assert "never started" in (probe_dir / "early.log").read_text()
    handle = server.start("neoxmii_probe", [], env, str(probe_dir), probe_dir / "own.log",
                          [sys.executable, "-u", "-m", "neoxmii_probe"])
    assert handle.wait_started(timeout=120) and handle.forked
    server.close()
    time.sleep(0.5)
    assert server.running()                        # still reports the exit of the worker it forked
    (probe_dir / "own.go").touch()
    assert handle.wait(timeout=60) == 0
    server.process.wait(timeout=30)
    assert not server.status_dir.exists()
