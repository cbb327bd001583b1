"""The one dtype table (dtypes.py): every name the session uses maps to the torch and numpy dtype the
backends, the synthetic weights and the precision probe use, and reading the table imports no torch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_neoxmii import dtypes, precision
from pytest_neoxmii.dtypes import NUMPY_NAMES, TORCH_DTYPES, TORCH_NAMES


def test_each_session_dtype_is_one_torch_dtype():
    assert TORCH_DTYPES == {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    assert set(TORCH_NAMES) == set(precision.FALLBACK_ORDER)


def test_numpy_has_the_names_it_can_hold():
    assert {name: np.dtype(attr) for name, attr in NUMPY_NAMES.items()} == {"fp16": np.float16, "fp32": np.float32}
    assert "bf16" not in NUMPY_NAMES          # numpy has no bfloat16: a synthetic bf16 build must fail loudly


def test_the_precision_probe_reads_deepspeeds_names_through_the_table():
    assert {f"torch.{attr}" for attr in TORCH_NAMES.values()} == {str(d) for d in TORCH_DTYPES.values()}
    assert precision._TORCH_NAMES == {str(TORCH_DTYPES[n]): n for n in TORCH_NAMES}


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'TORCH_DTYPE'"):
        dtypes.TORCH_DTYPE


def test_importing_the_table_imports_no_torch():
    code = ("import sys; from pytest_neoxmii import dtypes, precision; from pytest_neoxmii.dtypes import NUMPY_NAMES; "
            "print('torch' in sys.modules)")
    root = str(Path(dtypes.__file__).resolve().parents[1])     # this checkout's package, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False", out.stderr
