"""Every option of the plugin, in one place: each is a command-line flag and an ini option, and
NeoxOptions is the validated result the rest of the plugin reads."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_neoxmii import backends as engines
from pytest_neoxmii import reference_first
from pytest_neoxmii.errors import NeoxUsageError
from pytest_neoxmii.gpu_work import GPU_WORK_THRESHOLD

DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Option:
    name: str            # ini name; the flag is --name with '_' -> '-'
    help: str
    default: object
    kind: str = "string"  # "string", "int", "float", "bool"
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS = (
    Option("neox_model", "model to test: a registry name (pythia-160m, gpt-neox-20b, ...), a hub id, or a "
           "local model directory. Without it the acceptance tests skip.", None, metavar="NAME"),
    Option("neox_revision", "hub revision (branch, tag or commit) for --neox-weights=auto", "main",
           metavar="REV"),
    Option("neox_weights", "auto: local directory, hub cache or hub; synthetic: seeded random weights in the "
           "model's architecture (no hub needed)", "auto", metavar="auto|synthetic"),
    Option("neox_dtype", "dtype the backends run in: fp16, bf16 or fp32 (default: fp16; on a CPU whose "
           "DeepSpeed accelerator lacks fp16, bf16 where offered, else fp32)", None, metavar="DTYPE"),
    Option("neox_tp", "tensor-parallel degree of the "
           + " and ".join(n for n, e in engines.ENGINES.items() if e.tensor_parallel_capable) + " backends", 1,
           kind="int", metavar="N"),
    Option("neox_backends", "comma-separated backends to run: " + ", ".join(engines.names()),
           ",".join(engines.names()), metavar="LIST"),
    Option("neox_baseline_dir", "directory of the stored baselines", "baselines", metavar="DIR"),
    Option("neox_update_baselines", "write the measured results as the new baselines", False, kind="bool"),
    Option("neox_max_new_tokens", "tokens generated greedily per case", 32, kind="int", metavar="N"),
    Option("neox_seed", "seed of the synthetic weights and of the generated prompts", 0, kind="int",
           metavar="N"),
    Option("neox_top_k", "a greedy divergence is acceptable only if each side's token is in the other's "
           "top-k at that step", 5, kind="int", metavar="K"),
    Option("neox_parity_multiple", "a backend passes a metric if it is within this multiple of the noise "
           "floor (the HF reference's own low-precision vs fp32 difference)", 10.0, kind="float",
           metavar="X"),
    Option("neox_cases", "case set: default (under a minute per backend) or full (up to the context "
           "length, batch 8)", "default", metavar="SET"),
    Option("neox_cache_dir", "where synthetic models are built and kept, and the CPU dtype probe's and the "
           "serving-config check's answers (default ~/.cache/pytest-neoxmii)", None, metavar="DIR"),
    Option("neox_zero_nvme", "offload ZeRO-Inference parameters to NVMe at this path instead of CPU memory",
           None, metavar="PATH"),
    Option("neox_latency_threshold", "relative slowdown of the median beyond which a significant latency "
           "change fails", 0.10, kind="float", metavar="FRACTION"),
    Option("neox_latency_time_box", "seconds of timing per latency test, warm-up included: rounds stop when "
           "one more would not fit (after the 6 the gate needs) (default: 4 on a GPU, 1 on the CPU)", None,
           kind="float", metavar="SECONDS"),
    Option("neox_gpu_work", "also count each latency test's GPU work per call (operations and GPU busy time, "
           "from one profiled call after the timed rounds), record it with the baselines and gate it at "
           f"{GPU_WORK_THRESHOLD * 100:g} percent: figures the host's speed does not move, unlike the wall clock", False,
           kind="bool"),
    Option("neox_latency_ci", "rounds stop once the 95 percent confidence interval of the median is within this "
           "fraction of it", 0.02, kind="float", metavar="FRACTION"),
    Option("neox_prompts", "JSON Lines file of your own prompts, one object per line: 'prompt' (text) or "
           "'input_ids', optional 'max_new_tokens' and 'id'; each line adds a case to the greedy, "
           "teacher-forced and golden checks", None, metavar="FILE"),
    Option("neox_reference_first", "compute the HF reference's outputs of every case, then release the HF "
           "models, before an engine deploys: auto (on a GPU, when the fp32 reference, its peer and the engine "
           "would not fit GPU 0 together), always, or never", "auto", metavar="auto|always|never"),
    Option("neox_work_ahead", "each engine's worker computes the outputs the selected tests will ask for right "
           "after its load, side by side with the other engines (an engine whose calls are slow while the GPU idles, "
           "ZeRO-Inference on a GPU, shares them among workers where memory allows; on the CPU each process takes its share "
           "of the cores meanwhile): auto (= always), always, or never", "auto",
           metavar="auto|always|never"),
    Option("neox_ds_config", "JSON (or YAML) config of deepspeed.init_inference, merged over the plugin's "
           "defaults and deployed by the ds backend; shown in the header, the report and the baseline key",
           None, metavar="FILE"),
    Option("neox_mii_config", "JSON (or YAML) mii_config of mii.deploy, merged over the plugin's defaults and "
           "deployed by the mii backend; shown in the header, the report and the baseline key", None,
           metavar="FILE"),
    Option("neox_gpu_memory_cap", "the most GPU memory each worker process (ds, mii, zero) may use of each GPU, "
           "e.g. 40GiB or 42.3GB (units GB, GiB, MB, MiB): proves a configuration for smaller cards on bigger "
           "ones; an A100 40GB reports 42298834944 bytes", None, metavar="SIZE"),
    Option("neox_report", "write the JSON summary, summary.md and the HF-vs-DS latency plot to this directory", None,
           metavar="DIR"),
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("neoxmii", "GPT-NeoX / DeepSpeed-MII acceptance testing")
    for opt in OPTIONS:
        if opt.kind == "bool":
            group.addoption(opt.flag, action="store_true", default=None, dest=opt.name, help=opt.help)
            parser.addini(opt.name, opt.help, type="bool", default=bool(opt.default))
        else:
            shown = "" if opt.default is None else f" (default: {opt.default})"
            group.addoption(opt.flag, action="store", default=None, dest=opt.name, metavar=opt.metavar,
                            help=opt.help + shown)
            parser.addini(opt.name, opt.help, type=_ini_type(opt.kind),
                          default=None if opt.default is None else str(opt.default))


def _ini_type(kind: str):
    """The ini type of a non-bool option. Numbers are read as strings and converted (and checked, with the
    plugin's own message) by _convert. In pytest's native TOML table ([tool.pytest], pytest 9) a "string"
    option rejects `neox_tp = 2`, so from pytest 9.2, which accepts type unions, numeric options also take
    TOML numbers; "int | str" keeps a bad ini value such as 'two' a string for _convert to report."""
    if kind in ("int", "float") and tuple(pytest.version_tuple[:2]) >= (9, 2):
        return (int if kind == "int" else float) | str
    return "string"


def _raw(config: pytest.Config, opt: Option):
    value = config.getoption(opt.name)
    if value is None:
        value = config.getini(opt.name)
    if value in (None, "") and opt.kind != "bool":
        return opt.default
    return value


def _convert(opt: Option, value):
    if value is None or opt.kind == "string":
        return value
    if opt.kind == "bool":
        return bool(value)
    try:
        return int(value) if opt.kind == "int" else float(value)
    except (TypeError, ValueError):
        raise NeoxUsageError(f"{opt.flag} must be {'an integer' if opt.kind == 'int' else 'a number'}, "
                             f"got '{value}'") from None


@dataclass(frozen=True)
class NeoxOptions:
    model: str | None
    revision: str
    weights: str
    dtype: str | None          # as given; None: the session chooses (precision.py)
    tp: int
    backends: tuple[str, ...]
    baseline_dir: Path
    update_baselines: bool
    max_new_tokens: int
    seed: int
    top_k: int
    parity_multiple: float
    cases: str
    cache_dir: Path
    zero_nvme: Path | None
    latency_threshold: float
    report_dir: Path | None
    prompts: Path | None = None
    reference_first: str = "auto"            # reference_first.MODES
    work_ahead: str = "auto"                 # auto (as always), always, never: NeoxSession._works_ahead
    ds_config: Path | None = None
    mii_config: Path | None = None
    latency_time_box: float | None = None   # None: the device's profile decides (latency.profile_for)
    latency_ci: float = 0.02
    gpu_memory_cap: int | None = None       # bytes per worker and GPU (deploy/gpu_cap.py); None: no cap
    gpu_work: bool = False                  # --neox-gpu-work (gpu_work.py)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "NeoxOptions":
        from pytest_neoxmii.weights import default_cache_dir

        v = {opt.name: _convert(opt, _raw(config, opt)) for opt in OPTIONS}
        if v["neox_dtype"] is not None and v["neox_dtype"] not in DTYPES:
            raise NeoxUsageError(f"unknown dtype '{v['neox_dtype']}' for --neox-dtype: choose one of "
                                 f"{', '.join(DTYPES)}")
        if v["neox_weights"] not in ("auto", "synthetic"):
            raise NeoxUsageError(f"--neox-weights must be 'auto' or 'synthetic', got '{v['neox_weights']}'")
        backends = tuple(b.strip() for b in str(v["neox_backends"]).split(",") if b.strip())
        unknown = [b for b in backends if b not in engines.ENGINES]
        if unknown or not backends:
            raise NeoxUsageError(f"unknown backend '{unknown[0] if unknown else ''}' in --neox-backends: "
                                 f"choose from {', '.join(engines.names())}")
        # (twice would parametrize each test twice, as [ds0] and [ds1], and run it twice)
        twice = next((b for i, b in enumerate(backends) if b in backends[:i]), None)
        if twice:
            raise NeoxUsageError(f"--neox-backends names '{twice}' twice")
        for name, low in (("neox_tp", 1), ("neox_max_new_tokens", 1), ("neox_top_k", 1)):
            if v[name] < low:
                raise NeoxUsageError(f"--{name.replace('_', '-')} must be at least {low}, got {v[name]}")
        # (nan passes a `< 1` test, and inf would pass every parity check: neither is a multiple)
        if not (v["neox_parity_multiple"] >= 1 and math.isfinite(v["neox_parity_multiple"])):
            raise NeoxUsageError(f"--neox-parity-multiple must be a finite number of at least 1, got "
                                 f"{v['neox_parity_multiple']}")
        if not 0 < v["neox_latency_threshold"] < 10:
            raise NeoxUsageError("--neox-latency-threshold is a fraction such as 0.10, got "
                                 f"{v['neox_latency_threshold']}")
        box = v["neox_latency_time_box"]
        if box is not None and not (box > 0 and math.isfinite(box)):
            raise NeoxUsageError(f"--neox-latency-time-box is a number of seconds above 0, got {box}")
        if not 0 < v["neox_latency_ci"] < 1:
            raise NeoxUsageError(f"--neox-latency-ci is a fraction of the median such as 0.02, got "
                                 f"{v['neox_latency_ci']}")
        cap = parse_size(v["neox_gpu_memory_cap"], "--neox-gpu-memory-cap") if v["neox_gpu_memory_cap"] else None
        if v["neox_cases"] not in ("default", "full"):
            raise NeoxUsageError(f"--neox-cases must be 'default' or 'full', got '{v['neox_cases']}'")
        if v["neox_reference_first"] not in reference_first.MODES:
            raise NeoxUsageError("--neox-reference-first must be 'auto', 'always' or 'never', got "
                                 f"'{v['neox_reference_first']}'")
        if v["neox_work_ahead"] not in ("auto", "always", "never"):
            raise NeoxUsageError("--neox-work-ahead must be 'auto', 'always' or 'never', got "
                                 f"'{v['neox_work_ahead']}'")
        here = Path(config.invocation_params.dir)

        def path(value: str) -> Path:
            # Relative to where pytest was started (the invocation directory), not to the rootdir: with
            # `--pyargs pytest_neoxmii.suite` the rootdir can be the installed package's folder. A leading ~ is
            # the home directory: the shell leaves `--neox-report=~/reports` as it is (it expands a tilde only
            # at a word's start), and so does an ini file; taken as it is, it made a folder named ~ here.
            return here / Path(value).expanduser()

        baseline_dir = usable_directory(path(v["neox_baseline_dir"]), "--neox-baseline-dir")
        cache_dir = usable_directory(path(v["neox_cache_dir"]) if v["neox_cache_dir"] else default_cache_dir(),
                                     "--neox-cache-dir")
        report_dir = usable_directory(path(v["neox_report"]), "--neox-report") if v["neox_report"] else None
        _check_environment()
        if v["neox_model"]:
            _check_not_distributed(config)
        return cls(
            model=v["neox_model"], revision=v["neox_revision"], weights=v["neox_weights"],
            dtype=v["neox_dtype"], tp=v["neox_tp"], backends=backends,
            baseline_dir=baseline_dir, update_baselines=v["neox_update_baselines"],
            max_new_tokens=v["neox_max_new_tokens"], seed=v["neox_seed"], top_k=v["neox_top_k"],
            parity_multiple=v["neox_parity_multiple"], cases=v["neox_cases"],
            cache_dir=cache_dir,
            zero_nvme=path(v["neox_zero_nvme"]) if v["neox_zero_nvme"] else None,
            latency_threshold=v["neox_latency_threshold"],
            latency_time_box=box, latency_ci=v["neox_latency_ci"], gpu_memory_cap=cap,
            report_dir=report_dir,
            prompts=path(v["neox_prompts"]) if v["neox_prompts"] else None,
            ds_config=path(v["neox_ds_config"]) if v["neox_ds_config"] else None,
            mii_config=path(v["neox_mii_config"]) if v["neox_mii_config"] else None,
            reference_first=v["neox_reference_first"], work_ahead=v["neox_work_ahead"],
            gpu_work=v["neox_gpu_work"],
        )


def _check_environment() -> None:
    """The documented variables that place a session's files and ports (docs/MULTI_GPU.md), refused at start-up
    as the options are: read later, in the test process or a worker, each was a traceback in every test."""
    from pytest_neoxmii.deploy import ports
    for variable in ("NEOXMII_RUN_DIR", "NEOXMII_PORT_LOCK_DIR"):
        if os.environ.get(variable):
            usable_directory(Path(os.environ[variable]), variable)
    if os.environ.get(ports.RANGE_ENV):
        ports.parse_range(os.environ[ports.RANGE_ENV])


def _check_not_distributed(config: pytest.Config) -> None:
    """A session deploys each engine once and times it alone. Under pytest-xdist every xdist worker is a
    session of its own: each deployed every engine again, side by side on the same machine (pythia-14m on the
    2-core CPU: 176 s under -n 2 against 49 s), and the controller, which ran none of the tests, printed an
    empty summary and wrote an empty --neox-report over the workers' reports. --dist loadgroup cannot keep them
    in one worker either: with pytest 9.2, pytest-xdist 3.8 ignores its groups without a word (pytest-xdist
    issue 1386)."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    dist = getattr(config.option, "dist", "no")
    if dist in (None, "no"):
        return
    workers = getattr(config.option, "numprocesses", None)
    raise NeoxUsageError(f"--neox-model with pytest-xdist ({f'-n {workers}' if workers else f'--dist {dist}'}): "
                         "each xdist worker would deploy every engine again, side by side on the same machine; "
                         "run the session in one process (-n 0)")


def usable_directory(path: Path, flag: str) -> Path:
    """`path`, refused at start-up where it cannot be a directory: a file stands there or where one of its
    parents should be, or it cannot be looked at. Found later, that cost a whole session (a report not
    written at its end) or failed every test reading the directory, each with the same message. A directory
    that does not exist yet is fine: it is made when first written."""
    for place in (path, *path.parents):
        try:
            if not place.exists():
                continue
            is_dir = place.is_dir()
        except OSError as exc:           # e.g. a parent this user may not search
            raise NeoxUsageError(f"{flag} {path}: {exc.strerror or exc}") from None
        if not is_dir:
            why = "it exists and is not a directory" if place == path else f"{place} is not a directory"
            raise NeoxUsageError(f"{flag} {path}: {why}")
        return path
    return path


_UNITS = {"gb": 10**9, "gib": 2**30, "mb": 10**6, "mib": 2**20}


def parse_size(text, flag: str) -> int:
    """'40GiB', '42.3GB', '40960 MiB' -> bytes; anything else is a usage error naming the flag."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise NeoxUsageError(f"{flag} is a size with a unit such as 40GiB or 42.3GB (GB, GiB, MB, MiB), "
                             f"got '{text}'")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise NeoxUsageError(f"{flag} must be above 0, got '{text}'")
    return size
