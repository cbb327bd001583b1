#!/usr/bin/env bash
# Sets up .venv for a CPU-only machine: torch's CPU build, transformers 4.57, DeepSpeed 0.19.8 (an sdist
# whose build imports torch, hence --no-build-isolation), DeepSpeed-MII 0.3.3 without its broken dependency
# list plus what it really needs (the [mii] extra), and this plugin in editable mode.
# TORCH_SPEC picks the torch to install first (default torch==2.13.0, whose CPU wheel this project's
# machines carry locally; elsewhere point pip at PyTorch's CPU wheel index, or pip would fetch a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
# Three pip runs, not five (each run starts pip and reads the indexes again), and no byte-compiling of every
# installed file (torch and transformers are thousands of modules): Python compiles the ones a run imports,
# once, unless PYTHONDONTWRITEBYTECODE forbids it to keep them; then pip compiles everything up front.
# setuptools >= 70.1 builds wheels without the `wheel` package; >= 77 reads the SPDX license (pyproject.toml).
compile=--no-compile
[ -z "${PYTHONDONTWRITEBYTECODE:-}" ] || compile=--compile
pip install -q $compile --upgrade pip "setuptools>=77" "${TORCH_SPEC:-torch==2.13.0}" numpy
pip install -q $compile --no-build-isolation "deepspeed==0.19.8" -e ".[mii,test]"
pip install -q $compile --no-deps "deepspeed-mii==0.3.3"
.venv/bin/python - <<'PY'
import importlib.metadata as m
print("installed:", ", ".join(f"{d} {m.version(d)}" for d in
      ("torch", "transformers", "deepspeed", "deepspeed-mii", "pytest", "pytest-benchmark")))
PY
