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
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise ValueError(f"its header length ({header_len} bytes) runs past the file's end")
            header = json.loads(f.read(header_len))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as exc:
        return f"'{file}' is not a safetensors file: {exc}"
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return (f"'{file}' is {size} bytes where its header says {expected}: the file was not written whole "
                "(an interrupted copy or download?)")
    return None
