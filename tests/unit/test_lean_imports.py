"""The plugin's own processes leave transformers' optional TensorFlow, JAX/Flax and scikit-learn paths
unimported (lean_imports.py); the session's process and a user's NEOXMII_LEAN_IMPORTS=0 keep them."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import types

from pytest_neoxmii import after_import, lean_imports
from pytest_neoxmii.deploy import processes

# What transformers decides in a child started with `env`: whether it finds scikit-learn and Flax.
PROBE = ("from transformers.utils import is_flax_available, is_sklearn_available; "
         "print(is_sklearn_available(), is_flax_available())")


def _fake_distribution(root, module: str, dist: str, version: str) -> None:
    """An installed-looking package: importable, and with the metadata transformers reads its version from."""
    (root / module).mkdir()
    (root / module / "__init__.py").write_text(f"__version__ = {version!r}\n")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


def _probe(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_a_deployments_processes_find_neither_sklearn_nor_flax_installed(tmp_path, monkeypatch):
    for module, dist, version in (("sklearn", "scikit-learn", "1.5.0"), ("flax", "flax", "0.8.0"),
                                  ("jax", "jax", "0.4.30")):
        _fake_distribution(tmp_path, module, dist, version)
    # Installed as transformers looks for them (a module spec and a distribution's version), so that it would
    # find them without the switches: one child process less than asking transformers itself (5 s each here).
    monkeypatch.syspath_prepend(str(tmp_path))
    for module, dist, version in (("sklearn", "scikit-learn", "1.5.0"), ("flax", "flax", "0.8.0"),
                                  ("jax", "jax", "0.4.30")):
        assert importlib.util.find_spec(module) is not None and importlib.metadata.version(dist) == version
    # before whatever the session's PYTHONPATH holds (a GPU machine's transformers 4.57 may be one of them)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    for key in (lean_imports.SWITCH_ENV, "USE_FLAX", "USE_TF"):
        monkeypatch.delenv(key, raising=False)
    assert _probe(processes.deployment_env("t")) == "False False"


def test_with_the_users_switch_off_a_deployment_gets_neither_the_switches_nor_the_hook(monkeypatch):
    monkeypatch.setenv(lean_imports.SWITCH_ENV, "0")
    for key in ("USE_FLAX", "USE_TF"):
        monkeypatch.delenv(key, raising=False)
    env = processes.deployment_env("t")
    assert "USE_FLAX" not in env and "USE_TF" not in env
    before = {k: list(v) for k, v in after_import._finder().callbacks.items()}
    lean_imports.install()
    assert {k: list(v) for k, v in after_import._finder().callbacks.items()} == before


def test_the_switches_never_override_the_users_own():
    env = lean_imports.child_env({"USE_FLAX": "1", "PATH": "/bin"})
    assert env == {"USE_FLAX": "1", "USE_TF": "0", "PATH": "/bin"}
    assert lean_imports.child_env({lean_imports.SWITCH_ENV: "0"}) == {lean_imports.SWITCH_ENV: "0"}


def test_a_callback_runs_after_the_first_import_and_at_once_for_a_module_already_imported(tmp_path,
                                                                                           monkeypatch):
    (tmp_path / "neoxmii_probe_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def callback(module):
        seen.append(module.VALUE)
        module.VALUE += 10

    monkeypatch.delitem(sys.modules, "neoxmii_probe_module", raising=False)
    try:
        after_import.arm("neoxmii_probe_module", callback)
        after_import.arm("neoxmii_probe_module", callback)       # once per callback
        assert seen == []
        import neoxmii_probe_module
        assert seen == [1] and neoxmii_probe_module.VALUE == 11
        after_import.arm("neoxmii_probe_module", callback)       # imported already: now
        assert seen == [1, 11]
    finally:
        sys.modules.pop("neoxmii_probe_module", None)
        finder = after_import._finder()
        finder.callbacks.pop("neoxmii_probe_module", None)


def test_the_sklearn_decision_is_set_only_where_transformers_keeps_it():
    module = types.SimpleNamespace(_sklearn_available=True)
    lean_imports._without_sklearn(module)
    assert module._sklearn_available is False
    other = types.SimpleNamespace()
    lean_imports._without_sklearn(other)
    assert not hasattr(other, "_sklearn_available")
