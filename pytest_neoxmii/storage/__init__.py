"""Baselines kept in the user's repository (baselines/): latency samples and golden outputs per model,
weights, dtype, backend and tensor-parallel degree, and inside each file per GPU class."""
from .schema import SCHEMA_NAME, SCHEMA_VERSION, BaselineKey, validate_document
from .store import BaselineStore, sanitize_component

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "BaselineKey",
    "BaselineStore",
    "sanitize_component",
    "validate_document",
]
