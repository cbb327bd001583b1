"""The fixed English text, as words: the shipped cases slice their prompts from it (cases.py), and the
synthetic tokenizer takes its vocabulary from it (weights.py)."""
from __future__ import annotations

from pathlib import Path

FIXED_TEXT = (Path(__file__).parent / "data" / "fixed_text.txt").read_text().split()
