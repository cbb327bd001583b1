"""Session state: the options, the model under test, the GPUs found, the backends loaded so far (each
once per session), the reference outputs (computed once per case) and what the report will show."""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from pytest_neoxmii import ahead_share, checkpoint_files, hardware, known_issues, precision, reference_first
from pytest_neoxmii import backends as engines
from pytest_neoxmii.backends import Backend, IsolatedEngine, LoadRequest, load_backend
from pytest_neoxmii.deploy import cpu_heap, gpumem
from pytest_neoxmii.deploy.processes import DeploymentError
from pytest_neoxmii.cases import FAMILIES, Case, CasePlan, materialize, plan_cases, row_alone
from pytest_neoxmii.errors import BackendUnavailable, NeoxUsageError, first_line, in_brief
from pytest_neoxmii.extra_workers import ExtraWorkers
from pytest_neoxmii.injection import InjectionFailed
from pytest_neoxmii.options import NeoxOptions
from pytest_neoxmii.overhead import OverheadLog
from pytest_neoxmii.outputs import Generation, Scores
from pytest_neoxmii.registry import HOST_RUNTIME_BYTES, TEST_PROCESS_RUNTIME_BYTES, WORKER_RUNTIME_BYTES
from pytest_neoxmii.weights import ResolvedModel


@dataclass
class Record:
    """One result for the report: which check, which backend and case, the numbers, the verdict."""
    check: str           # "greedy", "teacher-forced", "latency", "golden", ...
    backend: str
    case: str
    passed: bool | None  # None: informational
    metrics: dict = field(default_factory=dict)
    summary: str = ""
    known_issue: str | None = None   # key of the known issue the test is strictly expected to fail with


def marked_engines(item) -> set[str] | None:
    """The engines a test's neox_engines(*names) marker says it deploys (an empty set: the HF reference
    alone), None without the marker. A name that is no engine is a usage error naming the test, as a bad
    multi_gpu(n) is: a typo would otherwise leave the engine it meant to start on demand, unsaid."""
    marker = item.get_closest_marker("neox_engines")
    if marker is None:
        return None
    unknown = [n for n in marker.args if not isinstance(n, str) or n not in engines.ENGINES]
    if unknown or marker.kwargs:
        got = ", ".join([repr(n) for n in unknown] + [f"{k}=..." for k in marker.kwargs])
        raise pytest.UsageError(f"{item.nodeid}: neox_engines(*names) takes engine names "
                                f"({', '.join(engines.ENGINES)}), got {got}")
    return set(marker.args)


def marked_score_families(item) -> tuple[str, ...]:
    """The case families a test's neox_scores(*families) marker says it scores without a case parameter (none
    without the marker). A family that does not exist is a usage error naming the test, as neox_engines' is."""
    marker = item.get_closest_marker("neox_scores")
    if marker is None:
        return ()
    unknown = [f for f in marker.args if not isinstance(f, str) or f not in FAMILIES]
    if unknown or marker.kwargs or not marker.args:
        got = ", ".join([repr(f) for f in unknown] + [f"{k}=..." for k in marker.kwargs]) or "nothing"
        raise pytest.UsageError(f"{item.nodeid}: neox_scores(*families) takes case families "
                                f"({', '.join(FAMILIES)}), got {got}")
    return tuple(marker.args)


def marked_rows_alone(item) -> bool:
    """The test carries neox_rows_alone, which takes no arguments: one given would be read as meaning
    something, so it is a usage error naming the test, as neox_scores' bad families are."""
    marker = item.get_closest_marker("neox_rows_alone")
    if marker is not None and (marker.args or marker.kwargs):
        got = ", ".join([repr(a) for a in marker.args] + [f"{k}=..." for k in marker.kwargs])
        raise pytest.UsageError(f"{item.nodeid}: neox_rows_alone takes no arguments (the test's own padded "
                                f"generation case is the one whose rows it generates alone), got {got}")
    return marker is not None


class NeoxSession:
    """One per pytest session (in config.stash, see get_session): the model under test and everything
    computed from it once."""

    def __init__(self, options: NeoxOptions, model: ResolvedModel | None):
        self.options = options
        self.model = model
        self.backends: dict[str, Backend] = {}
        self.infos: dict[str, object] = {}          # what each backend ran as, kept after teardown
        self.unavailable: dict[str, str] = {}
        self.known_blocked: dict[str, str] = {}     # backends not deployed: a known abort (xfail reason)
        self.crashed: dict[str, str] = {}           # deployments that died: every test needing one fails
        self.timings: dict[str, float] = {"kernel build": 0.0, "model load": 0.0, "model calls": 0.0}
        # (then "timed benchmark calls" once a latency test runs, and "model teardown" when the session ends)
        self.records: list[Record] = []
        self.latency: dict[tuple, object] = {}      # (backend, dtype, bench) -> latency.LatencyResult
        self.last_timed_at: float | None = None     # perf_counter when the last latency timing ended
        self._cache: dict[tuple, object] = {}
        self._tokenizer = None
        self._dtype_choice: precision.DtypeChoice | None = None   # kept after close(): the report shows it
        self.prompt_plans: list[CasePlan] = []      # users' own prompts (--neox-prompts), see load_prompts
        self.serving_configs: dict = {}             # engine -> serving_config.ServingConfig (--neox-*-config)
        self.kernels = None                         # kernels.KernelCache: where DeepSpeed's JIT ops are kept
        self.kernel_build = None                    # kernels.BackgroundBuild of a cold session (start_kernel_build)
        self.pending: dict[str, Backend] = {}       # workers launched up front, loading (see prelaunch)
        self.prelaunched: list[str] = []            # what prelaunch started, for the header and the report
        self.engines_one_at_a_time: str | None = None   # why prelaunch started none: they would not fit at once
        self.hf_precomputed = False                 # the HF models took turns over every case (hf_one_at_a_time)
        self.ended_early: list[str] = []            # deployments the teardown found ended on their own
        # Engines closed so that another fits the GPU (_take_turns), by key, with what was said of each turn.
        self.took_turns: dict[str, Backend] = {}
        self.turns: list[str] = []
        self.reference_ahead = 0                    # cases whose reference outputs prelaunch computed meanwhile
        self.reference_ahead_s = 0.0                # and how long that took (the reference's load included)
        # What the selected tests will ask each engine for, in test order (want_outputs): a prelaunched
        # worker computes it right after its load, side by side with the other engines (worker.py).
        self.wanted: dict[str, list[tuple[str, CasePlan]]] = {}
        self.rows_alone_plans: list[CasePlan] = []      # padded cases whose rows a test generates alone
        self.selected_plans: list[CasePlan] | None = None   # the cases the selected tests are parametrized by
        self.engines_asked: set[str] | None = None      # what the selected tests deploy (None: any engine)
        self.ahead_reports: dict[str, dict] = {}    # engine -> what its worker computed ahead, for the report
        # Replacements of deployments a known defect broke, and helpers sharing an engine's calls ahead.
        self.extra = ExtraWorkers(self)
        # Engines whose kernel injection matched nothing: every test needing one fails with that error (a
        # deployment that died is in `crashed`). Neither is deployed again.
        self.injection_failures: dict[str, Exception] = {}
        self.reference_releases: list[str] = []    # one line per release of the HF reference, for the report
        # Set when the HF models were released so that an engine fits beside them: reloading them for
        # something uncached (per-layer traces) would not fit either (measured: gpt-neox-20b, 2 x H200).
        self.reference_released_for_memory: str | None = None
        self._phases: list[str] = []                # the timed() blocks open now, innermost last
        self.started = time.perf_counter()
        self.overhead = OverheadLog(self.started)   # where "other" goes (plugin.pytest_runtest_protocol)

    # -- what is tested -------------------------------------------------------------------------------
    @functools.cached_property
    def stored_dtype(self) -> str | None:
        """The dtype the checkpoint's weights are stored in (checkpoint_files.stored_dtype), None if unknown."""
        return checkpoint_files.stored_dtype(self.model.path) if self.model and self.model.path else None

    @property
    def hardware(self) -> hardware.Hardware:
        return hardware.detect()

    @property
    def device(self) -> str:
        return "cuda:0" if self.hardware.gpus else "cpu"

    @functools.cached_property
    def gpu_memory_in_use(self) -> dict[int, int]:
        """{GPU index: bytes} that processes outside the session held when first asked: at configure, before
        anything deploys (gpumem.in_use_by_others). On a GPU shared with another job, the fits count only
        the rest: counted against the whole card, they would start every engine beside the reference and the
        job's memory, and the loads would run out of memory mid-session."""
        return gpumem.in_use_by_others(self.hardware.gpus)

    def gpu_memory_free(self) -> list[int]:
        """Bytes per GPU that the session's fits count on: each card's memory less gpu_memory_in_use."""
        return [g.total_memory - self.gpu_memory_in_use.get(g.index, 0) for g in self.hardware.gpus]

    def gpu_memory_in_use_note(self) -> str:
        """'' or ' (GPU 0: 61.2 GB of its 150.1 GB held by other processes ...)' for a fit's reason."""
        said = hardware.describe_in_use(self.hardware.gpus, self.gpu_memory_in_use)
        return f" ({said})" if said else ""

    @property
    def dtype_choice(self) -> precision.DtypeChoice:
        """The dtype every backend runs, the HF peer included, and why (asked once per session)."""
        if self._dtype_choice is None:
            o = self.options
            self._dtype_choice = precision.choose(o.dtype, on_cuda=bool(self.hardware.gpus), backends=o.backends,
                                                  cache_dir=o.cache_dir)
        return self._dtype_choice

    @property
    def dtype(self) -> str:
        return self.dtype_choice.dtype

    def require_model(self) -> ResolvedModel:
        if self.model is None:
            pytest.skip("no --neox-model given: pass e.g. --neox-model=pythia-160m (add "
                        "--neox-weights=synthetic where the model hub cannot be reached)")
        if self.model.path is None:
            from pytest_neoxmii.weights import materialize as build
            failed = None
            try:
                with self.timed("model load"):
                    self.model = build(self.model, self.options.cache_dir)
            except OSError as exc:     # (a session fixture's error is each later test's: it is said once here)
                failed = (f"the synthetic weights could not be built under --neox-cache-dir "
                          f"{self.options.cache_dir}: {in_brief(exc)}")
            if failed is not None:     # failed outside the handler: pytest shows no exception chain
                pytest.fail(failed, pytrace=False)
        return self.model

    def plans(self) -> list[CasePlan]:
        if self.model is None:
            return []
        o = self.options
        return plan_cases(self.model.spec.max_position_embeddings, o.max_new_tokens, o.cases) + self.prompt_plans

    def load_serving_configs(self) -> None:
        """Read and check --neox-ds-config / --neox-mii-config once, at configure time (bad files are usage
        errors naming the file and the key)."""
        if self.model is None:           # nothing will be deployed: the acceptance tests skip
            return
        from pytest_neoxmii import serving_config
        for engine, path in (("ds", self.options.ds_config), ("mii", self.options.mii_config)):
            if path is not None:
                self.serving_configs[engine] = serving_config.load(engine, path, dtype=self.dtype,
                                                                   tp=self.options.tp,
                                                                   cache_dir=self.options.cache_dir)

    def load_prompts(self) -> None:
        """Turn --neox-prompts into cases, once, at configure time (bad lines are usage errors). Text prompts
        need the model's tokenizer, so the model directory is made ready here (synthetic weights built)."""
        path = self.options.prompts
        if path is None or self.model is None:
            return
        from pytest_neoxmii.prompts import prompt_plans, read_prompt_file
        lines = read_prompt_file(path)
        tokenizer = None
        if any(entry.text is not None for entry in lines):
            self.require_model()
            tokenizer = self.tokenizer
        spec = self.model.spec
        self.prompt_plans = prompt_plans(lines, path, tokenizer=tokenizer,
                                         context_length=spec.max_position_embeddings,
                                         vocab_size=spec.vocab_size, default_max_new_tokens=self.options.max_new_tokens)

    @property
    def tokenizer(self):
        """The model's own tokenizer, loaded once. Loading it is part of loading the model, as the weights
        are, and so is the import of transformers that the first load pays for (on one H200 this was 3.7 s
        of a warm session, inside its first test, counted as plugin overhead until it was timed here)."""
        if self._tokenizer is None:
            model = self.require_model()
            with self.timed("model load"):
                from transformers import AutoTokenizer
                self._tokenizer = AutoTokenizer.from_pretrained(str(model.path))
        return self._tokenizer

    def case(self, plan: CasePlan) -> Case:
        key = ("case", plan.id)
        if key not in self._cache:
            try:
                self._cache[key] = materialize(plan, self.tokenizer, self.model.spec.max_position_embeddings,
                                               self.options.seed)
            except NeoxUsageError as exc:
                pytest.fail(str(exc), pytrace=False)
        return self._cache[key]

    @property
    def max_tokens(self) -> int:
        """DeepSpeed's workspace size: the longest case's prompt plus output, rounded up to 64."""
        longest = max((p.total_tokens for p in self.plans()), default=1024)
        return -(-longest // 64) * 64

    @property
    def max_batch(self) -> int:
        """The largest batch of the case set: DeepSpeed's workspace must be sized for it up front."""
        return max((len(p.lengths) for p in self.plans()), default=1)

    # -- backends -------------------------------------------------------------------------------------
    @contextmanager
    def timed(self, phase: str):
        """Add the block's wall time to `phase`. Nested blocks (a released reference reloaded inside a model
        call) count once: in the inner phase, taken out of the enclosing one."""
        t0 = time.perf_counter()
        self._phases.append(phase)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self._phases.pop()
            self.timings[phase] = self.timings.get(phase, 0.0) + elapsed
            if self._phases:
                outer = self._phases[-1]
                self.timings[outer] = self.timings.get(outer, 0.0) - elapsed

    def backend(self, name: str, dtype: str | None = None) -> Backend:
        """The loaded backend (loaded on first use, kept for the session). Skips the calling test with the
        reason when the backend cannot run here; the same reason is reused without retrying."""
        dtype = dtype or self.dtype
        key = f"{name}:{dtype}"
        if key in self.backends:
            return self.backends[key]
        if key in self.unavailable:
            pytest.skip(self.unavailable[key])
        if key in self.known_blocked:
            pytest.xfail(self.known_blocked[key])
        if key in self.crashed:
            pytest.fail(self.crashed[key], pytrace=False)
        if key in self.injection_failures:
            raise self.injection_failures[key]
        reference = engines.is_reference(name)
        if not reference and name not in self.options.backends:
            pytest.skip(f"backend {name} not selected (--neox-backends={','.join(self.options.backends)})")
        known = self._cannot_deploy(name, dtype)
        if known is not None:
            outcome, reason = known
            if outcome == "xfail":
                self.known_blocked[key] = reason
                pytest.xfail(reason)
            self.unavailable[key] = reason
            pytest.skip(reason)
        failed = None
        try:
            self.require_model()
            if not reference:
                self._reference_first(name, dtype)
                self._take_turns(name, dtype)
            t0 = time.perf_counter()
            if key in self.pending:              # launched by prelaunch: it has been loading meanwhile
                with self.timed("model load"):
                    backend = self.pending.pop(key).wait_ready()
            elif reference:
                backend = self._load_hf_model(name, dtype)
            else:
                backend = self.load(name, dtype)
            waited = time.perf_counter() - t0
            if reference and self.options.reference_first != "never":
                backend = reference_first.ReferenceHandle(backend, lambda: self._load_hf_model(name, dtype))
        except BackendUnavailable as exc:
            self.unavailable[key] = f"{name} ({dtype}): {exc}"
            pytest.skip(self.unavailable[key])
        except DeploymentError as exc:          # died while loading: a result, and not retried
            failed = f"{name} ({dtype}) failed to deploy: {exc}"
        except InjectionFailed as exc:          # a failure of every test needing it, and not retried
            self.injection_failures[key] = exc
            raise
        if failed is not None:                  # failed here, outside the handler: pytest shows no exception chain
            self._crash(key, failed)
        # The worker built DeepSpeed's op before loading: that part of the wait was the kernel build (a
        # prelaunched worker built it while the session waited for something else, or not at all).
        built = min(getattr(backend, "kernel_build_s", None) or 0.0, waited)
        self.timings["model load"] -= built
        self.timings["kernel build"] += built
        self.backends[key] = backend
        self.infos[key] = backend.info
        if reference and self.hf_one_at_a_time and not self.hf_precomputed:
            # The HF models take turns: every case's outputs now, one model after the other, instead of a
            # reload at every turn of the tests that ask both.
            self.hf_precomputed = True
            computed, stopped = self.precompute_reference(self.selected_plans)
            self.reference_releases.append(
                f"{self.hf_one_at_a_time}: {computed} cases precomputed, one model after the other"
                + (f"; precompute stopped: {stopped}" if stopped else ""))
        return backend

    @functools.cached_property
    def hf_one_at_a_time(self) -> str | None:
        """Why the HF reference and its peer are loaded one at a time, or None: in a CPU session whose host
        memory does not hold the two together, when the session keeps them releasable (reference first)."""
        if self.device != "cpu" or self.dtype == "fp32" or self.options.reference_first == "never":
            return None
        alone = self.host_fit([])
        return None if alone.fits else f"{engines.reference_name()} models one at a time (needed {alone.arithmetic})"

    def _load_hf_model(self, name: str, dtype: str) -> Backend:
        """Load an HF model (the reference or its peer), after releasing the other where the two do not fit
        the host together (hf_one_at_a_time)."""
        if self.hf_one_at_a_time:
            self._release_hf_models(keep=f"{name}:{dtype}")
        return self.load(name, dtype)

    def _release_hf_models(self, keep: str | None = None) -> list[str]:
        """Release every loaded HF model but `keep` (reference first's handles), and give the heap's freed
        pages back (a CPU session keeps them otherwise: deploy/cpu_heap.py). Returns the released dtypes."""
        released = [key.split(":", 1)[1] for key, backend in self.backends.items()
                    if key != keep and isinstance(backend, reference_first.ReferenceHandle) and backend.release()]
        if released:
            cpu_heap.give_back_freed_memory()     # nothing where freed memory is not kept (a GPU session)
        return released

    def _cannot_deploy(self, name: str, dtype: str) -> tuple[str, str] | None:
        """What is known before anything deploys, from the shape and the machine alone (backend() and
        prelaunch() both ask): ("xfail", reason) for a strict known issue, which would otherwise abort the
        whole session in a kernel; ("skip", reason) for an engine that cannot run here (a dtype the CPU
        lacks, a serving config asking for CUDA kernels on the CPU, weights that do not fit), said before
        minutes of building weights; None when it may deploy."""
        if self.model is not None and not engines.is_reference(name):
            blocked = known_issues.match_deployment(name, dtype, self.device, self.model.spec)
            if blocked is not None:
                return "xfail", blocked
        try:
            refusal = None
            if self.device == "cpu":     # a dtype this CPU lacks, or a serving config asking for CUDA kernels
                config = self.serving_configs.get(name)
                refusal = self.dtype_choice.refusal(name, dtype) or (config.cpu_refusal() if config else None)
            if refusal:
                raise BackendUnavailable(refusal)
            if self.model is not None:
                self._check_fits(name, dtype)
        except BackendUnavailable as exc:
            return "skip", f"{name} ({dtype}): {exc}"
        return None

    def _request(self, name: str, dtype: str) -> LoadRequest:
        """What the engine `name` is loaded with in this session (and what it is asked about beforehand)."""
        model = self.model
        return LoadRequest(path=model.path, dtype=dtype, device=self.device, tp=self._tp_of(name),
                           max_tokens=self.max_tokens, max_batch=self.max_batch, spec=model.spec,
                           zero_nvme=self.options.zero_nvme, engine_config=self._engine_config(name))

    def load(self, name: str, dtype: str, wait: bool = True, ahead: list[tuple[str, tuple]] = ()) -> Backend:
        """A new deployment of `name` (wait=False: launched, loading while the session goes on), timed as
        model load; not kept here: backend() keeps the session's own, ExtraWorkers its helpers and
        replacements."""
        with self.timed("model load"):
            return load_backend(name, self._request(name, dtype), wait=wait, ahead=ahead)

    # -- working ahead (worker.py) --------------------------------------------------------------------
    def want_outputs(self, items) -> None:
        """From the collected tests (after -k/-m selection): which engine outputs they will ask for, in
        their order. An engine test is parametrized by the engine (neox_backend_name, or neox_each_backend
        for the tests that include the reference) and by its case: neox_generation_plan for greedy
        outputs, neox_case_plan for teacher-forced scores; a test marked neox_scores(*families) asks for the
        scores of those families' cases too (the suite's golden perplexity: the fixed text). A test already
        marked to skip asks nothing."""
        wanted: dict[str, dict[tuple[str, str], tuple[str, CasePlan]]] = {}
        plans = self.plans()
        rows_alone: dict[str, CasePlan] = {}
        selected: set[str] = set()
        for item in items:
            families = marked_score_families(item)     # (checked on every test: a typo stops the run)
            params = getattr(getattr(item, "callspec", None), "params", {})
            if item.get_closest_marker("skip") is None:
                selected |= {p.id for p in (params.get("neox_generation_plan"), params.get("neox_case_plan"))
                             if isinstance(p, CasePlan)}
                selected |= {p.id for p in plans if p.family in families}
            plan = params.get("neox_generation_plan")
            if marked_rows_alone(item) and item.get_closest_marker("skip") is None \
                    and isinstance(plan, CasePlan) and plan.padded:
                rows_alone.setdefault(plan.id, plan)
            name = params.get("neox_backend_name") or params.get("neox_each_backend")
            if not name or engines.is_reference(name) or item.get_closest_marker("skip") is not None:
                continue
            for param, op in (("neox_generation_plan", "generate"), ("neox_case_plan", "score")):
                plan = params.get(param)
                if isinstance(plan, CasePlan):
                    wanted.setdefault(name, {}).setdefault((op, plan.id), (op, plan))
            for plan in (p for p in plans if p.family in families):
                wanted.setdefault(name, {}).setdefault(("score", plan.id), ("score", plan))
        self.wanted = {name: list(calls.values()) for name, calls in wanted.items()}
        self.selected_plans = [p for p in plans if p.id in selected]
        self.rows_alone_plans = list(rows_alone.values())
        self.engines_asked = self._engines_asked(items)

    def _engines_asked(self, items) -> set[str] | None:
        """The engines the selected tests will deploy, so that prelaunch starts no worker that no test uses
        (`-k reference`: on the 2-core CPU three workers importing DeepSpeed and loading beside the reference).
        A test names its engines by a parameter whose value is one (neox_backend_name, neox_each_backend,
        the suite's own `name`; tp_name at --neox-tp >= 2 only, else it skips) or by a deployment fixture
        (neox_ds, ...), or says them with the neox_engines marker (the suite's reference tests: none). A
        test that uses the session and names none may call neox.backend() with any name: then None, every
        selected engine."""
        selected = {n for n in self.options.backends if not engines.is_reference(n)}
        fixtures = {("neox_reference" if engines.is_reference(n) else f"neox_{n}"): n for n in engines.ENGINES}
        asked: set[str] = set()
        any_engine = False       # (the walk goes on: every test's neox_engines marker is checked)
        for item in items:
            used = set(getattr(item, "fixturenames", ()))
            if "neox" not in used or item.get_closest_marker("skip") is not None:
                continue
            marked = marked_engines(item)
            if marked is not None:              # said by the test: nothing else counts
                asked |= marked & selected
                continue
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "tp_name" in params:             # a tensor-parallel test
                asked |= {params["tp_name"]} & selected if self.options.tp >= 2 else set()
                continue
            # the reference or an engine not selected, named, asks no engine for anything (the latter skips)
            named = {v for v in params.values() if isinstance(v, str) and v in engines.ENGINES}
            named |= {fixtures[f] for f in used & fixtures.keys()}
            if not named:
                any_engine = True
            asked |= named & selected
        return None if any_engine else asked

    def _asked_for(self, name: str) -> bool:
        """A selected test may deploy `name` (_engines_asked): its worker prelaunches, its kernels build."""
        return self.engines_asked is None or name in self.engines_asked

    def start_kernel_build(self, items) -> None:
        """On a GPU whose kernel cache lacks an op that a selected engine injects: build it from now on, in a
        process of its own, while the model is built and the workers start (kernels.BackgroundBuild). Only
        where prelaunch will deploy such an engine (a selected test uses the session), and only once."""
        cache = self.kernels
        if cache is None or cache.device != "cuda" or self.kernel_build is not None or self.model is None:
            return
        missing = cache.missing
        if not missing or not any("neox" in getattr(item, "fixturenames", ()) for item in items):
            return
        dtype = self.dtype
        if any(not engines.is_reference(n) and self._asked_for(n) and self.injects_kernels(n)
               and self._cannot_deploy(n, dtype) is None for n in self.options.backends):
            from pytest_neoxmii.kernels import BackgroundBuild
            self.kernel_build = BackgroundBuild(missing)

    def expected_ready_order(self, by_engine: bool = False) -> dict[str, int]:
        """Where workers work ahead, or the engines take turns (`by_engine`): each selected engine's place in
        the order its results are expected to be ready (1 first; the reference and tests of no engine are 0,
        ready first). Last come the engines whose kernels are not built yet (a cold start: 39-50 s of
        compiling on one H200 before they load), and, among the others, an engine that streams its weights
        in (ZeRO: its calls took 13 s on two workers, ds's 1.8 s; pythia-160m synthetic, one H200). Empty
        otherwise (order unchanged)."""
        if self.model is None or not (by_engine or self._works_ahead()):
            return {}

        def expected(name: str) -> tuple[bool, bool]:
            return self._waits_for_kernel_build(name), not engines.engine(name).weights_on_gpu

        names = sorted((n for n in self.options.backends if not engines.is_reference(n) and n in engines.ENGINES),
                       key=expected)
        return {name: place for place, name in enumerate(names, 1)}

    def engines_take_turns(self, items) -> bool:
        """Whether the engines the selected tests deploy will take turns on the GPU: the footprint prelaunch
        checks, asked at collection, so that the tests run engine by engine (plugin.run_order)."""
        if self.model is None or not self.hardware.gpus:
            return False
        asked = self._engines_asked(items)
        names = [n for n in self.options.backends if not engines.is_reference(n) and n in engines.ENGINES
                 and (asked is None or n in asked)]
        return len(names) > 1 and not self.footprint_at_once(names, self.dtype).fits

    def _waits_for_kernel_build(self, name: str) -> bool:
        """The engine injects kernels here that the kernel cache lacks: it loads only once they are built."""
        cold = self.kernels is not None and bool(self.kernels.missing)
        return cold and self.injects_kernels(name)

    def _works_ahead(self) -> bool:
        return self.options.work_ahead in ("always", "auto")

    def _ahead_threads(self, computing: int) -> int | None:
        """torch's thread count in each worker while it works ahead: on the CPU, the cores torch would use in
        one process, shared among the `computing` workers and the test process, which work side by side; on a
        GPU, the worker's own. Each engine on all the cores at once, OpenMP's threads of four processes wait
        on each other: on a 2-core EPYC (pythia-70m, fp32) the model calls took 84.8 s so, against 61.5 s on one
        thread each and 80-98 s one engine after another (docs/SPEED.md, the thirtieth round)."""
        if self.device != "cpu":
            return None
        import torch
        return max(1, torch.get_num_threads() // (computing + 1))

    def _ahead_calls(self, name: str) -> tuple[list[tuple[str, CasePlan]], list[tuple[str, CasePlan]],
                                                known_issues.KnownIssue | None]:
        """The wanted calls of `name` by plan (no case is built: no tokenizer needed): those it can answer
        (scores only from an engine that can score a given text), then those a known defect breaks the
        engine with, which run after every other (see settle), and that defect's known issue."""
        if not self._works_ahead():
            return [], [], None
        cls = engines.engine(name).backend_for(self._tp_of(name))
        injected = self.injects_kernels(name)
        calls, breaking, issue = [], [], None
        for op, plan in self.wanted.get(name, ()):
            if op == "generate" or cls.can_score:
                breaks = known_issues.breaks_engine(op, name, plan, injected)
                (breaking if breaks is not None else calls).append((op, plan))
                issue = issue or breaks
        return calls, breaking, issue

    def _ahead_shares(self, calls, breaking, workers: int) -> list[list[tuple[str, tuple]]]:
        """The planned calls (_ahead_calls) exactly as generation() and scores() will make them (the worker
        matches them by op and arguments), dealt to `workers` workers (ahead_share.py): the engine's own
        deployment first, with the breaking calls last."""

        def made(planned):
            out = []
            for op, plan in planned:
                try:
                    out.append((op, self._call_args(op, self.case(plan))))
                except pytest.fail.Exception:      # a case that cannot be built: its own test says why
                    continue
            return out
        shares = ahead_share.split_calls(made(calls), workers)
        shares[0] += made(breaking)
        return shares

    def _ahead_workers(self, name: str, dtype: str, calls: int, beside: list[str]) -> int:
        """Workers for `name`'s calls ahead: what its engine asks for (Backend.ahead_workers), no more than
        there are calls, and only as many as the host's memory and the GPU (with the reference and the
        engines `beside`) take."""
        cls = engines.engine(name).backend_for(self._tp_of(name))
        workers = min(cls.ahead_workers(self._request(name, dtype)) if cls.isolated else 1, max(calls, 1))
        available = hardware.host_memory_available()
        while workers > 1 and not (
                ahead_share.host_memory_allows(workers, self.model.spec.weight_bytes(dtype), available)
                and self.fit_at_once([*beside, *[name] * (workers - 1)], dtype)):
            workers -= 1
        return workers

    def prelaunch(self) -> None:
        """Launch the worker of every selected isolated engine now, side by side, so that DeepSpeed's kernels
        build and the models load while the session does other work; backend() then waits for each. Only
        where the reference and all of them fit one GPU at once (in a CPU session: the host's memory);
        otherwise each deploys when a test first needs it. Anything that would skip or xfail an engine leaves
        it to backend()."""
        if self.model is None or self.model.path is None or self.options.reference_first == "always":
            return                  # (always: the reference's outputs come first, before any engine loads)
        dtype = self.dtype
        names = [n for n in self.options.backends if not engines.is_reference(n)
                 and engines.engine(n).backend_for(self._tp_of(n)).isolated and self._asked_for(n)]
        if not names:
            return
        at_once = self.footprint_at_once(names, dtype)
        if not at_once.fits:
            self.engines_one_at_a_time = ("engines deployed one at a time, when a test first needs each: "
                                          f"needed {at_once.arithmetic}")
            return
        # The workers start first, their calls ahead given once the cases are built (the tokenizer imports
        # transformers: 2.6 s on a 2-core CPU), which then happens while they start and import.
        launched: dict[str, tuple] = {}                     # key -> (calls, breaking calls, its workers)
        breaking: dict[str, known_issues.KnownIssue] = {}   # deployments that will run a breaking call ahead
        for name in names:
            key = f"{name}:{dtype}"
            if key in self.backends or key in self.pending:
                continue
            if self._cannot_deploy(name, dtype) is not None:
                continue            # backend() says why, at the first test that needs it
            calls, breaks, issue = self._ahead_calls(name)
            later = bool(calls or breaks)
            try:
                self.pending[key] = self.load(name, dtype, wait=False, ahead=None if later else ())
                self.prelaunched.append(name)
                if later:
                    workers = [self.pending[key]]
                    launched[key] = (calls, breaks, workers)
                    for _ in range(self._ahead_workers(name, dtype, len(calls), names) - 1):
                        helper = self.extra.launch_helper(key, None)
                        if helper is not None:
                            workers.append(helper)
                if issue is not None:
                    breaking[key] = issue
            except BackendUnavailable:
                continue            # refused before a process started: backend() skips with the reason
            except DeploymentError as exc:      # kept, as backend() keeps it: not retried by every test
                self.record_crash(key, f"{name} ({dtype}) failed to deploy: {exc}")
            except InjectionFailed as exc:
                self.injection_failures[key] = exc
        threads = self._ahead_threads(sum(len(workers) for _calls, _breaks, workers in launched.values()))
        for calls, breaks, workers in launched.values():
            shares = [[] for _ in workers]
            try:
                shares = self._ahead_shares(calls, breaks, len(workers))
            finally:                # every worker waits for its list: an empty one where the cases failed
                for worker, share in zip(workers, shares):
                    worker.give_ahead(share, threads)
        for key, issue in breaking.items():
            # Where the engine still waits for its kernel build, the breaking call would run after it: its
            # replacement then loads now, beside the others (after the helpers, so that its fit counts
            # them), and is ready with them (one H200, cold: the first timing waited 4 s for it otherwise).
            # Warm, it loads once the call has run, off the critical path: one more process starting with
            # the others delayed them all (ZeRO's calls ended 5 s later).
            self.extra.will_break_ahead(key, issue, replace_now=self._waits_for_kernel_build(key.split(":")[0]))
        if self.prelaunched and self._works_ahead():
            # The test process works ahead too: while the workers load (15-25 s warm on one H200, pythia-160m
            # synthetic), it computes the reference's side of every comparison the selected tests will ask
            # for, instead of waiting for the first worker with nothing to do.
            plans = {plan.id: plan for calls in self.wanted.values() for _op, plan in calls}
            began = time.perf_counter()
            try:
                with hardware.torch_threads(threads):    # its share of the cores, as each worker's (restored after)
                    self.reference_ahead, _ = self.precompute_reference(list(plans.values()),
                                                                        peer_generations=False)
            except Exception:           # the reference's own tests fail with it, each with its reason
                pass
            self.reference_ahead_s = time.perf_counter() - began

    def settle(self) -> None:
        """Wait for every prelaunched worker still loading or still computing ahead, so that no timing shares
        the machine with other work. What a deployment comes to (skip, xfail, crash) is recorded for the
        tests that need it, not raised. A deployment that ran a known defect measured to break it is closed
        here (the tests that judged its outputs ran before: neox_alone and neox_last tests settle first), and
        deploys again when next asked for."""
        if self.kernel_build is not None:
            with self.timed("kernel build"):      # (long over by now: the workers needed it)
                self.kernel_build.wait()
        self.extra.retire_all_broken()
        for key in list(self.pending):
            name, dtype = key.split(":", 1)
            try:
                self.backend(name, dtype)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:          # pytest's outcomes are BaseExceptions; backend() kept the reason
                continue
        for key, backend in list(self.backends.items()):
            if isinstance(backend, IsolatedEngine) and backend.ahead and key not in self.ahead_reports:
                try:
                    with self.timed("model calls"):
                        self.ahead_reports[key] = backend.wait_ahead()
                except DeploymentError as exc:     # kept for the tests that need it
                    self.record_crash(key, str(exc))
        # A deployment that ran a breaking call ahead is broken whether or not a test asked for the result
        # (the test may have been deselected after all, or stopped early): never timed, replaced.
        for key in self.extra.ran_breaking_ahead():
            self.extra.retire_broken(key)
            try:
                self.backend(*key.split(":", 1))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:              # backend() kept the reason for the tests that need it
                pass
        self.extra.retire_helpers()

    def fit_at_once(self, names: list[str], dtype: str) -> bool:
        return self.footprint_at_once(names, dtype).fits

    def footprint_at_once(self, names: list[str], dtype: str) -> reference_first.Footprint:
        """The fp32 reference, its peer and every engine, on the smallest GPU in use, or in a CPU session in
        the host's memory: reference first's arithmetic (reference_first.footprint, host_footprint)."""
        hw = self.hardware
        if not hw.gpus:
            return self.host_fit([(n, dtype) for n in names])
        # Every engine counts at its weights, ZeRO's too: it streams them in layer by layer, but torch's
        # allocator in its worker keeps what it fetched (measured: 23.6 GiB held after working ahead on
        # pythia-12b with synthetic weights, fp16 23.7 GB, one H200), and three engines beside the reference ran out of
        # memory there.
        return self._gpu_footprint([(n, dtype) for n in names], min(self.gpu_memory_free()))

    def host_fit(self, deployed: list[tuple[str, str]]) -> reference_first.Footprint:
        """In a CPU session: whether the HF models and the engines `deployed` ((name, dtype) pairs) fit the
        host's memory together (reference_first.host_footprint). Where the host's memory is unknown, they
        fit: nothing would be gained by serialising."""
        total = hardware.host_memory_total()
        if total is None:
            return reference_first.Footprint(True, "host memory unknown")
        in_host = []
        for name, dtype in deployed:
            cls = engines.engine(name).backend_for(self._tp_of(name))
            in_host.append(reference_first.EngineInHost(name, dtype, cls.shares_checkpoint_pages,
                                                        cls.isolated or cls.runs_in_worker, cls.can_score))
        reference = engines.reference_name()
        return reference_first.host_footprint(self.model.spec, reference, self.dtype,
                                              engines.engine(reference).shares_checkpoint_pages, in_host,
                                              self.stored_dtype, total, self.kept_scores())

    def _selected_plans(self):
        """The selected tests' cases (every case before collection)."""
        return self.plans() if self.selected_plans is None else self.selected_plans

    def kept_scores(self) -> tuple[int, int]:
        """reference_first.kept_scores_bytes of the selected tests' cases."""
        spec = self.model.spec
        return reference_first.kept_scores_bytes(self._selected_plans(), spec.vocab_size,
                                                 spec.max_position_embeddings)

    def _on_gpu(self, name: str, dtype: str) -> reference_first.EngineOnGpu:
        """The engine's share of one GPU, for reference first's arithmetic (the same memory model as
        _check_fits: weights / tp, workspace, worker runtime, scoring the longest case)."""
        tp = self._tp_of(name)
        return reference_first.EngineOnGpu(name, dtype, tp, self.workspace_bytes(name, dtype, tp),
                                           self.worker_runtime_bytes(name, tp), self.scoring_bytes(name, dtype))

    def _gpu_footprint(self, pairs, gpu_bytes: int, hf_loaded: bool = True) -> reference_first.Footprint:
        """The HF models (unless released) and the engines `pairs` ((name, dtype)) against `gpu_bytes`, with
        the test process's own runtime: reference first's arithmetic, one call for prelaunch, reference first
        and the engines' turns."""
        reference = engines.reference_name()
        # the fp32 reference and its peer score one after the other in this process: the larger counts
        hf_scoring = max(self.scoring_bytes(reference, d) for d in {"fp32", self.dtype})
        return reference_first.footprint(self.model.spec, reference, self.dtype,
                                         [self._on_gpu(n, d) for n, d in pairs], gpu_bytes, hf_loaded=hf_loaded,
                                         test_process_runtime=TEST_PROCESS_RUNTIME_BYTES, hf_scoring=hf_scoring)

    def _other_engines(self, key: str, pending: bool = True) -> list[str]:
        """The keys of the engines deployed (and, with `pending`, still loading) other than `key`."""
        keys = [*self.backends, *self.pending] if pending else list(self.backends)
        return [k for k in keys if k != key and not engines.is_reference(k.split(":", 1)[0])]

    # -- reference first (reference_first.py) ---------------------------------------------------------
    def _reference_first(self, name: str, dtype: str) -> None:
        """Called just before the engine `name` deploys: with --neox-reference-first=always, or auto when the
        HF models and the engines would not fit GPU 0 together (in a CPU session: the host's memory), compute
        the reference's outputs of every case the selected tests ask for and release the HF models."""
        mode = self.options.reference_first
        if mode == "never":
            return
        why = "--neox-reference-first=always"
        if mode == "auto":
            # the engines already deployed (or loading) count too (they may take turns afterwards)
            pairs = [(name, dtype), *(tuple(k.split(":", 1)) for k in self._other_engines(f"{name}:{dtype}"))]
            need = (self._gpu_footprint(pairs, self.gpu_memory_free()[0]) if self.hardware.gpus
                    else self.host_fit(pairs))
            if need.fits:
                return
            why = f"needed {need.arithmetic}"
        computed, stopped = self.precompute_reference(self.selected_plans)
        released = self._release_hf_models()
        if computed or released or stopped:
            line = (f"reference first: {computed} cases precomputed, "
                    f"{engines.reference_name()} {' + '.join(released) or 'nothing'} released before {name} "
                    f"({why})")
            self.reference_releases.append(line + (f"; precompute stopped: {stopped}" if stopped else ""))
            if mode == "auto" and released:
                self.reference_released_for_memory = line

    def _take_turns(self, name: str, dtype: str) -> None:
        """On a GPU that cannot hold the engine `name` beside the engines deployed, with the HF models as they are
        now (reference first has had its say): close those engines before it deploys. On a GPU the tests run
        engine by engine (plugin.run_order), so each closes once its own tests are done; one that a later test
        asks for again (its latency) deploys again. Without this, the engine loaded into memory the others
        held: on one H200 shared with another job, mii failed to load beside ds."""
        if not self.hardware.gpus or self.pending:      # prelaunched: everything fits at once
            return
        key = f"{name}:{dtype}"
        others = self._other_engines(key, pending=False)
        if not others:
            return
        hf_loaded = any(getattr(b, "loaded", True) for k, b in self.backends.items()
                        if engines.is_reference(k.split(":", 1)[0]))
        need = self._gpu_footprint([(name, dtype), *(tuple(k.split(":", 1)) for k in others)],
                                   self.gpu_memory_free()[0], hf_loaded=hf_loaded)
        if need.fits:
            return
        self.extra.retire_helpers()            # a ZeRO engine's helper workers hold GPU memory too
        for other in others:
            closed = self.backends[other]
            self.close_backend(*other.split(":", 1))
            self.took_turns[other] = closed
        self.turns.append(f"{', '.join(others)} closed before {key} deployed (needed {need.arithmetic})")

    def precompute_reference(self, plans: list[CasePlan] | None = None,
                             peer_generations: bool = True) -> tuple[int, str | None]:
        """The outputs of the fp32 reference and of its peer (generations of the generating cases, teacher-
        forced scores of every case), computed now for every planned case, or for `plans` (cached ones are not
        computed again). peer_generations=False leaves out the peer's generations, which no check compares
        (greedy parity and hf's golden outputs read the fp32 reference's; the peer's scores are the noise
        floor's): working ahead, where they would only delay the first test. Before the HF models are
        released (reference first) everything is computed, so that nothing reloads them, the fp32 reference's
        first (with the rows that selected tests generate alone, rows_alone), then its peer's. Returns (cases
        with something newly computed, why it stopped early or None)."""
        outcomes = (pytest.skip.Exception, pytest.fail.Exception, pytest.xfail.Exception)
        cases = []
        for plan in self.plans() if plans is None else plans:
            try:
                cases.append((plan, self.case(plan)))
            except outcomes:        # a bad case fails its own tests with the reason, later
                continue
        newly: set[str] = set()     # the cases with something newly computed
        # One model after the other, every case of each: where the two do not fit together they are then
        # loaded once each, not once per case (_load_hf_model).
        for model, is_reference in ((self.reference, True), (self.peer, False)):
            for plan, case in cases:
                before = len(self._cache)
                self.extra.replace_once_broken()
                try:
                    backend = model()
                    if plan.generate and (peer_generations or is_reference):
                        self.generation(backend, case)
                    self.scores(backend, case)
                except outcomes as exc:  # the reference cannot run: its own tests say why
                    return len(newly), first_line(exc)
                if len(self._cache) > before:
                    newly.add(plan.id)
            if not is_reference:
                continue
            # The rows of padded cases that a selected test generates alone (neox_rows_alone), after the
            # reference's cases: on one H200 warm they took 0.7 s after ZeRO's work ahead.
            for plan in self.rows_alone_plans:
                try:
                    case = self.case(plan)
                except outcomes:        # (as above: the case's own tests say why)
                    continue
                try:
                    self.rows_alone(self.reference(), case)
                except outcomes as exc:
                    return len(newly), first_line(exc)
        return len(newly), None

    def _engine_config(self, name: str) -> dict | None:
        config = self.serving_configs.get(name)
        return None if config is None else config.values

    def _tp_of(self, name: str) -> int:
        """--neox-tp applies to the tensor-parallel engines; the others always run at tp = 1."""
        return self.options.tp if engines.engine(name).tensor_parallel_capable else 1

    def injects_kernels(self, name: str) -> bool:
        """Whether DeepSpeed injects its inference kernels into the engine `name` here: on a GPU, for an engine
        that injects them, unless the user's serving config turns them off."""
        config = self.serving_configs.get(name)
        return (self.device.startswith("cuda") and engines.engine(name).injects_kernels
                and (config is None or config.injects is not False))

    def workspace_bytes(self, name: str, dtype: str | None = None, tp: int | None = None) -> int:
        """DeepSpeed's inference workspace per GPU for the engine `name` on this session's cases (0 for an
        engine that injects no kernels here), as the registry computes it."""
        if not self.injects_kernels(name):
            return 0
        dtype = dtype or self.dtype
        tp = self._tp_of(name) if tp is None else tp
        config = self._engine_config(name) or {}
        return self.model.spec.ds_workspace_bytes(dtype, tp, int(config.get("max_tokens", self.max_tokens)),
                                                  self.max_batch)

    def scoring_bytes(self, name: str, dtype: str | None = None) -> int:
        """What scoring the largest selected case holds on the GPU of the engine `name`
        (reference_first.scoring_bytes); 0 for an engine that does not score, and in a CPU session, whose host
        arithmetic counts the scores the test process keeps (kept_scores)."""
        if not self.device.startswith("cuda") or not engines.engine(name).backend_for(self._tp_of(name)).can_score:
            return 0
        spec = self.model.spec
        return reference_first.scoring_bytes(self._selected_plans(), spec.vocab_size,
                                             spec.max_position_embeddings, dtype or self.dtype)

    def worker_runtime_bytes(self, name: str, tp: int | None = None) -> int:
        """An engine process's own CUDA runtime per GPU (registry.WORKER_RUNTIME_BYTES), where the engine runs
        in worker processes on a GPU; 0 for a model in the test process."""
        tp = self._tp_of(name) if tp is None else tp
        cls = engines.engine(name).backend_for(tp)
        in_worker = cls.isolated or cls.runs_in_worker
        return WORKER_RUNTIME_BYTES if in_worker and self.device.startswith("cuda") else 0

    def _check_fits(self, name: str, dtype: str) -> None:
        hw = self.hardware
        tp = self._tp_of(name)
        if tp > 1 and hw.count < tp:
            raise BackendUnavailable(f"--neox-tp={tp} needs {tp} GPUs, found {hw.count}")
        if not hw.gpus:
            self._check_host_memory(name, dtype)
            return
        uneven = self.model.spec.uneven_heads(tp) if self.injects_kernels(name) else None
        if uneven:
            raise BackendUnavailable(uneven)
        if not engines.engine(name).weights_on_gpu:     # e.g. ZeRO-Inference: CPU/NVMe memory by design
            return
        cls = engines.engine(name).backend_for(tp)
        # a worker may use no more of a GPU than the cap; the reference in this process is not capped
        cap = self.options.gpu_memory_cap if (cls.isolated or cls.runs_in_worker) else None
        memory = [free if cap is None else min(free, cap) for free in self.gpu_memory_free()]
        ok, reason = self.model.spec.fits(dtype, tp, memory, self.workspace_bytes(name, dtype, tp),
                                          self.worker_runtime_bytes(name, tp), self.scoring_bytes(name, dtype))
        if not ok:
            if cap is not None:
                reason += f" (GPU memory capped at {cap / 2**30:.2f} GiB per worker by --neox-gpu-memory-cap)"
            raise BackendUnavailable(reason + self.gpu_memory_in_use_note())

    def _check_host_memory(self, name: str, dtype: str) -> None:
        """On the CPU every model's weights are in host memory: weights larger than the machine's memory
        could only end in the kernel's OOM killer taking the test process or a worker mid-session. So could
        the teacher-forced scores of it that the test process keeps (kept_scores), with that process's own
        runtime. A bound from what is sure to be held: the activations come on top, and the pages of a file
        loaded as it is stored are shared by the processes that map it."""
        total = hardware.host_memory_total()
        weights = self.model.spec.weight_bytes(dtype)
        kept, in_making = self.kept_scores() if engines.engine(name).can_score else (0, 0)
        scores = kept + in_making
        need = weights + (scores + HOST_RUNTIME_BYTES if scores else 0)    # the process that keeps them, too
        if total is None or need <= total:
            return
        if not scores:
            raise BackendUnavailable(f"its weights need {weights / 1e9:.2f} GB of host memory in {dtype}, more "
                                     f"than this machine's {total / 1e9:.2f} GB")
        raise BackendUnavailable(f"its weights ({weights / 1e9:.2f} GB in {dtype}), its teacher-forced scores of the "
                                 f"selected cases ({scores / 1e9:.3g} GB, the largest case's twice while it is "
                                 f"computed) and a process's runtime ({HOST_RUNTIME_BYTES / 1e9:.2f} GB) need "
                                 f"{need / 1e9:.2f} GB of host memory, more than this machine's {total / 1e9:.2f} GB")

    def _crash(self, key: str, message: str):
        """A deployment died: remember why (every later test needing it fails at once with it), release
        what is left of it, and fail the calling test."""
        self.record_crash(key, message)
        pytest.fail(self.crashed[key], pytrace=False)

    def record_crash(self, key: str, message: str) -> None:
        """_crash without failing the caller (prelaunch and settle, which no test's outcome hangs on)."""
        self.crashed[key] = message
        backend = self.backends.pop(key, None)
        if backend is not None:
            try:
                backend.close()
            except Exception as exc:    # the reason stays the crash; the teardown problem is added to it
                self.crashed[key] = f"{message}\n(teardown after the crash failed: {exc})"

    def _key_of(self, backend: Backend) -> str:
        return next((k for k, b in self.backends.items() if b is backend),
                    f"{backend.info.backend}:{backend.info.dtype}")

    def reference(self) -> Backend:
        """The ground truth: HF transformers in fp32 on the same device."""
        return self.backend(engines.reference_name(), "fp32")

    def peer(self) -> Backend:
        """The HF reference at the session's dtype: its distance to fp32 is the noise floor."""
        return self.backend(engines.reference_name(), self.dtype)

    # -- cached model calls ---------------------------------------------------------------------------
    def generation(self, backend: Backend, case: Case) -> Generation:
        return self._model_call("generate", backend, case)

    def rows_alone(self, backend: Backend, case: Case) -> list[Generation]:
        """`backend`'s greedy generation of each row of `case` on its own, each a session call cached as any
        other: what a left-padded batch is compared with, computed ahead on the reference for the selected
        tests marked neox_rows_alone (precompute_reference)."""
        return [self.generation(backend, row_alone(case, i)) for i in range(case.batch.batch_size)]

    def scores(self, backend: Backend, case: Case) -> Scores:
        return self._model_call("score", backend, case)

    def _model_call(self, op: str, backend: Backend, case: Case):
        """backend.generate or backend.score on `case`, once per session (cached by backend, dtype and case).
        A refusal skips the test (e.g. MII's gRPC server returns text only), a dead deployment fails it and
        every later test needing it, a model out of GPU memory fails it in one line."""
        key = (op, backend.info.backend, backend.info.dtype, case.id)
        if key not in self._cache:
            call = (op, self._call_args(op, case))
            backend = self.extra.unbroken(self._key_of(backend), backend, call)
            issue = known_issues.breaks_engine(op, backend.info.backend, case.plan,
                                               backend.info.kernels.startswith("injected"))
            breaks = issue is not None and isinstance(backend, IsolatedEngine)
            deployment = self._key_of(backend)
            try:
                computes = self.extra.sharer_of(deployment, backend, call)
                with self.timed("model calls"):
                    self._cache[key] = getattr(computes, op)(*call[1])
                    self._give_back_gpu_cache(computes)
                self.extra.took(deployment, computes, call)
                if breaks:
                    self.extra.mark_broken(deployment, issue)
            except BackendUnavailable as exc:
                pytest.skip(f"{backend.info.backend}: {exc}")
            except DeploymentError as exc:
                if breaks:
                    # The known defect broke the deployment in this very call (CUDA reports an illegal
                    # memory access at a later sync, so which call hit it is not always told apart): this
                    # test fails with it, as its known issue expects, and the engine deploys again for the
                    # others instead of failing them all as crashed.
                    self.extra.mark_broken(deployment, issue)
                    pytest.fail(f"{backend.info.backend}: known issue [{issue.key}] broke the deployment in "
                                f"this call ({issue.breaks_engine}); the engine deploys again for later "
                                f"calls. The deployment said:\n{exc}", pytrace=False)
                self._crash(deployment, str(exc))
            except Exception as exc:
                self._fail_if_out_of_memory(backend, op, case, exc)
                raise
        return self._cache[key]

    def _give_back_gpu_cache(self, backend: Backend) -> None:
        """After a call of a model in this process, on a GPU that does not hold every engine at once (prelaunch
        declined): the blocks torch's caching allocator kept go back to the driver. No other process can use
        them, and the fits count the HF models at their weights x 1.2, with their scoring only while they are
        loaded (reference_first.footprint). On one H200 with 5.0 GiB free, the test
        process held 2.78 GiB (its runtime and pythia-160m's HF weights: 1.7 GiB) while ds ran out of memory
        scoring the 2016-token case."""
        if not self.engines_one_at_a_time or not self.device.startswith("cuda"):
            return
        if getattr(backend, "runs_in_worker", False) or getattr(backend, "isolated", False):
            return
        import torch
        torch.cuda.empty_cache()

    def _fail_if_out_of_memory(self, backend: Backend, op: str, case: Case, exc: Exception) -> None:
        """A model in this process out of GPU memory (torch.OutOfMemoryError, matched by name: nothing here
        imports torch) fails its test in one line naming the model, the call and what CUDA said, instead of
        a traceback through the session."""
        if type(exc).__name__ != "OutOfMemoryError":
            return
        from pytest_neoxmii.backends.worker_deployment import describe_request
        said = first_line(exc).split(". Including", 1)[0]
        pytest.fail(f"{backend.info.backend} ({backend.info.dtype}) ran out of GPU memory in "
                    f"{describe_request(op, self._call_args(op, case))} of case {case.id}: {said}", pytrace=False)

    def _call_args(self, op: str, case: Case) -> tuple:
        """The arguments of an engine's generate or score for `case`: one place, because a worker working
        ahead matches the session's later request by op and arguments."""
        if op == "generate":
            return case.batch, case.plan.max_new_tokens, self.options.top_k
        return (case.batch,)

    def memo(self, key: tuple, compute):
        """compute() once per session for `key`, then the same result (judging work several checks share)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def record(self, rec: Record) -> None:
        self.records.append(rec)

    def take_ahead_account(self, key: str, backend: Backend) -> None:
        """The worker's last account of its work ahead, for the summary; never waits for it."""
        if isinstance(backend, IsolatedEngine) and backend.ahead:
            try:
                self.ahead_reports[key] = backend.ahead_so_far()
            except Exception:
                pass

    def close(self) -> None:
        if self.kernel_build is not None:
            self.kernel_build.close(self.kernels.directory)
        for key, backend in self.backends.items():
            self.take_ahead_account(key, backend)
        self.backends.update(self.pending)      # launched but never needed: torn down all the same
        self.pending.clear()
        self.backends.update(self.extra.still_up())   # (settle retires them; a session cut short may not)
        self.close_all(self.backends)
        self._cache.clear()

    def ended_on_their_own(self) -> list[str]:
        """One line per deployment whose processes ended before the session asked them to (Backend.
        ended_on_its_own), the summary's: those the teardown found, then any still to be torn down."""
        return self.ended_early + self._newly_ended([*self.backends.values(), *self.pending.values()])

    def _newly_ended(self, deployments) -> list[str]:
        """The ended_on_its_own lines of `deployments` not noted yet."""
        lines = (backend.ended_on_its_own() for backend in deployments)
        return [line for line in lines if line and line not in self.ended_early]

    def close_all(self, deployments: dict[str, Backend]) -> None:
        """Tear down these deployments (by the name their teardown is reported under), taking each out of
        `deployments` as it closes: every worker winds down at once, then each is waited for; a close that
        fails is said and the others still close."""
        with self.timed("model teardown"):
            self.ended_early += self._newly_ended(deployments.values())    # before they are asked to exit
            for backend in deployments.values():
                try:
                    backend.ask_to_exit()
                except Exception:                   # close() below stops it in any case
                    pass
            for key in list(deployments):
                backend = deployments.pop(key)
                try:
                    backend.close()
                except Exception as exc:   # teardown goes on: the next backend must still be released
                    self.unavailable[key] = f"close failed: {exc}"

    @property
    def redeployed(self) -> list[str]:
        """One line per deployment a known defect broke and that was deployed again (the summary's)."""
        return self.extra.redeployed

    def close_backend(self, name: str, dtype: str | None = None) -> None:
        """Tear down one deployment now (a teardown test); a later test that needs it deploys it again."""
        key = f"{name}:{dtype or self.dtype}"
        backend = self.backends.pop(key, None)
        if backend is not None:
            self.take_ahead_account(key, backend)
            with self.timed("model teardown"):
                backend.close()


SESSION_KEY = pytest.StashKey[NeoxSession]()


def get_session(config: pytest.Config) -> NeoxSession:
    """The session plugin.pytest_configure stored for this pytest run."""
    return config.stash[SESSION_KEY]
