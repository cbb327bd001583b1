"""Where a model's files come from: a local directory, the hub cache (or the hub), or seeded synthetic
weights built in the real architecture. Every backend then loads the same directory with from_pretrained,
so HF, DeepSpeed and MII read the same files."""
from __future__ import annotations

import collections
import errno
import functools
import hashlib
import json
import math
import os
import secrets
import shutil
import statistics
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pytest_neoxmii import checkpoint_files
from pytest_neoxmii.dtypes import NUMPY_NAMES
from pytest_neoxmii.errors import NeoxUsageError, first_line
from pytest_neoxmii.fixed_text import FIXED_TEXT
from pytest_neoxmii.registry import MODELS, ModelSpec, lookup, spec_from_hf_config

# Bump when the synthetic initialisation changes: it is part of the cache key and of the baseline key,
# so old baselines are never compared with new weights.
# v2: v1 put the seed in bits 32-63 of each tensor's generator seed, which torch's CPU generator drops, so
# every seed gave the seed-0 weights. v2 weights of seed 0 are bit-identical to v1's; other seeds differ.
# v3: built at disk speed (torch's mt19937 normal_ made about 33 M parameters/s, 12 minutes for
# gpt-neox-20b): each chunk of a tensor is 16-bit uniforms from its own SFC64 stream mapped through a table
# of normal quantiles, chunks are made in parallel and streamed into the safetensors file, and the
# fingerprint hashes chunk digests. Same means and stds per tensor kind as v2; different values.
SYNTHETIC_VERSION = 3
SYNTHETIC_LOGIT_STD = 8.0
PROVENANCE_FILE = "neoxmii_synthetic.json"


@dataclass(frozen=True)
class ResolvedModel:
    """The model a session tests: its architecture, the directory every loader reads, and what kind of
    weights those are (said everywhere a result is shown or stored)."""

    spec: ModelSpec
    source: str                  # "synthetic", "local" or "hub"
    weights_key: str             # baseline key part: "synthetic-seed0-v1", "hub@<commit>", "local@<digest>"
    path: Path | None = None     # None until a synthetic model is built
    revision: str | None = None
    seed: int | None = None

    def describe(self) -> str:
        if self.source == "synthetic":
            return synthetic_words(self.seed, SYNTHETIC_VERSION, self.spec.name)
        if self.source == "hub":
            return f"real weights {self.spec.hub_id}@{self.revision} from the hub cache"
        built = synthetic_provenance(self.path) if self.path is not None else None
        if built is not None:      # a copy of a synthetic build (a CI cache, a shared folder): never "real"
            words = synthetic_words(built.get("seed"), built.get("generator_version"), built.get("architecture"))
            return f"{words}, from local directory {self.path}"
        return f"weights from local directory {self.path}"


def synthetic_words(seed, generator_version, shape) -> str:
    """How every header, report and figure names synthetic weights."""
    return f"synthetic weights (seed {seed}, generator v{generator_version}) in the {shape} shape"


def synthetic_provenance(directory: Path) -> dict | None:
    """What build_synthetic wrote beside the weights it built (seed, generator, architecture), or None for a
    directory it did not build."""
    try:
        found = json.loads((directory / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("kind") == "synthetic" else None


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pytest-neoxmii"


def resolve(model: str, weights: str, revision: str | None, seed: int, cache_dir: Path) -> ResolvedModel:
    """Cheap resolution (no weights loaded, nothing built): raises NeoxUsageError for bad input."""
    if weights not in ("auto", "synthetic"):
        raise NeoxUsageError(f"--neox-weights must be 'auto' or 'synthetic', got '{weights}'")
    local = Path(model).expanduser()
    if weights == "synthetic":
        spec = _spec_of_directory(local) if local.is_dir() else lookup(model)
        return ResolvedModel(spec=spec, source="synthetic", seed=seed,
                             weights_key=f"synthetic-seed{seed}-v{SYNTHETIC_VERSION}")
    if local.is_dir():
        spec = _spec_of_directory(local)
        _check_loadable(local)
        return ResolvedModel(spec=spec, source="local", path=local.resolve(),
                             weights_key=f"local@{_directory_digest(local)}")
    if "/" not in model or model.lower() in {s.hub_id.lower() for s in MODELS.values()}:
        spec = lookup(model)           # a registry name or a registered hub id; unknown names fail here
        hub_id = spec.hub_id
    else:
        hub_id, spec = model, None     # an unregistered hub id: its config decides the architecture
    path = _hub_snapshot(hub_id, revision or "main")
    if spec is None:
        spec = _spec_of_directory(path)
    _check_loadable(path)
    commit = path.name
    return ResolvedModel(spec=spec, source="hub", path=path, revision=commit,
                         weights_key=f"hub@{commit}")


def _spec_of_directory(path: Path) -> ModelSpec:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise NeoxUsageError(f"'{path}' is not a GPT-NeoX model directory: it has no config.json")
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # a broken or foreign config: say so in one line
        raise NeoxUsageError(f"'{path}' is not a GPT-NeoX model directory: {first_line(exc)}") from None
    return spec_from_hf_config(config, path.name)


def _check_loadable(path: Path) -> None:
    why = checkpoint_files.problem(path)
    if why:
        raise NeoxUsageError(why)


def _directory_digest(path: Path) -> str:
    # Config plus weight file names and sizes: cheap, and changes whenever a checkpoint is replaced.
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]


def _hub_snapshot(hub_id: str, revision: str) -> Path:
    """The hub cache's snapshot directory; downloads only when the hub is reachable and allowed."""
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:
        pass
    hint = ("pass --neox-weights=synthetic to test the architecture with seeded synthetic weights, "
            "or a local model directory as --neox-model")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise NeoxUsageError(f"{hub_id}@{revision} is not in the hub cache and HF_HUB_OFFLINE is set: {hint}")
    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        reason = type(exc).__name__
        raise NeoxUsageError(f"{hub_id}@{revision} is not in the hub cache and could not be downloaded "
                             f"({reason}): {hint}") from None


# ----------------------------------------------------------------------------------------------------------
# Synthetic weights
# ----------------------------------------------------------------------------------------------------------

def synthetic_tokenizer(vocab_size: int):
    """A deterministic word-level tokenizer covering every id of the vocabulary, so that any generated id
    decodes to text and re-encodes to the same id (a byte-level tokenizer covers ids 0-256 only, and MII's
    text-in/text-out path would lose the rest). Words of the fixed text come first, then 'w<id>' fillers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|padding|>": 1}
    for word in FIXED_TEXT:
        if word not in vocab and len(vocab) < vocab_size:
            vocab[word] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|padding|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|padding|>",
                                   pad_token="<|padding|>", padding_side="left",
                                   model_max_length=1 << 30)


def _tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's streams: the session seed (folded to 32 bits) is the CRC's starting value,
    so for one tensor name seeds 0 .. 2**32-1 always give different tensor seeds (a CRC is a bijection of
    its starting value)."""
    return zlib.crc32(name.encode(), (seed ^ (seed >> 32)) & 0xFFFFFFFF)


# Elements per chunk: each chunk of a tensor is drawn from its own stream, SFC64(SeedSequence([tensor seed,
# chunk index])), so chunks can be made in any order, on any number of threads, with the same result. Part of
# the weights' definition (changing it changes every weight): bump SYNTHETIC_VERSION with it.
CHUNK = 1 << 22
QUANTILE_BITS = 16


def _distribution(name: str, shape: tuple[int, ...], spec: ModelSpec) -> tuple[float, float]:
    """Mean and std of one tensor's elements."""
    if name.endswith("layernorm.weight") or name.endswith("final_layer_norm.weight"):
        return 1.0, 0.05
    if name.endswith(".bias"):
        return 0.0, 0.02
    if name.endswith("embed_in.weight"):
        return 0.0, 1.0
    if name.endswith("embed_out.weight"):
        return 0.0, SYNTHETIC_LOGIT_STD / spec.hidden_size ** 0.5
    # Linear layers: std 1/sqrt(fan_in) keeps each branch's output at unit scale, so attention and MLP
    # matter as much as the embedding (with std 0.02 the model would be a bigram table).
    return 0.0, 1.0 / shape[-1] ** 0.5


@functools.lru_cache(maxsize=1)
def _unit_normal_quantiles():
    """The 2**16 mid-point quantiles of the standard normal (|x| <= 4.33), rescaled to unit variance.
    Pure Python (statistics, math.fsum): the same doubles on every machine."""
    import numpy as np

    levels = 1 << QUANTILE_BITS
    normal = statistics.NormalDist()
    q = [normal.inv_cdf((i + 0.5) / levels) for i in range(levels)]
    scale = math.sqrt(math.fsum(x * x for x in q) / levels)
    return np.array([x / scale for x in q], dtype=np.float64)


def _table(mean: float, std: float, dtype: str):
    import numpy as np
    return (_unit_normal_quantiles() * std + mean).astype(NUMPY_NAMES[dtype])


def _chunk(table, tensor_seed: int, index: int, count: int):
    """Elements [index * CHUNK, index * CHUNK + count) of one tensor: 16-bit uniforms through the table."""
    import numpy as np
    words = np.random.SFC64(np.random.SeedSequence([tensor_seed, index])).random_raw(-(-count // 4))
    return table[words.astype("<u8", copy=False).view("<u2")[:count]]


def _chunk_counts(numel: int) -> list[int]:
    return [min(CHUNK, numel - start) for start in range(0, numel, CHUNK)]


@functools.lru_cache(maxsize=4)
def _tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**spec.hf_config_dict())
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPTNeoXForCausalLM(config).state_dict().items()}


def synthetic_state_dict(spec: ModelSpec, seed: int, dtype: str = "fp16"):
    """The synthetic weights in memory (small models and tests; build_synthetic streams them to disk)."""
    import numpy as np
    import torch

    generated = "fp32" if dtype == "bf16" else dtype      # numpy has no bf16: generate fp32, then cast
    state = {}
    for name, shape in _tensor_shapes(spec).items():
        table = _table(*_distribution(name, shape, spec), generated)
        tseed = _tensor_seed(seed, name)
        parts = [_chunk(table, tseed, i, n) for i, n in enumerate(_chunk_counts(math.prod(shape)))]
        flat = np.concatenate(parts) if parts else np.empty(0, table.dtype)
        t = torch.from_numpy(flat).reshape(shape)
        state[name] = t.to(torch.bfloat16) if dtype == "bf16" else t
    return state


def _chunk_digest(data) -> bytes:
    return hashlib.sha256(memoryview(data).cast("B")).digest()


def _fingerprint_from_digests(entries) -> str:
    """entries: (name, shape, dtype string, [chunk digests]) in name order."""
    h = hashlib.sha256()
    for name, shape, dtype, digests in entries:
        h.update(f"{name}|{tuple(shape)}|{dtype}|".encode())
        h.update(hashlib.sha256(b"".join(digests)).digest())
    return h.hexdigest()


def fingerprint(state_dict) -> str:
    """SHA-256 over every tensor's name, shape, dtype and the SHA-256 of its chunk digests (a chunk is
    CHUNK elements), in name order. Chunks hash independently, so the builder hashes them in parallel."""
    import torch

    entries = []
    for name in sorted(state_dict):
        t = state_dict[name].contiguous().view(-1)
        raw = t.view(dtype=torch.uint8).numpy().reshape(t.numel(), t.element_size())
        digests = [_chunk_digest(raw[start:start + n]) for start, n in
                   zip(range(0, t.numel(), CHUNK), _chunk_counts(t.numel()))]
        entries.append((name, tuple(state_dict[name].shape), str(state_dict[name].dtype), digests))
    return _fingerprint_from_digests(entries)


def synthetic_directory(spec: ModelSpec, seed: int, cache_dir: Path) -> Path:
    config_digest = hashlib.sha256(json.dumps(spec.hf_config_dict(), sort_keys=True).encode()).hexdigest()
    return cache_dir / "synthetic" / f"{spec.name}-seed{seed}-v{SYNTHETIC_VERSION}-{config_digest[:10]}"


def build_synthetic(spec: ModelSpec, seed: int, cache_dir: Path) -> Path:
    """Build (once; later sessions reuse it) a normal HF model directory with seeded synthetic fp16 weights
    and the deterministic tokenizer. Built in a temporary directory and renamed into place under a lock, so
    concurrent sessions never see a half-written model."""
    from filelock import FileLock

    target = synthetic_directory(spec, seed, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=1800):
        if (target / PROVENANCE_FILE).is_file():
            return target
        _check_room(spec, target.parent)
        # Made as any new directory is (0o777 minus the umask): mkdtemp's 0o700 kept everyone else out of
        # a cache shared on a multi-user machine (each later user: PermissionError loading the model).
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            save_synthetic(spec, seed, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


SPARE_BYTES = 256 * 2**20       # the tokenizer, config and provenance files, and some room left over


def _check_room(spec: ModelSpec, directory: Path) -> None:
    """Refuse before writing: without room, the file was written for minutes (gpt-neox-20b: 41 GB) and then
    failed on ENOSPC."""
    need, free = spec.weight_bytes("fp16") + SPARE_BYTES, shutil.disk_usage(directory).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{spec.name}'s synthetic weights need {need / 1e9:.2f} GB, and "
                                    f"{directory} has {free / 1e9:.2f} GB free")


def save_synthetic(spec: ModelSpec, seed: int, directory: Path) -> str:
    """Write config.json, model.safetensors, the tokenizer and a provenance file; return the fingerprint."""
    from transformers import GPTNeoXConfig

    directory.mkdir(parents=True, exist_ok=True)
    GPTNeoXConfig(**spec.hf_config_dict()).save_pretrained(str(directory))
    t0 = time.perf_counter()
    _tensor_shapes(spec), _unit_normal_quantiles()       # imports transformers: timed apart from the stream
    t1 = time.perf_counter()
    digest, written = write_synthetic_safetensors(spec, seed, directory / "model.safetensors")
    seconds = time.perf_counter() - t1
    synthetic_tokenizer(spec.vocab_size).save_pretrained(str(directory))
    (directory / PROVENANCE_FILE).write_text(json.dumps({
        "kind": "synthetic", "architecture": spec.name, "seed": seed,
        "generator_version": SYNTHETIC_VERSION, "logit_std": SYNTHETIC_LOGIT_STD,
        "fingerprint_sha256": digest,
        "build": {"bytes": written, "seconds": round(seconds, 3), "prepare_seconds": round(t1 - t0, 3),
                  "gb_per_s": round(written / seconds / 1e9, 3) if seconds > 0 else None,
                  "threads": _build_threads()},
        "note": "seeded random weights in the real architecture, not a trained model",
    }, indent=2, sort_keys=True) + "\n")
    return digest


def _build_threads() -> int:
    return max(1, min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))


def write_synthetic_safetensors(spec: ModelSpec, seed: int, path: Path, dtype: str = "fp16") -> tuple[str, int]:
    """Stream the synthetic weights into one safetensors file (the format: an 8-byte little-endian header
    length, a JSON header of dtype/shape/byte offsets per tensor, then the tensors' bytes back to back).
    Chunks are made on a thread pool (numpy releases the GIL) and written in order, with a bounded number in
    flight, so memory stays at a few hundred MB for any model size. Returns (fingerprint, bytes written)."""
    item = {"fp16": 2, "fp32": 4}[dtype]
    shapes = dict(sorted(_tensor_shapes(spec).items()))
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * item
        header[name] = {"dtype": {"fp16": "F16", "fp32": "F32"}[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)               # the data starts 8-byte aligned, as safetensors writes it

    def make(table, tseed, index, count):
        data = _chunk(table, tseed, index, count)
        return data, _chunk_digest(data)

    def jobs(pool):
        for name, shape in shapes.items():
            table = _table(*_distribution(name, shape, spec), dtype)
            tseed = _tensor_seed(seed, name)
            for index, count in enumerate(_chunk_counts(math.prod(shape))):
                yield name, pool.submit(make, table, tseed, index, count)

    threads = _build_threads()
    digests = {name: [] for name in shapes}
    written = 0
    with open(path, "wb") as f, ThreadPoolExecutor(threads) as pool:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        written += 8 + len(encoded)
        in_flight: collections.deque = collections.deque()
        for job in jobs(pool):
            in_flight.append(job)
            if len(in_flight) >= 2 * threads + 2:
                written += _write_next(f, in_flight, digests)
        while in_flight:
            written += _write_next(f, in_flight, digests)
    torch_dtype = {"fp16": "torch.float16", "fp32": "torch.float32"}[dtype]
    entries = [(name, shape, torch_dtype, digests[name]) for name, shape in shapes.items()]
    return _fingerprint_from_digests(entries), written


def _write_next(f, in_flight, digests) -> int:
    name, future = in_flight.popleft()
    data, digest = future.result()
    f.write(memoryview(data).cast("B"))
    digests[name].append(digest)
    return data.nbytes


def materialize(model: ResolvedModel, cache_dir: Path) -> ResolvedModel:
    """The model with a directory on disk (building synthetic weights if needed)."""
    if model.path is not None:
        return model
    from dataclasses import replace
    return replace(model, path=build_synthetic(model.spec, model.seed, cache_dir))
