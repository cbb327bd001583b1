"""A small plain-text aligned table, used by parity failure messages and the terminal summary.

No dependencies: pytest output is plain text, and a failure message must read the same in a terminal,
a CI log and a JUnit XML file."""
from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["format_markdown_table", "format_table", "format_value"]

_SEPARATOR = "  "


def format_value(value: object) -> str:
    """One cell as text. Floats are compact: 0 stays "0"; magnitudes below 1e-3 or at/above 1e5 use
    scientific notation with 3 significant digits ("1.23e-05"); anything else 4 significant digits
    ("0.1235", "12.35"), no decimals from 1000 to 1e5 ("7749"). None is "-", booleans "yes"/"no"."""
    if value is None:
        return "-"
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:   # 0-d torch / numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        x = float(value)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x == 0.0:
            return "0"
        if abs(x) < 1e-3 or abs(x) >= 1e5:
            return f"{x:.2e}"
        if abs(x) >= 1e3:
            return f"{x:.0f}"
        return f"{x:.4g}"
    text = str(value)
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text


def _is_numeric(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """Headers, a dashed rule, then one line per row. Numeric columns are right-aligned, text left-aligned.

    Every row must have as many cells as there are headers. Trailing spaces are stripped from each line."""
    headers = [str(h) for h in headers]
    ncols = len(headers)
    if ncols == 0:
        raise ValueError("format_table needs at least one header")
    for i, row in enumerate(rows):
        if len(row) != ncols:
            raise ValueError(f"format_table: row {i} has {len(row)} cells, expected {ncols} (headers {headers})")

    cells = [[format_value(v) for v in row] for row in rows]
    # A column is right-aligned when every non-empty cell in it is a number.
    right = []
    for c in range(ncols):
        values = [row[c] for row in rows if row[c] is not None]
        right.append(bool(values) and all(_is_numeric(v) for v in values))
    widths = [max([len(headers[c])] + [len(r[c]) for r in cells]) for c in range(ncols)]

    def line(parts: list[str]) -> str:
        out = []
        for c, text in enumerate(parts):
            out.append(text.rjust(widths[c]) if right[c] else text.ljust(widths[c]))
        return _SEPARATOR.join(out).rstrip()

    lines = [line(headers), _SEPARATOR.join("-" * w for w in widths)]
    lines.extend(line(r) for r in cells)
    return "\n".join(lines)


def format_markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """The same table as GitHub-flavoured Markdown (numeric columns right-aligned, '|' in a cell escaped)."""
    if not headers:
        raise ValueError("format_markdown_table needs at least one header")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"format_markdown_table: row {i} has {len(row)} cells, expected {len(headers)}")

    def cell(value: object) -> str:
        return format_value(value).replace("|", "\\|")

    right = []
    for c in range(len(headers)):
        values = [row[c] for row in rows if row[c] is not None]
        right.append(bool(values) and all(_is_numeric(v) for v in values))
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
