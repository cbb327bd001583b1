"""Where a model's files come from: a local directory, the hub cache (or the hub), or seeded synthetic
weights built in the real architecture. Every backend then loads the same directory with from_pretrained,
so HF, DeepSpeed and MII read the same files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from pytest_neoxmii.errors import NeoxUsageError
from pytest_neoxmii.registry import MODELS, ModelSpec, lookup, spec_from_hf_config

# Bump when the synthetic initialisation changes: it is part of the cache key and of the baseline key,
# so old baselines are never compared with new weights.
# v2: v1 put the seed in bits 32-63 of each tensor's generator seed, which torch's CPU generator drops, so
# every seed gave the seed-0 weights. v2 weights of seed 0 are bit-identical to v1's; other seeds differ.
SYNTHETIC_VERSION = 2
# Std of the logits of the synthetic output layer. A freshly initialised GPT-NeoX (std 0.02) gives nearly
# uniform next-token distributions, which makes greedy comparisons meaningless. Measured on the 14m shape
# (4x64 random prompts): std 4 gives a median top-1 probability of 0.17 and 8.6% near-ties (gap < 0.1 nat);
# std 8 gives 0.56 and 3.5%, about what a trained model shows, with the occasional near-tie kept on purpose.
SYNTHETIC_LOGIT_STD = 8.0
PROVENANCE_FILE = "neoxmii_synthetic.json"
FIXED_TEXT = (Path(__file__).parent / "data" / "fixed_text.txt").read_text().split()


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
            return (f"synthetic weights (seed {self.seed}, generator v{SYNTHETIC_VERSION}) in the "
                    f"{self.spec.name} shape")
        if self.source == "hub":
            return f"real weights {self.spec.hub_id}@{self.revision} from the hub cache"
        return f"weights from local directory {self.path}"


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NeoxUsageError(f"'{path}' is not a GPT-NeoX model directory: {first}") from None
    return spec_from_hf_config(config, path.name)


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
    """The generator seed of one tensor. torch's CPU generator (mt19937) keeps only the low 32 bits of its
    seed, so the session seed (folded to 32 bits) is the CRC's starting value: for one tensor name, seeds
    0 .. 2**32-1 always give different generator seeds (a CRC is a bijection of its starting value), and
    seed 0 gives crc32(name), as in v1."""
    return zlib.crc32(name.encode(), (seed ^ (seed >> 32)) & 0xFFFFFFFF)


def _init_tensor(name: str, shape: tuple[int, ...], spec: ModelSpec, seed: int):
    """One tensor of the synthetic model, seeded by (seed, name) alone so that it is the same on every
    machine and does not depend on the order tensors are built in. Generated on the CPU in fp32."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name))
    t = torch.empty(shape, dtype=torch.float32)
    if name.endswith("layernorm.weight") or name.endswith("final_layer_norm.weight"):
        return t.normal_(1.0, 0.05, generator=gen)
    if name.endswith(".bias"):
        return t.normal_(0.0, 0.02, generator=gen)
    if name.endswith("embed_in.weight"):
        return t.normal_(0.0, 1.0, generator=gen)
    if name.endswith("embed_out.weight"):
        return t.normal_(0.0, SYNTHETIC_LOGIT_STD / spec.hidden_size ** 0.5, generator=gen)
    # Linear layers: std 1/sqrt(fan_in) keeps each branch's output at unit scale, so attention and MLP
    # matter as much as the embedding (with std 0.02 the model would be a bigram table).
    return t.normal_(0.0, 1.0 / shape[-1] ** 0.5, generator=gen)


def synthetic_state_dict(spec: ModelSpec, seed: int, dtype: str = "fp16"):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**spec.hf_config_dict())
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPTNeoXForCausalLM(config).state_dict().items()}
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return {name: _init_tensor(name, shape, spec, seed).to(torch_dtype) for name, shape in shapes.items()}


def fingerprint(state_dict) -> str:
    """SHA-256 over every tensor's name, shape, dtype and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


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
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            save_synthetic(spec, seed, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def save_synthetic(spec: ModelSpec, seed: int, directory: Path) -> str:
    """Write config.json, model.safetensors, the tokenizer and a provenance file; return the fingerprint."""
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig

    directory.mkdir(parents=True, exist_ok=True)
    state = synthetic_state_dict(spec, seed)
    digest = fingerprint(state)
    GPTNeoXConfig(**spec.hf_config_dict()).save_pretrained(str(directory))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    del state
    synthetic_tokenizer(spec.vocab_size).save_pretrained(str(directory))
    (directory / PROVENANCE_FILE).write_text(json.dumps({
        "kind": "synthetic", "architecture": spec.name, "seed": seed,
        "generator_version": SYNTHETIC_VERSION, "logit_std": SYNTHETIC_LOGIT_STD,
        "fingerprint_sha256": digest,
        "note": "seeded random weights in the real architecture, not a trained model",
    }, indent=2, sort_keys=True) + "\n")
    return digest


def materialize(model: ResolvedModel, cache_dir: Path) -> ResolvedModel:
    """The model with a directory on disk (building synthetic weights if needed)."""
    if model.path is not None:
        return model
    from dataclasses import replace
    return replace(model, path=build_synthetic(model.spec, model.seed, cache_dir))
