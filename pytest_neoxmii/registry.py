"""Known GPT-NeoX / Pythia shapes, their parameter counts, and whether they fit the GPUs at hand.

The registry lets the plugin reason about a model (memory needed, config to build a reference)
without touching the model hub, which is often unreachable from test machines."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pytest_neoxmii.errors import NeoxUsageError

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}

# Per-GPU memory is (weights / tp + DeepSpeed's inference workspace) times this factor: the remaining 20%
# covers what neither counts (the CUDA context, communicators, the allocator's slack). A stated rule of
# thumb; the workspace is counted on its own (ModelSpec.ds_workspace_bytes), since it is no small part:
# 8.3 GB a GPU for gpt-neox-20b at tp=2, where a 1.2 x weights rule fell 20 GB short (docs/MULTI_GPU.md).
HEADROOM = 1.2

# What one engine process holds on its GPU besides tensors and DeepSpeed's workspace: the CUDA context, cuBLAS
# and the kernels' modules. Measured: 808 MiB for the ds worker of pythia-160m on one H200 (1976 MiB by process
# from nvidia-smi, 376 MiB of tensors, 792 MiB of workspace; torch 2.11, CUDA 13.0, synthetic weights). Added per
# GPU outside the headroom, since it does not grow with the model.
WORKER_RUNTIME_BYTES = 808 * 2**20

# What the test process holds on GPU 0 besides the HF models' tensors, kept once they are released: the CUDA
# context, cuBLAS's workspace, the allocator's leftovers. Measured: 724 MiB after releasing pythia-160m's fp32
# and fp16 models (1786 MiB with both loaded, 978 MiB of tensors; one H200, torch 2.11, CUDA 13.0, synthetic
# weights; docs/speed-round27/gpu-h200-test-process-runtime.txt).
TEST_PROCESS_RUNTIME_BYTES = 724 * 2**20

# DeepSpeed's inference workspace is sized from cudaMemGetInfo when it is allocated, and wants this much free
# beyond it (GenWorkSpace's minimal_requirements, where more than 1 GiB is free; inference_context.h): MII's
# rank, which asks for max_tokens at least, raised "Workspace can't be allocated" without it, on one H200
# shared with another job (docs/STACK.md trap 31). Needed free while an engine loads, counted once beside others.
DS_WORKSPACE_FREE_BYTES = 500 * 2**20

# What one process of a CPU session holds in host memory besides model weights: Python, torch, transformers,
# DeepSpeed, the activations of a short case. Measured on the 2-core Xeon (pythia-1b, synthetic weights, fp16
# session, all engines side by side): 277 MiB for the fork server, 301 and 330 MiB for the ds and mii workers,
# about 310 MiB beyond its weights for zero's and for the test process. Added per process outside the headroom.
HOST_RUNTIME_BYTES = 350 * 2**20

_GB = 1e9  # decimal gigabytes, as GPU vendors and nvidia-smi's marketing sizes use


def _check_dtype(dtype: str) -> str:
    key = dtype.lower() if isinstance(dtype, str) else dtype
    if key not in DTYPE_BYTES:
        raise NeoxUsageError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    return key


def _fmt_gb(n_bytes: float) -> str:
    gb = n_bytes / _GB
    # One decimal is enough for real GPUs and big models; small models keep 3 significant digits
    # so that a 14M-parameter model does not read as "0.0 GB".
    return f"{gb:.1f}" if gb >= 1 else f"{gb:.3g}"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}e9" if n >= 1e9 else f"{n / 1e6:.1f}e6"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # "pythia-160m", "pythia-160m-deduped", "gpt-neox-20b"
    hub_id: str  # "EleutherAI/pythia-160m"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    rotary_pct: float
    rotary_emb_base: int
    vocab_size: int  # the padded embedding size in config.json, not the tokenizer's 50277 tokens
    max_position_embeddings: int
    use_parallel_residual: bool
    tie_word_embeddings: bool
    published_params: int | None  # EleutherAI's published total; None for shapes outside the registry
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"

    def parameter_count(self) -> int:
        """Total parameters of transformers' GPTNeoXForCausalLM with this shape.

        Equals sum(p.numel() for p in model.parameters()); tests check it against a real model."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = (
            4 * h  # input and post-attention LayerNorm, weight + bias each
            + 3 * h * h + 3 * h  # fused query_key_value, with bias
            + h * h + h  # attention output projection
            + h * i + i  # dense_h_to_4h
            + i * h + h  # dense_4h_to_h
        )
        embed_in = v * h
        final_norm = 2 * h
        # embed_out has no bias; when tied it is the same tensor as embed_in and counts once.
        embed_out = 0 if self.tie_word_embeddings else v * h
        return embed_in + self.num_hidden_layers * per_layer + final_norm + embed_out

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        """Rotary dimensions per head, computed the way transformers' GPTNeoXAttention.rotary_ndims is
        (DeepSpeed's injected layers read that attribute)."""
        return int(self.head_size * self.rotary_pct)

    def weight_bytes(self, dtype: str) -> int:
        return self.parameter_count() * DTYPE_BYTES[_check_dtype(dtype)]

    def hf_config_dict(self) -> dict:
        """Keyword arguments for transformers.GPTNeoXConfig, matching the published config.json."""
        return {
            "model_type": "gpt_neox",
            "architectures": ["GPTNeoXForCausalLM"],
            "bos_token_id": 0,
            "eos_token_id": 0,
            "attention_bias": True,
            "use_cache": True,
            "initializer_range": 0.02,
            "torch_dtype": "float16",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_emb_base,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "use_parallel_residual": self.use_parallel_residual,
            "tie_word_embeddings": self.tie_word_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
        }

    def ds_workspace_bytes(self, dtype: str, tp: int, max_tokens: int, batch: int) -> int:
        """The inference workspace DeepSpeed's injected kernels allocate on each GPU at the first forward,
        for `batch` sequences of up to `max_tokens` tokens, where the GPU has room for all of them
        (InferenceContext::GenWorkSpace, deepspeed 0.19.8): activations, attention scores and every layer's
        KV cache, with heads padded to 32, 64 or 128 for flash attention. Checked against the workspace a
        deployment really takes (deepspeed_inference.workspace_readings, a GPU test)."""
        dtype = _check_dtype(dtype)
        head = self.head_size
        padded = head if head > 128 else 32 if head <= 32 else 64 if head <= 64 else 128
        width = self.num_attention_heads * padded
        activations = 10 * width * batch
        scores = batch * (self.num_attention_heads // tp) * max_tokens
        kv_cache = self.num_hidden_layers * batch * (width // tp) * 2
        return (activations + scores + kv_cache) * max_tokens * DTYPE_BYTES[dtype]

    def per_gpu_bytes(self, dtype: str, tp: int, workspace_bytes: int = 0, runtime_bytes: int = 0,
                      scoring_bytes: int = 0) -> float:
        """What one GPU of a deployment needs, in the fit arithmetic: (weights / tp + workspace) x HEADROOM
        + runtime + scoring (see fits)."""
        return (self.weight_bytes(dtype) / tp + workspace_bytes) * HEADROOM + runtime_bytes + scoring_bytes

    def uneven_heads(self, tp: int) -> str | None:
        """Why DeepSpeed's injected kernels cannot run this model at `tp`, or None: they split the attention
        heads evenly among the GPUs (DeepSpeed asserts it in create_ds_model_config, inside the deployment)."""
        if self.num_attention_heads % tp:
            return (f"{self.name} has {self.num_attention_heads} attention heads, which --neox-tp={tp} does not "
                    "divide: DeepSpeed's injected kernels split the heads evenly among the GPUs")
        return None

    def fits(self, dtype: str, tp: int, gpu_memory_bytes: list[int],
             workspace_bytes: int = 0, runtime_bytes: int = 0, scoring_bytes: int = 0) -> tuple[bool, str]:
        """Whether the weights, sharded over `tp` GPUs, plus `workspace_bytes` per GPU (DeepSpeed's inference
        workspace, for engines that inject kernels) fit the smallest of the first `tp` GPUs with headroom,
        plus `runtime_bytes` per GPU (an engine process's own, WORKER_RUNTIME_BYTES; 0 for a model that
        shares the test process's CUDA context) and `scoring_bytes` (what scoring the largest case holds:
        reference_first.scoring_bytes, counted whole on each GPU).

        Returns (fits, reason) where reason is the arithmetic in one line, usable as a skip reason."""
        dtype = _check_dtype(dtype)
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise NeoxUsageError(f"tensor-parallel degree must be a positive integer, got {tp!r}")
        if not gpu_memory_bytes:
            return False, "no CUDA GPU found"
        found = len(gpu_memory_bytes)
        if found < tp:
            plural = "GPU" if found == 1 else "GPUs"
            return False, f"{self.name} {dtype} with tp={tp} needs {tp} GPUs, found {found} {plural}"

        weights = self.weight_bytes(dtype)
        per_gpu = self.per_gpu_bytes(dtype, tp, workspace_bytes, runtime_bytes, scoring_bytes)
        # Tensor parallelism shards evenly, so the smallest card in use is the one that limits.
        used = gpu_memory_bytes[:tp]
        smallest = min(used)
        gpus = f"{found} GPU" if found == 1 else f"{found} GPUs"
        if found > tp:
            gpus += f", using {tp}"
        if tp == 1:
            gpus += f" with {_fmt_gb(smallest)} GB"
        elif len(set(used)) == 1:
            gpus += f" with {_fmt_gb(smallest)} GB each"
        else:
            gpus += f", the smallest with {_fmt_gb(smallest)} GB"
        reason = (
            f"{self.name} {dtype} needs {_fmt_params(self.parameter_count())} params x {DTYPE_BYTES[dtype]} B"
            f" = {_fmt_gb(weights)} GB of weights, / tp={tp}"
            + (f" + {_fmt_gb(workspace_bytes)} GB DeepSpeed workspace," if workspace_bytes else "")
            + f" x {HEADROOM} headroom"
            + (f" + {_fmt_gb(runtime_bytes)} GB CUDA runtime of the worker" if runtime_bytes else "")
            + (f" + {_fmt_gb(scoring_bytes)} GB to score the longest case" if scoring_bytes else "")
            + f" = {_fmt_gb(per_gpu)} GB per GPU; found {gpus}"
        )
        return per_gpu <= smallest, reason


def _pythia(size: str, hidden: int, layers: int, heads: int, published: int, vocab: int = 50304) -> ModelSpec:
    # Every Pythia model uses a 4x MLP, 25% rotary dims with base 10000, a 2048 context,
    # parallel attention/MLP residual and untied input/output embeddings.
    return ModelSpec(
        name=f"pythia-{size}",
        hub_id=f"EleutherAI/pythia-{size}",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        vocab_size=vocab,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        published_params=published,
    )


def _deduped(spec: ModelSpec) -> ModelSpec:
    # The deduped twin was trained on the deduplicated Pile with the identical architecture.
    return dataclasses.replace(spec, name=f"{spec.name}-deduped", hub_id=f"{spec.hub_id}-deduped")


# Where the figures come from:
# - Architecture (hidden size, layers, heads, 4x MLP, rotary_pct 0.25, base 10000, context 2048,
#   parallel residual, untied embeddings, layer_norm_eps 1e-5): the EleutherAI/pythia README table,
#   the models/*.yml GPT-NeoX training configs in github.com/EleutherAI/pythia, and the Hugging Face
#   config.json of each model. Padded vocab_size from config.json: 50304 up to pythia-2.8b,
#   50432 for pythia-6.9b, 50688 for pythia-12b, 50432 for gpt-neox-20b.
# - published_params, 70m..12b: "total params" column of the "Naming convention and parameter count"
#   table in the EleutherAI Pythia model cards on Hugging Face (e.g. EleutherAI/pythia-12b-deduped).
# - published_params, 14m and 31m: their model card publishes only non-embedding params
#   (1,189,888 and 4,739,072), no total. The totals below are computed here as that figure plus
#   2 x 50304 x hidden (embed_in + embed_out), which is what parameter_count() gives; they are NOT
#   an EleutherAI-published total.
# - published_params, gpt-neox-20b: n_parameters 20554567680 in the EleutherAI/gpt-neox-20b model card.
_PYTHIA = [
    _pythia("14m", 128, 6, 4, 14_067_712),  # computed total, see above
    _pythia("31m", 256, 6, 8, 30_494_720),  # computed total, see above
    _pythia("70m", 512, 6, 8, 70_426_624),
    _pythia("160m", 768, 12, 12, 162_322_944),
    _pythia("410m", 1024, 24, 16, 405_334_016),
    _pythia("1b", 2048, 16, 8, 1_011_781_632),
    _pythia("1.4b", 2048, 24, 16, 1_414_647_808),
    _pythia("2.8b", 2560, 32, 32, 2_775_208_960),
    _pythia("6.9b", 4096, 32, 32, 6_857_302_016, vocab=50432),
    _pythia("12b", 5120, 36, 40, 11_846_072_320, vocab=50688),
]

_GPT_NEOX_20B = ModelSpec(
    name="gpt-neox-20b",
    hub_id="EleutherAI/gpt-neox-20b",
    hidden_size=6144,
    num_hidden_layers=44,
    num_attention_heads=64,
    intermediate_size=24576,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    vocab_size=50432,
    max_position_embeddings=2048,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    published_params=20_554_567_680,
    hidden_act="gelu_fast",  # its config.json says gelu_fast, unlike Pythia's exact gelu
)

# Standard models first, then their deduped twins, then 20B: the order known_names() and error messages use.
# The 14m/31m deduped twins were published later than the rest (the model card notes the move in Feb 2026).
MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in [*_PYTHIA, *(_deduped(s) for s in _PYTHIA), _GPT_NEOX_20B]
}

# Registry names and hub ids both resolve, case-insensitively.
_INDEX: dict[str, ModelSpec] = {}
for _spec in MODELS.values():
    _INDEX[_spec.name.lower()] = _spec
    _INDEX[_spec.hub_id.lower()] = _spec
del _spec


def known_names() -> list[str]:
    return list(MODELS)


def lookup(name: str) -> ModelSpec:
    spec = _INDEX.get(name.strip().lower()) if isinstance(name, str) else None
    if spec is None:
        raise NeoxUsageError(
            f"unknown model {name!r}: known models are {', '.join(known_names())}"
            " (or pass a hub id or a local directory)"
        )
    return spec


def _first_attr(config, *names, default=None):
    # transformers renamed some GPT-NeoX fields (rotary_emb_base -> rope_theta, rotary_pct ->
    # partial_rotary_factor); accept whichever spelling the config carries.
    for attr in names:
        value = getattr(config, attr, None)
        if value is not None:
            return value
    return default


def spec_from_hf_config(config, name: str) -> ModelSpec:
    """A spec for a model outside the registry (local directory, other hub id) from its config."""
    model_type = getattr(config, "model_type", None)
    if model_type != "gpt_neox":
        raise NeoxUsageError(f"{name!r} is not a GPT-NeoX model (model_type {model_type!r})")
    if getattr(config, "attention_bias", True) is False:
        # parameter_count() and hf_config_dict() describe the biased attention every EleutherAI model has.
        raise NeoxUsageError(f"{name!r} has attention_bias=False, which pytest-neoxmii does not support")
    return ModelSpec(
        name=name,
        hub_id=name,
        hidden_size=int(config.hidden_size),
        num_hidden_layers=int(config.num_hidden_layers),
        num_attention_heads=int(config.num_attention_heads),
        intermediate_size=int(config.intermediate_size),
        rotary_pct=float(_first_attr(config, "rotary_pct", "partial_rotary_factor", default=0.25)),
        rotary_emb_base=int(_first_attr(config, "rotary_emb_base", "rope_theta", default=10000)),
        vocab_size=int(config.vocab_size),
        max_position_embeddings=int(config.max_position_embeddings),
        use_parallel_residual=bool(getattr(config, "use_parallel_residual", True)),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        published_params=None,
        layer_norm_eps=float(getattr(config, "layer_norm_eps", 1e-5)),
        hidden_act=str(getattr(config, "hidden_act", "gelu")),
    )
