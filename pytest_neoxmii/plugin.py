"""The pytest hooks of pytest-neoxmii: options, markers, the report header, collection-time GPU skips,
parametrization over cases and backends, and the end-of-session summary. Fixtures live in fixtures.py."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from pytest_neoxmii import backends as engines
from pytest_neoxmii import hardware, interpreter_exit
from pytest_neoxmii import options as options_mod
from pytest_neoxmii.backends import planted_fault
from pytest_neoxmii.deploy import cpu_heap
from pytest_neoxmii.errors import NeoxUsageError
from pytest_neoxmii.fixtures import (neox, neox_case, neox_ds,  # noqa: F401 (fixtures)
                                     neox_generation_case, neox_mii, neox_reference, neox_zero,
                                     register_neox_benchmark)
from pytest_neoxmii.session import SESSION_KEY, NeoxSession, get_session, marked_engines
from pytest_neoxmii.versions import shown_versions

MARKERS = (
    "gpu: needs a CUDA GPU; skips with what was found otherwise",
    "a100_40g: needs a CUDA GPU with at least 40 GB of memory; skips with what was found otherwise",
    "multi_gpu(n=2): needs at least n CUDA GPUs; skips with what was found otherwise",
    "neox_latency(threshold=0.10): this test's latency regression threshold (fraction of the median), "
    "instead of --neox-latency-threshold",
    "neox_alone: the test needs the machine to itself (timing, device-wide memory readings): it runs after "
    "the session's other tests, while the engines' workers finish loading and working ahead beside those",
    "neox_last: the test closes a deployment the session shares (teardown checks): it runs after every other "
    "test, the neox_alone ones included",
    "neox_engines(*names): the engines this test deploys, none for the HF reference alone (e.g. "
    "neox_engines('ds')): the session starts workers only for the engines its selected tests deploy, and a "
    "test that names no engine by a parameter or a deployment fixture, and has no such marker, may deploy any",
    "neox_scores(*families): the test asks its engine (neox_backend_name or neox_each_backend) for the "
    "teacher-forced scores of the cases of these families without a case parameter (e.g. neox_scores('fixed-text')"
    " for a perplexity): the engine's worker computes them ahead, as it does a parametrized case's",
    "neox_rows_alone: the test generates each row of its padded generation case alone on the fp32 reference "
    "(NeoxSession.rows_alone): the session computes those rows while the engines' workers load",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    options_mod.add_options(parser)


# How many teardowns of this process had left something behind when the session began: its summary names only
# its own (a process that runs pytest twice, as pytester and IDEs do, saw the first session's leaks again).
LEAKS_BEFORE_KEY = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    processes = sys.modules.get("pytest_neoxmii.deploy.processes")
    config.stash[LEAKS_BEFORE_KEY] = len(processes.leaks()) if processes is not None else 0
    register_neox_benchmark(config)
    try:
        opts = options_mod.NeoxOptions.from_config(config)
        model = None
        if opts.model:
            from pytest_neoxmii.weights import resolve
            model = resolve(opts.model, opts.weights, opts.revision, opts.seed, opts.cache_dir)
        session = NeoxSession(opts, model)
        if model is not None:
            from pytest_neoxmii import kernels
            if not os.environ.get(kernels.ENV):     # the default lasts as long as this session (pytester)
                config.add_cleanup(lambda: os.environ.pop(kernels.ENV, None))
            session.kernels = kernels.prepare(session.device)   # before anything deploys or imports deepspeed
            session.gpu_memory_in_use       # read now: later, the session's own workers hold memory too
        if opts.gpu_memory_cap is not None:
            from pytest_neoxmii.deploy import gpu_cap       # every worker inherits it from the environment
            environment = pytest.MonkeyPatch()              # undone when the session ends (pytester runs)
            environment.setenv(gpu_cap.ENV, str(opts.gpu_memory_cap))
            config.add_cleanup(environment.undo)
        session.load_serving_configs()
        session.load_prompts()
        _check_cases(session)
        _check_top_k(session)
        # a malformed NEOXMII_PLANT_FAULT, or a layer the model lacks, is refused before anything runs
        planted_fault.planted(model.spec.num_hidden_layers if model is not None else None)
    except (NeoxUsageError, planted_fault.FaultSpecError) as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION_KEY] = session


def _check_cases(session: NeoxSession) -> None:
    """Every planned case must fit the model's context. Checked here, at configure time, so that bad
    input (--neox-max-new-tokens too large for the context) is a one-line usage error: raised later, from
    pytest_generate_tests, pytest reports it as a collection error with a traceback."""
    if session.model is None:
        return
    from pytest_neoxmii.cases import check_fits_context
    for plan in session.plans():
        check_fits_context(plan, session.model.spec.max_position_embeddings)


def _check_top_k(session: NeoxSession) -> None:
    """--neox-top-k must fit the model's vocabulary: more than it was a RuntimeError from torch.topk in every
    engine's first generate, which also reported each deployment as crashed."""
    if session.model is None:
        return
    vocab = session.model.spec.vocab_size
    if session.options.top_k > vocab:
        raise NeoxUsageError(f"--neox-top-k={session.options.top_k} is more than the model's vocabulary of "
                             f"{vocab} tokens")


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = get_session(config)
    o = session.options
    if session.model is None:
        return ["neoxmii: no --neox-model given; the acceptance tests will skip"]
    lines = [
        f"neoxmii: model {session.model.spec.name}: {session.model.describe()}",
        f"neoxmii: weights source {session.model.source} ({session.model.weights_key}), "
        f"dtype {session.dtype_choice.describe()}, "
        f"tp {o.tp}, backends {','.join(o.backends)}",
        *(f"neoxmii: backend {name}: {engines.engine(name).description}" for name in o.backends),
        f"neoxmii: GPUs found: {session.hardware.describe()}",
        "neoxmii: " + ", ".join(f"{k} {v}" for k, v in shown_versions().items()),
    ]
    in_use = hardware.describe_in_use(session.hardware.gpus, session.gpu_memory_in_use)
    if in_use:
        lines.insert(-1, f"neoxmii: GPU memory in use: {in_use}; every fit counts only the rest")
    lines += [f"neoxmii: {config.describe()}" for config in session.serving_configs.values()]
    if session.kernels is not None:
        lines.append(f"neoxmii: {session.kernels.describe()}")
    heap = cpu_heap.describe(session.device)
    if heap:
        lines.append(f"neoxmii: {heap}")
    if o.gpu_memory_cap is not None:
        lines.append(f"neoxmii: GPU memory cap {o.gpu_memory_cap / 2**30:.2f} GiB per worker and GPU "
                     "(--neox-gpu-memory-cap): what fits is judged against the cap, not the card")
    fault = planted_fault.planted()
    if fault:
        lines.append(f"neoxmii: PLANTED FAULT ({planted_fault.PLANT_FAULT_ENV}): {fault}; "
                     "these results prove the judges, they say nothing of the stack")
    return lines


def _multi_gpu_count(item: pytest.Item) -> int | None:
    """n of the item's multi_gpu(n) marker (None without one); a bad n is a usage error on every machine."""
    marker = item.get_closest_marker("multi_gpu")
    if marker is None:
        return None
    n = marker.args[0] if marker.args else marker.kwargs.get("n", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise pytest.UsageError(f"{item.nodeid}: multi_gpu(n) needs an integer n >= 2, got {n!r}")
    return n


def _marker_skip_reason(item: pytest.Item, hw) -> str | None:
    n = _multi_gpu_count(item)   # validated before any other marker can decide the skip
    if item.get_closest_marker("gpu"):
        reason = hw.need_gpu()
        if reason:
            return reason
    if item.get_closest_marker("a100_40g"):
        from pytest_neoxmii.hardware import A100_40G_BYTES
        reason = hw.need_memory(A100_40G_BYTES, "a100_40g")
        if reason:
            return reason
    if n is not None:
        reason = hw.need_gpus(n)
        if reason:
            return reason
    return None


def run_order(items: list, ready: dict[str, int], by_engine: bool = False) -> list:
    """The order the session runs the selected tests in (stable: collection order otherwise).

    A neox_alone test waits for every worker to finish loading and working ahead (NeoxSession.settle):
    run first, it would leave the test process idle meanwhile, instead of judging what is ready. A
    neox_last test closes a deployment that the tests before it share: nothing may need it afterwards.
    Working ahead (`ready`: NeoxSession.expected_ready_order), the other tests of an engine whose results
    come first run first: the reference's own while every worker loads, an engine that still waits for
    its kernel build last (on a warm start, the engine that streams its weights), so that a test waiting
    for one engine no longer holds up the judging of another's finished results. A test of no engine may
    look at what the tests before it did: it stays after every engine test collected before it.

    `by_engine`, where the engines take turns on the GPU (NeoxSession.engines_take_turns): every test of an
    engine runs in one block, its timed and closing tests last in it, so that each engine deploys once. Run
    apart, each engine's timing deployed it again after another's turn (one H200 with 5.0 GiB free beside
    another job, pythia-160m: 8 deployments in 7 turns, 97.6 s of model load in a 172.4 s session). The
    reference's timed tests run after every block: settle waits for a cold start's kernel build first. The
    tests of the reference alone (neox_engines()) run in its block, before any engine deploys."""
    def rank(item) -> int:
        return 2 if item.get_closest_marker("neox_last") else 1 if item.get_closest_marker("neox_alone") else 0
    keys, latest = [], 0
    after_every_block = len(ready) + 1
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        marked = _marked(item)
        # the engine fixtures' parameter, else any parameter naming an engine (the suite's `name`), else the
        # one engine a neox_engines marker names
        engine = params.get("neox_backend_name") or params.get("neox_each_backend") or next(
            (v for v in params.values() if isinstance(v, str) and (v in ready or engines.is_reference(v))),
            next(iter(marked)) if marked and len(marked) == 1 else None)
        reference = engine is not None and engines.is_reference(engine)
        # neox_engines() without a name: the HF reference alone. Where the engines take turns it runs in the
        # reference's block, before the first engine deploys: later, reference first has released the HF
        # models for the engines, and those tests skipped (6 on one H200 with 5.0 GiB free, pythia-160m).
        if not ready or reference or (by_engine and marked == set()):
            place = after_every_block if by_engine and ready and rank(item) else 0
        elif engine in ready:
            place = ready[engine]
            latest = max(latest, place)
        else:
            place = latest
        keys.append((place, rank(item)) if by_engine else (rank(item), place if rank(item) == 0 else 0))
    order = sorted(range(len(items)), key=keys.__getitem__)
    return [items[i] for i in order]


def _marked(item) -> set[str] | None:
    """The engines the test's neox_engines marker names (session.marked_engines: an empty set is the HF reference
    alone), None without a well-formed marker: a bad one is the session's one-line usage error
    (NeoxSession._engines_asked), not the ordering's."""
    try:
        return marked_engines(item)
    except pytest.UsageError:
        return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    neox = config.stash.get(SESSION_KEY, None)
    by_engine = neox is not None and neox.engines_take_turns(items)
    items[:] = run_order(items, neox.expected_ready_order(by_engine) if neox is not None else {}, by_engine)
    gpu_markers = ("gpu", "a100_40g", "multi_gpu")
    marked = [it for it in items if any(it.get_closest_marker(m) for m in gpu_markers)]
    if not marked:
        return      # no GPU question asked: do not even import torch
    hw = get_session(config).hardware
    for item in marked:
        reason = _marker_skip_reason(item, hw)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_finish(session: pytest.Session) -> None:
    """The selected tests (after -k, -m and deselection) say what each engine will be asked for: its worker
    computes that right after its load (NeoxSession.want_outputs, worker.py)."""
    neox = session.config.stash.get(SESSION_KEY, None)
    if neox is not None:
        neox.want_outputs(session.items)
        if not session.config.option.collectonly:
            neox.start_kernel_build(session.items)  # a cold GPU session: the compiler starts right away


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    session = get_session(metafunc.config)
    try:
        plans = session.plans()
    except NeoxUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    # Without a model every parametrized test gets one placeholder that skips with the reason.
    if "neox_case_plan" in metafunc.fixturenames:
        metafunc.parametrize("neox_case_plan", plans or [None], ids=[p.id for p in plans] or ["no-model"],
                             scope="function")
    if "neox_generation_plan" in metafunc.fixturenames:
        gen = [p for p in plans if p.generate]
        metafunc.parametrize("neox_generation_plan", gen or [None], ids=[p.id for p in gen] or ["no-model"])
    if "neox_backend_name" in metafunc.fixturenames:
        names = [b for b in session.options.backends if not engines.is_reference(b)]
        # Only the hf reference selected: one placeholder that skips, rather than a test asking for backend None.
        others = [n for n in engines.names() if not engines.is_reference(n)]
        add = ", ".join(others[:-1]) + " or " + others[-1] if len(others) > 1 else "".join(others)
        none = pytest.param(None, id="no-backend", marks=pytest.mark.skip(
            reason=f"no backend to compare: --neox-backends selects only the {engines.reference_name()} "
                   f"reference (add {add})"))
        metafunc.parametrize("neox_backend_name", names or [none], ids=names or None)
    if "neox_each_backend" in metafunc.fixturenames:
        # The hf reference and every selected backend (latency, golden outputs): hf first, since the
        # DS/HF ratio is measured side by side in the same session.
        names = [engines.reference_name()] + [b for b in session.options.backends if not engines.is_reference(b)]
        metafunc.parametrize("neox_each_backend", names, ids=names)


_PACKAGE_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Each test's time outside the session's timed phases, for the report's overhead line (overhead.py)."""
    neox = item.config.stash.get(SESSION_KEY, None)
    if neox is None:
        return (yield)
    began, before = time.perf_counter(), dict(neox.timings)
    neox.extra.replace_once_broken()     # a deployment broken ahead gets its replacement loading meanwhile
    try:
        return (yield)
    finally:
        spent = {phase: seconds - before.get(phase, 0.0) for phase, seconds in neox.timings.items()}
        neox.overhead.test_ran(item.nodeid, began, time.perf_counter(), sum(spent.values()), spent)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """A skip raised inside the plugin (no model, backend unavailable, tp larger than the GPUs) is reported
    at the test, like a skip marker: otherwise `-rs` shows a line of the plugin's own source for it and
    folds every such skip of the session into one entry."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        path, _lineno, message = report.longrepr
        try:
            inside = Path(path).resolve().is_relative_to(_PACKAGE_DIR)
        except (OSError, ValueError):
            inside = False
        if inside:
            where, line = item.reportinfo()[:2]
            report.longrepr = (os.fspath(where), (line or 0) + 1, message)
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if "pytest_neoxmii.deploy.processes" in sys.modules:   # a deployment ran this session
        from pytest_neoxmii.deploy.processes import leak_summary_lines
        for line in leak_summary_lines(since=config.stash.get(LEAKS_BEFORE_KEY, 0)):
            terminalreporter.write_line(line, red=True)
    if session is None or session.model is None:
        return
    from pytest_neoxmii.report import terminal_summary
    terminal_summary(terminalreporter, session)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """pytest-benchmark's machine_info gains the GPUs (name, count, memory), driver and CUDA versions and
    the versions of torch, transformers, deepspeed and deepspeed-mii."""
    session = config.stash.get(SESSION_KEY, None)
    info = hardware.machine_info(session.hardware if session is not None else hardware.detect())
    for k in ("gpu_name", "gpu_count", "gpu_memory_bytes", "gpus", "cuda_version", "driver_version"):
        machine_info[k] = info[k]
    machine_info["versions"] = shown_versions()


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()
        if session.model is not None:       # torch and transformers were loaded: skip walking them at exit
            interpreter_exit.prepare()
