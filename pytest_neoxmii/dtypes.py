"""The session's dtype names (fp16, bf16, fp32: options, baseline keys, reports) and what each one is in
torch and in numpy: one table for the whole package. Importing this module imports no torch; TORCH_DTYPES
does, when first read."""
from __future__ import annotations

TORCH_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}   # name -> torch attribute
NUMPY_NAMES = {name: attr for name, attr in TORCH_NAMES.items() if name != "bf16"}   # numpy has no bfloat16


def __getattr__(name: str):
    # PEP 562: `from pytest_neoxmii.dtypes import TORCH_DTYPES` imports torch only where it is asked for.
    if name == "TORCH_DTYPES":
        import torch
        return {key: getattr(torch, attr) for key, attr in TORCH_NAMES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
