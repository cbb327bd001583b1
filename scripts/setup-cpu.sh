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
pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
pip install -q "${TORCH_SPEC:-torch==2.13.0}" numpy
pip install -q --no-build-isolation "deepspeed==0.19.8"
pip install -q --no-deps "deepspeed-mii==0.3.3"
pip install -q --no-build-isolation -e ".[mii,test]"
.venv/bin/python - <<'PY'
import importlib.metadata as m
print("installed:", ", ".join(f"{d} {m.version(d)}" for d in
      ("torch", "transformers", "deepspeed", "deepspeed-mii", "pytest", "pytest-benchmark")))
PY
