"""Bad input for backends: each gives a one-line reason the test session turns into a skip."""
import sys

import pytest

from pytest_neoxmii.backends import deepspeed_inference, mii_legacy
from pytest_neoxmii.errors import BackendUnavailable


def test_missing_mii_package_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mii", None)          # import mii -> ImportError
    monkeypatch.setitem(sys.modules, "mii.legacy", None)
    with pytest.raises(BackendUnavailable) as info:
        mii_legacy.import_mii()
    message = str(info.value)
    assert "pip install 'pytest-neoxmii[mii]'" in message and "\n" not in message


def test_fp32_kernels_are_refused():
    with pytest.raises(BackendUnavailable, match="runs fp16 or bf16 here, not fp32"):
        deepspeed_inference.check_kernel_dtype("fp32", "cuda:0")


def test_bf16_kernels_need_ampere(monkeypatch):
    monkeypatch.setattr(deepspeed_inference.torch.cuda, "get_device_capability", lambda device: (7, 5))
    monkeypatch.setattr(deepspeed_inference.torch.cuda, "get_device_name", lambda device: "Tesla T4")
    with pytest.raises(BackendUnavailable, match=r"bf16 kernels need compute capability 8.0 or newer, found "
                                                 r"7.5 on Tesla T4"):
        deepspeed_inference.check_kernel_dtype("bf16", "cuda:0")
    monkeypatch.setattr(deepspeed_inference.torch.cuda, "get_device_capability", lambda device: (9, 0))
    deepspeed_inference.check_kernel_dtype("bf16", "cuda:0")      # Hopper: accepted
    deepspeed_inference.check_kernel_dtype("fp16", "cuda:0")


def test_transformers_5_refuses_ds_before_loading_anything(monkeypatch, tmp_path):
    from pytest_neoxmii import compat
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.1.0")
    with pytest.raises(BackendUnavailable, match="transformers 5.1.0"):
        deepspeed_inference.DeepSpeedBackend(tmp_path, "fp16", "cuda:0", tp=1, max_tokens=128)


def test_missing_mii_skips_the_backend_in_a_session(pytester, neox_cache_dir, preloaded, deepspeed_cpu_offers):
    deepspeed_cpu_offers("fp32", "bf16", "fp16")      # the skip line names the dtype: same on every CPU make
    pytester.makeconftest("""
        import sys
        sys.modules["mii"] = None
        sys.modules["mii.legacy"] = None
    """)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.neox_engines("mii")
        def test_mii(neox):
            neox.backend("mii")
    """)
    result = pytester.runpytest("--neox-model=pythia-14m", "--neox-weights=synthetic",
                                f"--neox-cache-dir={neox_cache_dir}", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*mii (fp16): deepspeed-mii is not importable*pytest-neoxmii[[]mii[]]*"])


def test_weights_that_do_not_match_their_config_fail_each_test_in_one_line_and_load_once(
        pytester, neox_cache_dir, preloaded, monkeypatch):
    """A checkpoint whose config no longer matches its weights (whole files: the start-up check passes) was a
    transformers traceback in every test needing the reference, each one loading it again."""
    import json
    import shutil
    from pytest_neoxmii.backends import hf
    from pytest_neoxmii.registry import lookup
    from pytest_neoxmii.weights import synthetic_directory
    model = pytester.path / "mismatched"
    shutil.copytree(synthetic_directory(lookup("pythia-14m"), 0, neox_cache_dir), model)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    loads = []
    real = hf.load_hf_model
    pytester.makepyfile("""
        def test_one(neox):
            neox.reference()

        def test_two(neox):
            neox.reference()
    """)
    monkeypatch.setattr(hf, "load_hf_model", lambda *a: loads.append(a) or real(*a))
    result = pytester.runpytest(f"--neox-model={model}", "--neox-backends=hf", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    line = (f"hf (fp32) failed to deploy: transformers could not load '{model}': RuntimeError: Error(s) in "
            "loading state_dict for Linear: size mismatch for weight: copying a param with shape "
            "torch.Size([128, 512]) from checkpoint, the shape in current model is torch.Size([128, 1024]).")
    text = result.stdout.str()
    assert text.count(line) >= 3, text                  # each test's failure, and the summary's CRASH line
    assert "Traceback" not in text and "pytest_neoxmii/" not in text
    assert "During handling of the above exception" not in text      # the first test's failure: no chain
    assert len(loads) == 1


@pytest.mark.parametrize("raised, outcome", [
    (RuntimeError("Error(s) in loading state_dict for Linear:\n\tsize mismatch for weight: (2, 3) against (2, 6)."),
     "MII could not deploy '{path}': RuntimeError: Error(s) in loading state_dict for Linear: size mismatch for "
     "weight: (2, 3) against (2, 6)."),
    (ImportError("No module named 'a_dependency_of_mii'"), ImportError),
])
def test_an_mii_deployment_failing_to_load_the_checkpoint_is_one_line(monkeypatch, neox_cache_dir, capsys,
                                                                      raised, outcome):
    """MII loads the checkpoint itself (its pipeline): what it raises is the deployment's failure in one line,
    its traceback kept in the worker's log (the process's stderr); an ImportError stays the engine's skip."""
    import types
    from pytest_neoxmii.backends.mii_legacy import MiiBackend
    from pytest_neoxmii.deploy.processes import DeploymentError
    from pytest_neoxmii.registry import lookup
    from pytest_neoxmii.weights import synthetic_directory

    def deploy(**kwargs):
        raise raised
    # MII as the backend sees it (mii.legacy), whose deploy fails: no MII needed, nothing deployed here
    monkeypatch.setattr(mii_legacy, "import_mii", lambda: types.SimpleNamespace(
        deploy=deploy, DeploymentType=types.SimpleNamespace(NON_PERSISTENT="NON_PERSISTENT")))
    # what a worker sets up for the process before MII deploys: not this test process's business
    monkeypatch.setattr(mii_legacy, "init_distributed_env", lambda device: None)
    monkeypatch.setattr(mii_legacy.compat, "install", lambda: None)
    path = synthetic_directory(lookup("pythia-14m"), 0, neox_cache_dir)
    expected = DeploymentError if isinstance(outcome, str) else outcome
    with pytest.raises(expected) as info:
        MiiBackend(path, "fp32", "cpu", tp=1, max_tokens=64)
    if isinstance(outcome, str):
        assert str(info.value) == outcome.format(path=path)
        assert "Traceback" in capsys.readouterr().err
    else:
        assert info.value is raised


def test_in_brief_is_the_type_and_the_first_lines_of_the_message():
    from pytest_neoxmii.errors import in_brief
    assert in_brief(RuntimeError("one\n\n  two  \nthree")) == "RuntimeError: one two"
    assert in_brief(RuntimeError("one\ntwo\nthree"), lines=1) == "RuntimeError: one"
    assert in_brief(KeyError()) == "KeyError"


def test_first_line_is_the_first_line_said_without_the_type():
    from pytest_neoxmii.errors import first_line
    assert first_line(RuntimeError("\n  one  \ntwo")) == "one"
    assert first_line(OSError("[Errno 28] no space")) == "[Errno 28] no space"
    assert first_line(KeyError()) == "KeyError" and first_line(ValueError(" \n ")) == "ValueError"


def test_in_brief_of_a_message_embedding_a_traceback_says_the_embedded_error():
    """transformers' pipeline (MII's loader) puts each failed attempt's traceback in its ValueError's message."""
    from pytest_neoxmii.errors import in_brief
    message = ("Could not load model /m with any of the following classes: (A, B). See the original errors:\n\n"
               "while loading with A, an error is thrown:\nTraceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    load()\n'
               "RuntimeError: Error(s) in loading state_dict for Linear:\n\tsize mismatch for weight: (2, 3).\n\n"
               "while loading with B, an error is thrown:\nTraceback (most recent call last):\n"
               '  File "y.py", line 2, in g\nOSError: other\n')
    assert in_brief(ValueError(message)) == (
        "ValueError: Could not load model /m with any of the following classes: (A, B). See the original errors: ... "
        "RuntimeError: Error(s) in loading state_dict for Linear: size mismatch for weight: (2, 3).")
    assert in_brief(ValueError("no error after it\nTraceback (most recent call last):\n  File \"z.py\"")) == \
        "ValueError: no error after it"
    assert in_brief(ValueError("one line error\nTraceback (most recent call last):\n  File \"z\"\nKeyError: 'k'\n"
                               "not indented")) == "ValueError: one line error ... KeyError: 'k'"
    assert in_brief(OSError("Traceback (most recent call last):\n  File \"z\"\nKeyError: 'k'")) == "OSError: KeyError: 'k'"



@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_the_one_loader_gives_the_dtype_asked_for_without_transformers_deprecation(neox_cache_dir, dtype, caplog):
    """`dtype=`, not `torch_dtype=` (transformers 4.57 logged "`torch_dtype` is deprecated!" at every load)."""
    import logging

    import torch

    from pytest_neoxmii.backends.hf import load_hf_model
    logging.Logger.warning_once.cache_clear()      # transformers says each warning once per process
    from pytest_neoxmii.registry import lookup
    from pytest_neoxmii.weights import synthetic_directory
    model = load_hf_model(synthetic_directory(lookup("pythia-14m"), 0, neox_cache_dir), dtype, "cpu")
    assert {p.dtype for p in model.parameters()} == {getattr(torch, {"fp32": "float32", "fp16": "float16",
                                                                    "bf16": "bfloat16"}[dtype])}
    assert "deprecated" not in caplog.text


NO_LIBAIO = ("--neox-zero-nvme needs DeepSpeed's async_io op, which builds against libaio, and libaio's library and "
             "headers were not found (install libaio-dev, or libaio-devel); without --neox-zero-nvme ZeRO offloads "
             "to CPU memory")


def test_zero_on_nvme_without_libaio_is_unavailable_in_one_line_before_anything_loads(monkeypatch, tmp_path):
    """Before: deepspeed.initialize failed in the worker with a 40-line traceback ending in "Unable to JIT load the
    async_io op" (one H200 and the CPU machine, neither with libaio), and every ZeRO test failed with it."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from pytest_neoxmii.backends import zero_inference
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(BackendUnavailable) as info:     # (no model there: it must stop before loading one)
        zero_inference.ZeroInferenceBackend(tmp_path / "no-model", "fp16", "cpu", 128, nvme_path=tmp_path)
    assert str(info.value) == NO_LIBAIO
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    zero_inference.check_async_io()                    # libaio there: nothing to say
