"""The distribution users install: a wheel built from pyproject.toml holds every module of the package, its data
and the pytest11 entry point. The hand-written package list had lost pytest_neoxmii.checks, which only an
editable install (every setup here, .ci/run's too) did not miss: from a wheel the shipped suite could not
import its checks."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_a_wheel_holds_every_module_its_data_and_the_plugins_entry_point(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"           # built from a copy: the build writes build/ and egg-info beside its input
    shutil.copytree(ROOT / "pytest_neoxmii", source / "pytest_neoxmii",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "BuildBackendWarning" not in built.stderr, built.stderr
    (wheel,) = (tmp_path / "dist").glob("pytest_neoxmii-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(source).as_posix() for p in (source / "pytest_neoxmii").rglob("*")
               if p.is_file() and p.suffix in (".py", ".txt")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "pytest_neoxmii/checks/latency.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "[pytest11]\nneoxmii = pytest_neoxmii.plugin" in zipfile.ZipFile(wheel).read(entry_points).decode()
