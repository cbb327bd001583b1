"""Users' serving configs (--neox-ds-config / --neox-mii-config): reading and checking the file (one-line
errors naming the file and the key), merging over the plugin's defaults, the baseline key, and, through
pytester, a ds deployment whose max_tokens does not fit a case: run anyway, flagged beside the verdict."""
from __future__ import annotations

import json

import pytest

from pytest_neoxmii import serving_config
from pytest_neoxmii.cases import CasePlan
from pytest_neoxmii.errors import NeoxUsageError

pytestmark = pytest.mark.usefixtures("preloaded")


def cfg(tmp_path, text, name="ds.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error(engine, path, dtype="fp16", tp=1) -> str:
    with pytest.raises(NeoxUsageError) as exc:
        serving_config.load(engine, path, dtype=dtype, tp=tp)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_bad_files_name_the_file_and_the_key(tmp_path):
    assert error("ds", tmp_path / "nope.json") == f"--neox-ds-config {tmp_path / 'nope.json'}: no such file"
    bad = cfg(tmp_path, '{"max_tokens": 64,')
    assert error("ds", bad) == (f"--neox-ds-config {bad}: not valid JSON (Expecting property name enclosed in "
                                "double quotes at line 1 column 19)")
    typo = cfg(tmp_path, '{"max_tokns": 64}')
    assert error("ds", typo) == f"--neox-ds-config {typo}: key 'max_tokns': Extra inputs are not permitted"
    assert error("mii", typo) == f"--neox-mii-config {typo}: key 'max_tokns': Extra inputs are not permitted"
    value = cfg(tmp_path, '{"max_tokens": "many"}')
    assert error("ds", value).startswith(f"--neox-ds-config {value}: key 'max_tokens': Input should be a valid "
                                         "integer")
    # MII's own config takes any max_tokens; DeepSpeed, to which MII hands it on, wants it above 0
    negative = cfg(tmp_path, '{"max_tokens": -5}')
    assert error("mii", negative) == f"--neox-mii-config {negative}: key 'max_tokens': Input should be greater than 0"
    listed = cfg(tmp_path, "[1, 2]")
    assert error("mii", listed) == f"--neox-mii-config {listed}: expected an object of config keys, got list"
    yaml_bad = cfg(tmp_path, "max_tokens: [1,\n", "ds.yaml")
    assert error("ds", yaml_bad).startswith(f"--neox-ds-config {yaml_bad}: not valid YAML at line 2")


def test_keys_the_plugin_owns_or_the_session_contradicts(tmp_path):
    model = cfg(tmp_path, '{"model": "EleutherAI/pythia-1b"}')
    assert error("mii", model) == (f"--neox-mii-config {model}: key 'model' is set by the plugin (the model under "
                                   "test and the deployment's plumbing), not by the config file")
    dtype = cfg(tmp_path, '{"dtype": "fp16"}')
    assert error("ds", dtype, dtype="bf16") == (
        f"--neox-ds-config {dtype}: key 'dtype' asks for fp16 but the session runs --neox-dtype=bf16: set it "
        "with --neox-dtype instead (the HF reference and the noise floor follow it)")
    assert serving_config.load("ds", dtype, dtype="fp16", tp=1).values == {"dtype": "fp16"}   # same: fine
    # the header says what each engine's keys were checked against (MII's also by DeepSpeed, which gets some)
    assert serving_config.load("ds", dtype, dtype="fp16", tp=1).checked == (
        "checked against deepspeed.inference.config.DeepSpeedInferenceConfig")
    assert serving_config.load("mii", cfg(tmp_path, '{"max_tokens": 64}'), dtype="fp16", tp=1).checked == (
        "checked against mii.legacy.config.ModelConfig, and the keys MII hands to deepspeed.init_inference "
        "against DeepSpeedInferenceConfig")
    tp = cfg(tmp_path, '{"tensor_parallel": {"tp_size": 2}}')
    assert "key 'tensor_parallel' asks for 2 but the session runs --neox-tp=1" in error("ds", tp)


def test_a_byte_order_mark_is_read_past_and_the_digest_is_the_contents(tmp_path):
    """A Windows editor's mark before the JSON was "not valid JSON (Unexpected UTF-8 BOM ...)"."""
    marked = tmp_path / "marked.json"
    marked.write_bytes(b'\xef\xbb\xbf{"max_tokens": 64}\r\n')
    plain = cfg(tmp_path, '{"max_tokens": 64}')
    got = serving_config.load("ds", marked, dtype="fp16", tp=1)
    assert got.values == {"max_tokens": 64} and got.digest == serving_config.load("ds", plain, dtype="fp16", tp=1).digest


def test_yaml_aliases_merge_and_digest(tmp_path):
    c = serving_config.load("ds", cfg(tmp_path, "max_out_tokens: 512\nkernel_inject: false\n", "ds.yml"),
                            dtype="fp16", tp=1)
    assert c.values == {"max_tokens": 512, "replace_with_kernel_inject": False} and c.max_tokens == 512
    same = serving_config.load("ds", cfg(tmp_path, '{"replace_with_kernel_inject": false, "max_tokens": 512}'),
                               dtype="fp16", tp=1)
    assert same.digest == c.digest                     # the content, not the file, identifies a config
    assert serving_config.merged({"tensor_parallel": {"tp_size": 1, "x": 1}, "max_tokens": 2048},
                                 {"tensor_parallel": {"tp_size": 1}, "max_tokens": 64}) == {
        "tensor_parallel": {"tp_size": 1, "x": 1}, "max_tokens": 64}


def test_kernel_injection_is_read_as_the_engine_reads_it(tmp_path):
    """A spelling pydantic reads as a bool ("no", "yes", 1) becomes that bool: one digest for one content, and the
    backends, which expect injected kernels where it is on, never take the string "no" for on."""
    off = serving_config.load("ds", cfg(tmp_path, '{"kernel_inject": "no"}'), dtype="fp16", tp=1)
    assert off.values == {"replace_with_kernel_inject": False} and off.injects is False
    assert off.digest == serving_config.load("ds", cfg(tmp_path, '{"replace_with_kernel_inject": false}', "b.json"),
                                             dtype="fp16", tp=1).digest
    on = serving_config.load("mii", cfg(tmp_path, '{"replace_with_kernel_inject": "yes"}', "m.json"),
                             dtype="fp16", tp=1)
    assert on.values == {"replace_with_kernel_inject": True} and on.injects is True
    assert on.cpu_refusal() == (f"--neox-mii-config {tmp_path / 'm.json'} sets replace_with_kernel_inject: "
                                "DeepSpeed's inference kernels need a CUDA GPU, and this session runs on the CPU")
    assert off.cpu_refusal() is None
    unset = serving_config.load("mii", cfg(tmp_path, '{"max_tokens": 64}', "u.json"), dtype="fp16", tp=1)
    assert unset.injects is None and unset.cpu_refusal() is None     # MII's own default (on) is not the file's


def test_misfit_says_by_how_much_and_only_when_it_does_not_fit(tmp_path):
    c = serving_config.load("ds", cfg(tmp_path, '{"max_tokens": 100}'), dtype="fp16", tp=1)
    plan = CasePlan("medium-b1-len128", "medium", (128,), True, 32)
    assert serving_config.misfit(c, plan, "greedy") == (
        f"the ds config does not fit this case: max_tokens 100 < prompt 128 + 32 new = 160 tokens "
        f"({tmp_path / 'ds.json'}); run anyway, as deployed")
    assert "< prompt 128 tokens" in serving_config.misfit(c, plan, "teacher-forced")
    assert serving_config.misfit(c, CasePlan("short-b1-len4", "short", (4,), True, 32), "greedy") is None
    assert serving_config.misfit(None, plan, "greedy") is None


# --- through the plugin -----------------------------------------------------------------------------------

USER_TEST = """
from pytest_neoxmii.checks import check_greedy, check_teacher_forced
from pytest_neoxmii.checks.baseline_policy import key_for

def test_greedy(neox, neox_generation_case, request):
    check_greedy(neox, "ds", neox_generation_case, request)

def test_key(neox):
    print("KEY", key_for(neox, "ds", "fp32").backend, key_for(neox, "hf", "fp32").backend)
"""


def test_a_malformed_config_is_a_one_line_usage_error(pytester, synthetic_14m, assert_usage_error):
    pytester.path.joinpath("ds.json").write_text('{"max_tokens": 64,,}')
    result = pytester.runpytest(*synthetic_14m, "--neox-ds-config=ds.json")
    assert_usage_error(result, f"--neox-ds-config {pytester.path / 'ds.json'}: not valid JSON (Expecting property "
                               "name enclosed in double quotes at line 1 column 19)")
    pytester.path.joinpath("mii.json").write_text('{"max_tokens": 64, "enable_cuda_graphs": false}')
    result = pytester.runpytest(*synthetic_14m, "--neox-mii-config=mii.json")
    assert_usage_error(result, f"--neox-mii-config {pytester.path / 'mii.json'}: key 'enable_cuda_graphs': Extra "
                               "inputs are not permitted")


def test_a_config_asking_for_kernels_skips_its_engine_on_the_cpu(pytester, synthetic_14m, fake_gpus):
    """On the CPU, DeepSpeed fails inside init_inference when asked for its CUDA kernels ("This op had not been
    implemented on CPU backend", a traceback in every test of the engine): the engine's tests skip instead, with
    the file and the key, and its worker is never started."""
    fake_gpus()
    pytester.makepyfile(test_user=USER_TEST)
    pytester.path.joinpath("ds.json").write_text(json.dumps({"replace_with_kernel_inject": "yes"}))
    result = pytester.runpytest(*synthetic_14m, "--neox-dtype=fp32", "--neox-ds-config=ds.json", "-k", "short",
                                "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines([f"SKIPPED * ds (fp32): --neox-ds-config {pytester.path / 'ds.json'} sets "
                                 "replace_with_kernel_inject: DeepSpeed's inference kernels need a CUDA GPU, and "
                                 "this session runs on the CPU"])
    assert "worker process" not in result.stdout.str()                  # nothing was deployed


def test_a_config_too_small_for_a_case_runs_it_and_says_so(pytester, synthetic_14m, on_the_cpu):
    """ds on CPU (fp32: every CPU has it) deployed with the user's max_tokens of 24: the 4-token case fits,
    the 16-token prompt plus 16 new tokens does not and is flagged, both run; header, JSON report and
    baseline key carry the config."""
    pytester.makepyfile(test_user=USER_TEST)
    pytester.path.joinpath("ds.json").write_text(json.dumps({"max_tokens": 24}))
    result = pytester.runpytest(*synthetic_14m, "--neox-dtype=fp32", "--neox-ds-config=ds.json",
                                "--neox-max-new-tokens=16", "-k", "short or key", "--neox-report=rep", "-s")
    result.assert_outcomes(passed=3)
    digest = serving_config.load("ds", pytester.path / "ds.json", dtype="fp32", tp=1).digest
    result.stdout.fnmatch_lines([
        f"neoxmii: ds config {pytester.path / 'ds.json'} (digest {digest}, checked against "
        "deepspeed.inference.config.DeepSpeedInferenceConfig): {\"max_tokens\": 24} merged over the plugin's "
        "defaults",
        "*NOTE: the ds config does not fit this case: max_tokens 24 < prompt 16 + 16 new = 32 tokens*",
        f"*KEY ds-config-{digest} hf*",
        "*outside the serving config: greedy ds short-b1-len16: the ds config does not fit*",
    ])
    assert sum("NOTE: the ds config" in line for line in result.outlines) == 1     # short-b1-len4 fits
    summary = json.loads(pytester.path.joinpath("rep", "neoxmii-summary.json").read_text())
    assert summary["configs"]["ds"]["values"] == {"max_tokens": 24}
    assert summary["configs"]["ds"]["digest"] == digest
    assert summary["verdicts"]["ds"]["greedy"]["outside_config"] == 1
    assert [w.split(":")[0] for w in summary["config_warnings"]] == ["greedy ds short-b1-len16"]
    md = pytester.path.joinpath("rep", "summary.md").read_text()
    assert "2/2 passed, 1 outside the serving config" in md and "max_tokens 24 < prompt 16" in md


def test_the_engines_answer_is_kept_by_keys_and_versions_never_when_it_could_not_run(tmp_path, monkeypatch):
    """One child process per distinct config: the same keys again (any file, this process or a later session
    through the cache directory) ask no child; other keys, other versions or an unreadable cache file do;
    'could not check' is never kept."""
    from importlib import metadata
    asked = []

    def child(engine, values):
        asked.append((engine, dict(values)))
        return {"unavailable": "no deepspeed"} if values.get("max_tokens") == 1 else {"dtype": "torch.float16", "tp": 1}
    monkeypatch.setattr(serving_config, "_parse_in_child", child)
    monkeypatch.setattr(serving_config.ParseCache, "_memory", {})
    cache = tmp_path / "cache"
    a, b = cfg(tmp_path, '{"max_tokens": 64}', "a.json"), cfg(tmp_path, "max_tokens: 64\n", "b.yaml")
    for path in (a, b, a):
        assert serving_config.load("ds", path, dtype="fp16", tp=1, cache_dir=cache).checked.startswith("checked")
    assert asked == [("ds", {"max_tokens": 64})]
    serving_config.load("mii", a, dtype="fp16", tp=1, cache_dir=cache)          # another engine: asked
    assert len(asked) == 2
    [kept] = (cache / "serving-config-checks").glob(f"{serving_config.ParseCache.key('ds', {'max_tokens': 64})}.json")
    monkeypatch.setattr(serving_config.ParseCache, "_memory", {})              # a later session: from disk
    serving_config.load("ds", a, dtype="fp16", tp=1, cache_dir=cache)
    assert len(asked) == 2
    kept.write_text('{"dtype": ')                                               # unreadable: asked again, rewritten
    monkeypatch.setattr(serving_config.ParseCache, "_memory", {})
    serving_config.load("ds", a, dtype="fp16", tp=1, cache_dir=cache)
    assert len(asked) == 3 and json.loads(kept.read_text()) == {"dtype": "torch.float16", "tp": 1}
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "9.9.9" if d == "deepspeed" else real(d))
    serving_config.load("ds", a, dtype="fp16", tp=1, cache_dir=cache)          # another DeepSpeed: asked
    assert len(asked) == 4
    one = cfg(tmp_path, '{"max_tokens": 1}', "one.json")
    for _ in range(2):
        assert "keys not checked: no deepspeed" in serving_config.load("ds", one, dtype="fp16", tp=1,
                                                                        cache_dir=cache).checked
    assert len(asked) == 6 and not list((cache / "serving-config-checks").glob("*.tmp"))


def test_one_child_answers_every_check_of_the_process_and_ends_with_it():
    pytest.importorskip("deepspeed")
    checker = serving_config._Checker
    checker.close()
    assert checker.ask("ds", {"max_tokens": 64}) == {"dtype": "torch.float16", "tp": 1, "inject": None}
    assert checker.ask("ds", {"kernel_inject": "on"})["inject"] is True
    proc = checker._proc
    assert checker.ask("ds", {"max_tokns": 64})["error"][0] == "max_tokns"
    assert checker._proc is proc and proc.poll() is None              # the same child, still up
    checker.close()
    assert proc.poll() is not None                                    # closing its stdin ends it


@pytest.mark.parametrize("loop, expected", [
    # what the engines' imports print comes in the same write as the answer: read past it
    ("import sys, json\nfor line in sys.stdin:\n    sys.stdout.write('import noise\\n' + ANSWER + "
     "json.dumps({'dtype': 'x', 'tp': 1}) + '\\n'); sys.stdout.flush()\n", {"dtype": "x", "tp": 1}),
    ("import sys\nsys.stdin.readline()\nsys.stderr.write('ImportError: no deepspeed here\\n')\nsys.exit(1)\n",
     {"unavailable": "the check failed (ImportError: no deepspeed here)"}),
    ("import time\ntime.sleep(30)\n", {"unavailable": "the check did not answer in 1 s"}),
], ids=["noise-before-the-answer", "child-died", "no-answer"])
def test_the_checker_reads_its_answer_and_says_when_there_is_none(monkeypatch, loop, expected):
    checker = serving_config._Checker
    checker.close()
    monkeypatch.setattr(serving_config, "_CHECKER_LOOP", f"ANSWER = {serving_config.ANSWER!r}\n{loop}")
    monkeypatch.setattr(serving_config, "CHECK_TIMEOUT_S", 1.0)
    try:
        assert checker.ask("ds", {}) == expected
    finally:
        checker.close()
    assert checker._proc is None


def test_a_config_turning_kernels_off_skips_the_injection_check_on_a_gpu(pytester, fake_gpus, monkeypatch, tmp_path):
    """The user's config says no kernels (here in a spelling pydantic reads as false): the shipped check that
    every layer is injected skips with the file, where it failed "none (replace_with_kernel_inject is off ...)
    != injected 12/12 layers" (one H200, nineteenth round), and asks for no deployment."""
    from pytest_neoxmii import session as session_module
    fake_gpus("h100")
    loaded = []
    monkeypatch.setattr(session_module, "load_backend",
                        lambda name, request, **kw: loaded.append(name) or pytest.skip("stub"))
    monkeypatch.setattr(session_module.NeoxSession, "require_model", lambda self: self.model)   # no weights built
    pytester.path.joinpath("ds.json").write_text('{"kernel_inject": "off"}')
    result = pytester.runpytest("--neox-model=pythia-160m", "--neox-weights=synthetic", "--neox-backends=ds",
                                f"--neox-cache-dir={tmp_path / 'cache'}", "--neox-ds-config=ds.json", "-rs",
                                "-p", "no:cacheprovider", "--pyargs", "pytest_neoxmii.suite.test_backends",
                                "-k", "kernels_are_injected")
    result.assert_outcomes(skipped=2)                     # ds: the config; mii: not selected
    result.stdout.fnmatch_lines([f"SKIPPED * ds: {pytester.path / 'ds.json'} turns kernel injection off "
                                 "(replace_with_kernel_inject: false)"])
    assert "ds" not in loaded
