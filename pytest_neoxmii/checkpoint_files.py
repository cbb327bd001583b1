"""Whether a checkpoint directory holds what every engine will load from it: weights (whole, in one file or
in the shards its index names) and a tokenizer. Checked when the session starts, from file names and
safetensors headers only (nothing is loaded), so that a partial copy or an interrupted download is one line
naming the file, instead of a transformers traceback in every test that needs the model."""
from __future__ import annotations

import json
import struct
from pathlib import Path

# What from_pretrained looks for, in its order: one file, or an index naming the shards.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def problem(path: Path) -> str | None:
    """Why `path` cannot be loaded as a checkpoint, in one line, or None."""
    present = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        return f"'{path}' has no weights: none of {', '.join(WEIGHT_FILES)}"
    first = path / present[0]
    if first.name.endswith(".index.json"):
        shards, why = _shards_of(first)
        if why:
            return why
    else:
        shards = [first]
    for shard in shards:
        if not shard.is_file():
            return f"'{first}' names the shard {shard.name}, which is not in '{path}'"
        if shard.suffix == ".safetensors":
            why = _safetensors_problem(shard)
            if why:
                return why
    if not ((path / "tokenizer.json").is_file()
            or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        return f"'{path}' has no tokenizer: neither tokenizer.json nor vocab.json with merges.txt"
    return None


# safetensors' names of the floating dtypes the sessions run in
_SAFETENSORS_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}


def stored_dtype(path: Path) -> str | None:
    """The one dtype every floating tensor of the checkpoint's safetensors files is stored in ("fp16",
    "bf16", "fp32"), from their headers; None for a checkpoint of several dtypes, of pickled weights (which
    are read, not mapped) or that cannot be read (problem() says why)."""
    present = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present or not present[0].startswith("model.safetensors"):
        return None
    first = path / present[0]
    shards = _shards_of(first)[0] if first.name.endswith(".index.json") else [first]
    found = set()
    for shard in shards:
        try:
            _, header = _header(shard, shard.stat().st_size)
            found |= {entry["dtype"] for name, entry in header.items()
                      if name != "__metadata__" and entry["dtype"].startswith(("F", "BF"))}
        except _UNREADABLE:
            return None
    return _SAFETENSORS_DTYPES.get(found.pop()) if len(found) == 1 else None


def _shards_of(index: Path) -> tuple[list[Path], str | None]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [], f"'{index}' is not a weight index ({type(exc).__name__}: {exc})"
    return [index.parent / name for name in names], None


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range, then
    the tensors: a file shorter or longer than its header says was not written whole."""
    size = file.stat().st_size
    try:
        header_len, header = _header(file, size)
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except _UNREADABLE as exc:
        return f"'{file}' is not a safetensors file: {exc}"
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return (f"'{file}' is {size} bytes where its header says {expected}: the file was not written whole "
                "(an interrupted copy or download?)")
    return None


_UNREADABLE = (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error)


def _header(file: Path, size: int) -> tuple[int, dict]:
    """A safetensors file's header length and its JSON header, each tensor's dtype, shape and byte range."""
    with file.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise ValueError(f"its header length ({header_len} bytes) runs past the file's end")
        return header_len, json.loads(f.read(header_len))
