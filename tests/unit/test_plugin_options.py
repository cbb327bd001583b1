"""The plugin's options, driven through pytester: every option is a command-line flag and an ini option
(pytest.ini-style files and pyproject.toml), the flag wins over the ini, the defaults, the --help listing,
and bad input as a one-line usage error (exit code 4, no traceback from the plugin's internals)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pytest_neoxmii.options import OPTIONS, NeoxOptions
from pytest_neoxmii.plugin import get_session
from pytest_neoxmii.registry import known_names

pytestmark = pytest.mark.usefixtures("preloaded")


def options_of(pytester: pytest.Pytester, *args: str):
    """The validated NeoxOptions a session with these arguments (and the pytester directory's ini) gets."""
    config = pytester.parseconfigure(*args)
    return get_session(config).options


# ---------------------------------------------------------------------------------------------------------
# Each option: ini value, flag value, and the NeoxOptions field they set (with the expected converted values).
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    name: str                 # ini name
    field: str                # NeoxOptions attribute
    ini: str
    flag: str
    from_ini: object          # expected value; a callable(rootpath) for values that depend on the rootdir
    from_flag: object
    extra: tuple[str, ...] = ()   # other arguments the case needs


CASES = [
    # --neox-weights=synthetic: a registry name then resolves without the hub.
    Case("neox_model", "model", "pythia-14m", "pythia-31m", "pythia-14m", "pythia-31m",
         extra=("--neox-weights=synthetic",)),
    Case("neox_revision", "revision", "step1000", "v0", "step1000", "v0"),
    Case("neox_weights", "weights", "synthetic", "auto", "synthetic", "auto"),
    Case("neox_dtype", "dtype", "bf16", "fp32", "bf16", "fp32"),
    Case("neox_tp", "tp", "2", "4", 2, 4),
    Case("neox_backends", "backends", "hf,mii", " ds , zero", ("hf", "mii"), ("ds", "zero")),
    Case("neox_baseline_dir", "baseline_dir", "base-ini", "base-flag",
         lambda root: root / "base-ini", lambda root: root / "base-flag"),
    Case("neox_update_baselines", "update_baselines", "false", "", False, True),
    Case("neox_max_new_tokens", "max_new_tokens", "8", "16", 8, 16),
    Case("neox_seed", "seed", "3", "7", 3, 7),
    Case("neox_top_k", "top_k", "3", "10", 3, 10),
    Case("neox_parity_multiple", "parity_multiple", "20", "2.5", 20.0, 2.5),
    Case("neox_cases", "cases", "full", "default", "full", "default"),
    Case("neox_cache_dir", "cache_dir", "~/ini-cache", "/tmp/flag-cache",
         lambda root: Path("~/ini-cache").expanduser(), Path("/tmp/flag-cache")),
    Case("neox_zero_nvme", "zero_nvme", "/nvme/ini", "/nvme/flag", Path("/nvme/ini"), Path("/nvme/flag")),
    Case("neox_latency_threshold", "latency_threshold", "0.2", "0.05", 0.2, 0.05),
    Case("neox_latency_time_box", "latency_time_box", "30", "4.5", 30.0, 4.5),
    Case("neox_latency_ci", "latency_ci", "0.05", "0.01", 0.05, 0.01),
    Case("neox_gpu_work", "gpu_work", "true", "", True, True),
    Case("neox_gpu_memory_cap", "gpu_memory_cap", "40GiB", "42.3GB", 40 * 2**30, 42_300_000_000),
    Case("neox_reference_first", "reference_first", "always", "never", "always", "never"),
    Case("neox_work_ahead", "work_ahead", "never", "always", "never", "always"),
    Case("neox_report", "report_dir", "report-ini", "report-flag",
         lambda root: root / "report-ini", lambda root: root / "report-flag"),
    # files read only when a model is given (test_prompts.py, test_serving_config.py read them)
    Case("neox_prompts", "prompts", "ini.jsonl", "flag.jsonl",
         lambda root: root / "ini.jsonl", lambda root: root / "flag.jsonl"),
    Case("neox_ds_config", "ds_config", "ds-ini.json", "ds-flag.yaml",
         lambda root: root / "ds-ini.json", lambda root: root / "ds-flag.yaml"),
    Case("neox_mii_config", "mii_config", "mii-ini.json", "mii-flag.json",
         lambda root: root / "mii-ini.json", lambda root: root / "mii-flag.json"),
]


def _expected(value, root: Path):
    return value(root) if callable(value) else value


def _flag(case: Case) -> str:
    flag = "--" + case.name.replace("_", "-")
    return flag if case.flag == "" else f"{flag}={case.flag}"   # "" marks a store_true flag


def test_every_option_is_covered():
    assert sorted(c.name for c in CASES) == sorted(o.name for o in OPTIONS)
    assert sorted(c.field for c in CASES) == sorted(f.name for f in dataclasses.fields(NeoxOptions))
    # Values that tell the sources apart: ini != flag, and the ini value is not the default (except the
    # store_true flag, whose ini "false" is overridden to True by the flag).
    defaults = {o.name: o.default for o in OPTIONS}
    for c in CASES:
        assert c.ini != c.flag, c.name
        if c.name != "neox_update_baselines":
            assert c.ini != str(defaults[c.name]), c.name


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_option_from_ini_file_and_flag_overrides(pytester, case):
    pytester.makeini(f"[pytest]\n{case.name} = {case.ini}\n")
    root = pytester.path
    from_ini = options_of(pytester, *case.extra)
    assert getattr(from_ini, case.field) == _expected(case.from_ini, root)
    from_flag = options_of(pytester, _flag(case), *case.extra)
    assert getattr(from_flag, case.field) == _expected(case.from_flag, root)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_option_as_flag_alone(pytester, case):
    opts = options_of(pytester, _flag(case), *case.extra)
    assert getattr(opts, case.field) == _expected(case.from_flag, pytester.path)


PATH_OPTIONS = [("neox_baseline_dir", "baseline_dir"), ("neox_cache_dir", "cache_dir"), ("neox_report", "report_dir"),
                ("neox_zero_nvme", "zero_nvme"), ("neox_prompts", "prompts"), ("neox_ds_config", "ds_config"),
                ("neox_mii_config", "mii_config")]


@pytest.mark.parametrize("name, field", PATH_OPTIONS, ids=[n for n, _ in PATH_OPTIONS])
def test_a_path_option_starting_with_a_tilde_is_in_the_home_directory(pytester, monkeypatch, tmp_path, name, field):
    """The shell leaves `--neox-report=~/reports` as it is (it expands a tilde only at a word's start), and an ini
    file does too: taken as it was, the report went to a folder named ~ in the directory pytest ran in."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    flag = "--" + name.replace("_", "-")
    assert getattr(options_of(pytester, f"{flag}=~/from-flag"), field) == tmp_path / "home" / "from-flag"
    pytester.makeini(f"[pytest]\n{name} = ~/from-ini\n")
    assert getattr(options_of(pytester), field) == tmp_path / "home" / "from-ini"
    assert not (pytester.path / "~").exists()


def test_bool_ini_option_true(pytester):
    pytester.makeini("[pytest]\nneox_update_baselines = true\n")
    assert options_of(pytester).update_baselines is True


def test_options_from_pyproject_ini_options(pytester):
    """[tool.pytest.ini_options] of pyproject.toml: every option at once, then every flag over it."""
    lines = "\n".join(f"{c.name} = {json.dumps(c.ini)}" for c in CASES if c.name != "neox_update_baselines")
    pytester.makepyprojecttoml(f"[tool.pytest.ini_options]\n{lines}\nneox_update_baselines = true\n")
    root = pytester.path
    for name in ("ini.jsonl", "flag.jsonl"):           # the model is given: the files are read and checked
        (root / name).write_text('{"input_ids": [1, 2, 3]}\n')
    for name in ("ds-ini.json", "ds-flag.yaml", "mii-ini.json", "mii-flag.json"):
        (root / name).write_text("{}\n")
    # neox_model from the file needs synthetic weights; neox_weights from the file is "synthetic".
    opts = options_of(pytester)
    for c in CASES:
        expected = True if c.name == "neox_update_baselines" else _expected(c.from_ini, root)
        assert getattr(opts, c.field) == expected, c.name
    flags = [_flag(c) for c in CASES if c.name != "neox_weights"] + ["--neox-weights=synthetic"]
    opts = options_of(pytester, *flags)
    for c in CASES:
        expected = "synthetic" if c.name == "neox_weights" else _expected(c.from_flag, root)
        assert getattr(opts, c.field) == expected, c.name


@pytest.mark.skipif(tuple(pytest.version_tuple[:2]) < (9, 2),
                    reason="typed ini options (type unions) need pytest 9.2")
def test_native_toml_numbers(pytester):
    """pytest 9's native [tool.pytest] table keeps TOML types: numbers must be accepted as numbers."""
    pytester.makepyprojecttoml("[tool.pytest]\nneox_tp = 2\nneox_seed = 5\nneox_parity_multiple = 4\n"
                               "neox_latency_threshold = 0.25\nneox_update_baselines = true\n"
                               'neox_dtype = "bf16"\n')
    opts = options_of(pytester)
    assert (opts.tp, opts.seed, opts.parity_multiple, opts.latency_threshold) == (2, 5, 4.0, 0.25)
    assert opts.update_baselines is True and opts.dtype == "bf16"
    assert options_of(pytester, "--neox-tp=3").tp == 3


def test_defaults(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    opts = options_of(pytester)
    assert dataclasses.asdict(opts) == {
        "model": None, "revision": "main", "weights": "auto", "dtype": None, "tp": 1,
        "backends": ("hf", "ds", "mii", "zero"), "baseline_dir": pytester.path / "baselines",
        "update_baselines": False, "max_new_tokens": 32, "seed": 0, "top_k": 5, "parity_multiple": 10.0,
        "cases": "default", "cache_dir": tmp_path / "xdg" / "pytest-neoxmii", "zero_nvme": None,
        "latency_threshold": 0.10, "report_dir": None, "prompts": None, "ds_config": None, "mii_config": None,
        "latency_time_box": None, "latency_ci": 0.02, "gpu_memory_cap": None, "gpu_work": False, "reference_first": "auto",
        "work_ahead": "auto",
    }
    assert get_session(pytester.parseconfigure()).model is None


def test_help_lists_the_neoxmii_group(pytester):
    result = pytester.runpytest("--help")
    assert result.ret == 0
    out = result.outlines
    start = out.index("GPT-NeoX / DeepSpeed-MII acceptance testing:")
    end = out.index("", start)
    group = "\n".join(out[start:end])
    for opt in OPTIONS:
        assert f"  {opt.flag}" in group, opt.flag
    ini_start = next(i for i, ln in enumerate(out) if "configuration options" in ln)
    ini_section = "\n".join(out[ini_start:])
    for opt in OPTIONS:
        assert f"  {opt.name} (" in ini_section, opt.name
    assert "(default: None)" not in group


# ---------------------------------------------------------------------------------------------------------
# Bad input: one ERROR line, exit code 4, no traceback.
# ---------------------------------------------------------------------------------------------------------

ACCEPTANCE_STYLE = """
def test_parity(neox, neox_backend_name, neox_case):
    pass
"""


def test_unknown_model_lists_known_names(pytester, assert_usage_error):
    pytester.makepyfile(ACCEPTANCE_STYLE)
    result = pytester.runpytest("--neox-model=pythia-15m")
    assert_usage_error(result, f"unknown model 'pythia-15m': known models are {', '.join(known_names())} "
                               "(or pass a hub id or a local directory)")
    assert "pythia-14m" in known_names() and "gpt-neox-20b" in known_names()


def test_unknown_dtype(pytester, assert_usage_error):
    result = pytester.runpytest("--neox-dtype=fp8")
    assert_usage_error(result, "unknown dtype 'fp8' for --neox-dtype: choose one of fp16, bf16, fp32")


def test_unknown_backend(pytester, assert_usage_error):
    result = pytester.runpytest("--neox-backends=ds,vllm")
    assert_usage_error(result, "unknown backend 'vllm' in --neox-backends: choose from hf, ds, mii, zero")


# Every bound of every option, just outside it: the exact one-line message. (A bound that moves, e.g. a
# parity multiple below 1, i.e. a tolerance tighter than HF's own noise, must be refused, not accepted.)
@pytest.mark.parametrize("arg,error", [
    ("--neox-tp=0", "--neox-tp must be at least 1, got 0"),
    ("--neox-max-new-tokens=0", "--neox-max-new-tokens must be at least 1, got 0"),
    ("--neox-top-k=0", "--neox-top-k must be at least 1, got 0"),
    ("--neox-parity-multiple=0.5", "--neox-parity-multiple must be a finite number of at least 1, got 0.5"),
    ("--neox-parity-multiple=0.999", "--neox-parity-multiple must be a finite number of at least 1, got 0.999"),
    ("--neox-parity-multiple=nan", "--neox-parity-multiple must be a finite number of at least 1, got nan"),
    ("--neox-parity-multiple=inf", "--neox-parity-multiple must be a finite number of at least 1, got inf"),
    ("--neox-parity-multiple=ten", "--neox-parity-multiple must be a number, got 'ten'"),
    ("--neox-latency-threshold=0", "--neox-latency-threshold is a fraction such as 0.10, got 0.0"),
    ("--neox-latency-threshold=-0.1", "--neox-latency-threshold is a fraction such as 0.10, got -0.1"),
    ("--neox-latency-threshold=10", "--neox-latency-threshold is a fraction such as 0.10, got 10.0"),
    ("--neox-latency-time-box=0", "--neox-latency-time-box is a number of seconds above 0, got 0.0"),
    ("--neox-latency-time-box=inf", "--neox-latency-time-box is a number of seconds above 0, got inf"),
    ("--neox-latency-ci=0", "--neox-latency-ci is a fraction of the median such as 0.02, got 0.0"),
    ("--neox-latency-ci=1", "--neox-latency-ci is a fraction of the median such as 0.02, got 1.0"),
    ("--neox-cases=huge", "--neox-cases must be 'default' or 'full', got 'huge'"),
    ("--neox-backends=ds,ds", "--neox-backends names 'ds' twice"),
    ("--neox-backends=mii, zero,mii", "--neox-backends names 'mii' twice"),
    ("--neox-weights=random", "--neox-weights must be 'auto' or 'synthetic', got 'random'"),
    ("--neox-dtype=FP16", "unknown dtype 'FP16' for --neox-dtype: choose one of fp16, bf16, fp32"),
    ("--neox-backends=hf,,vllm", "unknown backend 'vllm' in --neox-backends: choose from hf, ds, mii, zero"),
    ("--neox-backends= , ", "unknown backend '' in --neox-backends: choose from hf, ds, mii, zero"),
    ("--neox-max-new-tokens=1.5", "--neox-max-new-tokens must be an integer, got '1.5'"),
    ("--neox-reference-first=Always", "--neox-reference-first must be 'auto', 'always' or 'never', got 'Always'"),
    ("--neox-work-ahead=yes", "--neox-work-ahead must be 'auto', 'always' or 'never', got 'yes'"),
], ids=lambda v: v if v.startswith("--") else "")
def test_every_option_bound_is_a_one_line_error(pytester, assert_usage_error, arg, error):
    assert_usage_error(pytester.runpytest(arg), error)


# A directory option that cannot be a directory is refused before anything loads: found at the end, it lost a
# whole session's report ("report not written ... File exists"); found by each test, it failed every golden test
# with the same line (--neox-baseline-dir) or errored them with a NotADirectoryError traceback (--neox-cache-dir).
@pytest.mark.parametrize("flag", ["--neox-baseline-dir", "--neox-report", "--neox-cache-dir"])
def test_a_directory_option_naming_a_file_is_a_one_line_error(pytester, assert_usage_error, flag):
    pytester.makefile(".txt", notes="a file, not a directory")
    assert_usage_error(pytester.runpytest(f"{flag}=notes.txt"),
                       f"{flag} {pytester.path / 'notes.txt'}: it exists and is not a directory")
    inside = pytester.path / "notes.txt" / "sub"
    assert_usage_error(pytester.runpytest(f"{flag}=notes.txt/sub"),
                       f"{flag} {inside}: {inside.parent} is not a directory")


def test_a_directory_option_naming_a_directory_not_made_yet_is_accepted(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--neox-baseline-dir=a/b", "--neox-report=c/d", "--neox-cache-dir=e/f",
                                "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    # checking makes nothing: a directory appears when something is first written there
    assert not any((pytester.path / d).exists() for d in ("a", "c", "e"))


@pytest.mark.parametrize("variable, value, message", [
    ("NEOXMII_RUN_DIR", "notes.txt", "NEOXMII_RUN_DIR notes.txt: it exists and is not a directory"),
    ("NEOXMII_PORT_LOCK_DIR", "notes.txt/locks", "NEOXMII_PORT_LOCK_DIR notes.txt/locks: notes.txt is not a directory"),
    ("NEOXMII_PORT_RANGE", "abc", "NEOXMII_PORT_RANGE='abc': expected the first and last port, such as 20000-29999, "
                                  "within 1-65535"),
])
def test_a_documented_variable_that_cannot_work_is_a_one_line_error(pytester, assert_usage_error, monkeypatch,
                                                                     variable, value, message):
    """docs/MULTI_GPU.md's variables: a run directory that is a file failed every test's setup with a
    NotADirectoryError traceback; a port range that is not one failed each engine's load in its worker."""
    pytester.makefile(".txt", notes="a file, not a directory")
    monkeypatch.setenv(variable, value)
    assert_usage_error(pytester.runpytest(), message)


@pytest.mark.parametrize("text, ports", [("20000-29999", (20000, 29999)), (" 1-1 ", (1, 1)), ("65535-65535", (65535, 65535))])
def test_a_port_range_is_its_first_and_last_port(text, ports):
    from pytest_neoxmii.deploy.ports import parse_range
    assert parse_range(text) == range(ports[0], ports[1] + 1)


@pytest.mark.parametrize("text", ["abc", "20000", "20000-", "-20000", "30000-20000", "0-10", "60000-70000",
                                  "1.5-3", "20000:29999"])
def test_a_port_range_that_is_not_one_is_a_usage_error(text):
    from pytest_neoxmii.deploy.ports import parse_range
    from pytest_neoxmii.errors import NeoxUsageError
    with pytest.raises(NeoxUsageError, match=f"NEOXMII_PORT_RANGE={text!r}: expected the first and last port"):
        parse_range(text)


def test_a_directory_that_cannot_be_looked_at_is_a_one_line_error(monkeypatch, tmp_path):
    from pytest_neoxmii.errors import NeoxUsageError
    from pytest_neoxmii.options import usable_directory

    def refused(self):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "exists", refused)
    with pytest.raises(NeoxUsageError) as raised:
        usable_directory(tmp_path / "rep", "--neox-report")
    assert str(raised.value) == f"--neox-report {tmp_path / 'rep'}: Permission denied"


def test_every_option_bound_itself_is_accepted(pytester):
    """The inclusive bounds are valid values (the errors above are for just outside them)."""
    options = options_of(pytester, "--neox-tp=1", "--neox-max-new-tokens=1", "--neox-top-k=1",
                         "--neox-parity-multiple=1", "--neox-latency-threshold=9.99", "--neox-cases=full",
                         "--neox-weights=synthetic", "--neox-dtype=bf16", "--neox-backends= hf , zero ")
    assert (options.tp, options.max_new_tokens, options.top_k, options.parity_multiple) == (1, 1, 1, 1.0)
    assert options.latency_threshold == 9.99 and options.cases == "full" and options.weights == "synthetic"
    assert options.dtype == "bf16" and options.backends == ("hf", "zero")
    assert options_of(pytester, "--neox-latency-threshold=0.001").latency_threshold == 0.001


@pytest.mark.parametrize("value", ["two", "2.5"])
def test_non_integer_tp(pytester, assert_usage_error, value):
    result = pytester.runpytest(f"--neox-tp={value}")
    assert_usage_error(result, f"--neox-tp must be an integer, got '{value}'")


def test_non_integer_tp_from_ini(pytester, assert_usage_error):
    pytester.makeini("[pytest]\nneox_tp = two\n")
    assert_usage_error(pytester.runpytest(), "--neox-tp must be an integer, got 'two'")


def test_auto_weights_offline_with_empty_cache(pytester, assert_usage_error, monkeypatch, tmp_path):
    # huggingface_hub reads these variables when it is imported: a subprocess sees them for sure.
    empty = tmp_path / "empty-hf"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    pytester.makepyfile(ACCEPTANCE_STYLE)
    result = pytester.runpytest_subprocess("--neox-model=pythia-14m", "--neox-weights=auto", "-p",
                                           "no:cacheprovider")
    assert_usage_error(result, "EleutherAI/pythia-14m@main is not in the hub cache and HF_HUB_OFFLINE is set: "
                               "pass --neox-weights=synthetic to test the architecture with seeded synthetic "
                               "weights, or a local model directory as --neox-model")


def test_local_directory_without_config(pytester, assert_usage_error):
    model = pytester.mkdir("not-a-model")
    (model / "weights.bin").write_bytes(b"\0")
    result = pytester.runpytest(f"--neox-model={model}")
    assert_usage_error(result, f"'{model}' is not a GPT-NeoX model directory: it has no config.json")


def test_local_directory_without_weights(pytester, assert_usage_error, neox_cache_dir):
    """A checkpoint copied without its weights: one line at start-up, not a transformers traceback in every
    test needing the model (the file checks themselves: test_checkpoint_files.py)."""
    import shutil
    from pytest_neoxmii.registry import lookup
    from pytest_neoxmii.weights import synthetic_directory
    model = pytester.path / "copied"
    shutil.copytree(synthetic_directory(lookup("pythia-14m"), 0, neox_cache_dir), model,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    pytester.makepyfile(ACCEPTANCE_STYLE)
    result = pytester.runpytest(f"--neox-model={model}", "--neox-backends=ds")
    assert_usage_error(result, f"'{model}' has no weights: none of model.safetensors, model.safetensors.index.json, "
                               "pytorch_model.bin, pytorch_model.bin.index.json")


def test_local_directory_of_another_architecture(pytester, assert_usage_error):
    model = pytester.mkdir("llama-model")
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000}))
    result = pytester.runpytest(f"--neox-model={model}")
    assert_usage_error(result, "'llama-model' is not a GPT-NeoX model (model_type 'llama')")


def test_case_longer_than_the_context(pytester, assert_usage_error, synthetic_14m):
    pytester.makepyfile(ACCEPTANCE_STYLE)
    result = pytester.runpytest(*synthetic_14m, "--neox-max-new-tokens=5000")
    assert_usage_error(result, "--neox-max-new-tokens=5000 leaves no room for a prompt in the model's context "
                               "of 2048 tokens")


def test_some_cases_longer_than_the_context(pytester, assert_usage_error, synthetic_14m):
    # 1990 new tokens leave room for the long prompt (58 tokens) but not for the 128-token medium case.
    pytester.makepyfile(ACCEPTANCE_STYLE)
    result = pytester.runpytest(*synthetic_14m, "--neox-max-new-tokens=1990")
    assert_usage_error(result, "case medium-b1-len128 needs 2118 tokens (prompt 128 + 1990 new) but the "
                               "model's context is 2048")


def test_top_k_beyond_the_vocabulary(pytester, assert_usage_error, synthetic_14m):
    """Found at the first generate, it was torch.topk's "selected index k out of range" in every engine, each
    reported as a crashed deployment; the vocabulary is the embedding's rows (50304), not the tokenizer's."""
    pytester.makepyfile(ACCEPTANCE_STYLE)
    assert_usage_error(pytester.runpytest(*synthetic_14m, "--neox-top-k=50305"),
                       "--neox-top-k=50305 is more than the model's vocabulary of 50304 tokens")
    result = pytester.runpytest(*synthetic_14m, "--neox-top-k=50304", "--co")   # the whole vocabulary is allowed
    assert result.ret == 0, result.stdout.str()


def test_help_shows_each_flags_metavar_and_default(pytester):
    """--help lists every flag with its metavar and, where it has one, its default (and never a default of
    None); the ini section lists each option with its type."""
    result = pytester.runpytest("--help")
    out = result.outlines
    start = out.index("GPT-NeoX / DeepSpeed-MII acceptance testing:")
    group = " ".join(" ".join(out[start:out.index("", start)]).split())     # one line, single spaces
    for opt in OPTIONS:
        if opt.kind == "bool":
            assert f"{opt.flag} {opt.help.split()[0]}" in group, opt.flag
            continue
        assert f"{opt.flag}={opt.metavar}" in group, opt.flag
        if opt.default is not None:
            assert f"(default: {opt.default})" in group, opt.flag
    assert "--neox-tp=N tensor-parallel degree of the ds and mii backends (default: 1)" in group
    assert "--neox-parity-multiple=X" in group and "(default: 10.0)" in group
    ini = " ".join(" ".join(out[next(i for i, ln in enumerate(out) if "configuration options" in ln):]).split())
    assert "neox_update_baselines (bool):" in ini
    assert "neox_tp (" in ini and "neox_model (string):" in ini


def test_an_empty_ini_value_means_the_default(pytester):
    pytester.makeini("[pytest]\nneox_tp =\nneox_dtype =\nneox_parity_multiple =\n")
    options = options_of(pytester)
    assert (options.tp, options.dtype, options.parity_multiple) == (1, None, 10.0)   # None: the session chooses


def test_bool_option_from_flag_and_from_ini_false(pytester):
    assert options_of(pytester, "--neox-update-baselines").update_baselines is True
    pytester.makeini("[pytest]\nneox_update_baselines = false\n")
    assert options_of(pytester).update_baselines is False
    assert options_of(pytester, "--neox-update-baselines").update_baselines is True


@pytest.mark.parametrize("xdist, shown", [(("-n", "2"), "-n 2"), (("-n", "1"), "-n 1"),
                                          (("-n", "2", "--dist", "loadgroup"), "-n 2")],
                         ids=["n2", "n1", "n2-loadgroup"])
def test_a_session_under_pytest_xdist_is_refused_in_one_line(pytester, assert_usage_error, synthetic_14m,
                                                              xdist, shown):
    """Each xdist worker would be a session of its own, deploying every engine again; loadgroup does not
    group on pytest 9.2 (pytest-xdist issue 1386). The refusal comes before any worker starts."""
    pytester.makepyfile(test_one="def test_one(neox):\n    pass\n")
    assert_usage_error(pytester.runpytest(*synthetic_14m, *xdist),
                       f"--neox-model with pytest-xdist ({shown}): each xdist worker would deploy every engine "
                       "again, side by side on the same machine; run the session in one process (-n 0)")


def test_a_session_at_n0_is_in_one_process_and_not_refused(pytester, synthetic_14m):
    """(xdist without a model is no concern of the plugin: .ci/run runs this suite that way, under -n 2.)"""
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest(*synthetic_14m, "-n", "0", "--co")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
