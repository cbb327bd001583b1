"""Unit tests for pytest_neoxmii.registry: shapes, parameter counts, memory fit, lookups."""

from __future__ import annotations

import dataclasses

import math

import pytest

from pytest_neoxmii.errors import NeoxUsageError
from pytest_neoxmii.registry import (
    DTYPE_BYTES,
    HEADROOM,
    MODELS,
    ModelSpec,
    known_names,
    lookup,
    spec_from_hf_config,
)

GB = 10**9
NEOX_20B = "gpt-neox-20b"


def _hf_param_count(spec: ModelSpec) -> int:
    """sum(numel) of a real transformers model of this shape, built on the meta device (no memory, fast)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(**spec.hf_config_dict())
    with torch.device("meta"):
        model = transformers.GPTNeoXForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


# --- parameter counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_parameter_count_matches_published(name):
    spec = MODELS[name]
    assert spec.published_params is not None
    assert spec.parameter_count() == spec.published_params


# EleutherAI's Pythia model card publishes only the non-embedding parameters of 14m and 31m; the registry's
# totals for them are computed by the same formula this module tests, so they are pinned here to what a real
# transformers model of that shape holds outside embed_in / embed_out, against the published figure.
PUBLISHED_NON_EMBEDDING = {"pythia-14m": 1_189_888, "pythia-31m": 4_739_072}


@pytest.mark.parametrize("name", list(PUBLISHED_NON_EMBEDDING))
def test_small_pythia_counts_against_the_published_non_embedding_figure(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = MODELS[name]
    with torch.device("meta"):
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**spec.hf_config_dict()))
    counts = {n: p.numel() for n, p in model.named_parameters()}
    embeddings = counts.pop("gpt_neox.embed_in.weight") + counts.pop("embed_out.weight")
    assert sum(counts.values()) == PUBLISHED_NON_EMBEDDING[name]
    assert sum(counts.values()) + embeddings == spec.published_params


@pytest.mark.parametrize("name", ["pythia-14m", "pythia-70m"])
def test_formula_matches_transformers_model(name):
    spec = MODELS[name]
    assert spec.parameter_count() == _hf_param_count(spec)


def test_formula_matches_transformers_with_tied_embeddings_and_odd_mlp():
    # Off the registry: tied embeddings count once, and the MLP width is not 4x hidden.
    spec = dataclasses.replace(
        MODELS["pythia-14m"], tie_word_embeddings=True, vocab_size=1000, intermediate_size=300
    )
    assert spec.parameter_count() == _hf_param_count(spec)


def test_large_vocab_padding_differs_for_big_models():
    assert MODELS["pythia-2.8b"].vocab_size == 50304
    assert MODELS["pythia-6.9b"].vocab_size == 50432
    assert MODELS["pythia-12b"].vocab_size == 50688
    assert MODELS[NEOX_20B].vocab_size == 50432


def test_registry_contents():
    sizes = ["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]
    expected = {f"pythia-{s}" for s in sizes} | {f"pythia-{s}-deduped" for s in sizes} | {NEOX_20B}
    assert set(MODELS) == expected
    assert known_names() == list(MODELS)
    for name, spec in MODELS.items():
        assert spec.name == name
        assert spec.hub_id == f"EleutherAI/{name}"
        assert spec.rotary_pct == 0.25
        assert spec.rotary_emb_base == 10000
        assert spec.max_position_embeddings == 2048
        assert spec.use_parallel_residual is True
        assert spec.tie_word_embeddings is False
        assert spec.layer_norm_eps == 1e-5
        assert spec.hidden_size % spec.num_attention_heads == 0


@pytest.mark.parametrize("name", [n for n in MODELS if n.endswith("-deduped")])
def test_deduped_twin_shares_architecture(name):
    twin, base = MODELS[name], MODELS[name.removesuffix("-deduped")]
    assert twin.hub_id == base.hub_id + "-deduped"
    assert dataclasses.replace(twin, name=base.name, hub_id=base.hub_id) == base


# --- lookup ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["pythia-160m", "EleutherAI/pythia-160m", "PYTHIA-160M", "eleutherai/Pythia-160M", " pythia-160m "],
)
def test_lookup_by_name_or_hub_id_case_insensitive(query):
    assert lookup(query) is MODELS["pythia-160m"]


def test_lookup_deduped_and_20b():
    assert lookup("EleutherAI/pythia-1.4b-deduped") is MODELS["pythia-1.4b-deduped"]
    assert lookup("GPT-NeoX-20B") is MODELS[NEOX_20B]


@pytest.mark.parametrize("query", ["foo", "pythia-7b", "EleutherAI/gpt-j-6b", ""])
def test_lookup_unknown_is_one_line_listing_known_names(query):
    with pytest.raises(NeoxUsageError) as excinfo:
        lookup(query)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"unknown model {query!r}: known models are pythia-14m, pythia-31m, ")
    assert message.endswith("gpt-neox-20b (or pass a hub id or a local directory)")
    for name in known_names():
        assert name in message


# --- memory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(DTYPE_BYTES))
def test_weight_bytes_per_dtype(dtype):
    spec = MODELS["pythia-160m"]
    assert spec.weight_bytes(dtype) == 162_322_944 * DTYPE_BYTES[dtype]


def test_weight_bytes_values():
    spec = MODELS[NEOX_20B]
    assert spec.weight_bytes("fp16") == 41_109_135_360
    assert spec.weight_bytes("bf16") == 41_109_135_360
    assert spec.weight_bytes("fp32") == 82_218_270_720


@pytest.mark.parametrize("dtype", ["int8", "float16", ""])
def test_unknown_dtype_is_usage_error(dtype):
    with pytest.raises(NeoxUsageError, match="unknown dtype"):
        MODELS["pythia-70m"].weight_bytes(dtype)
    with pytest.raises(NeoxUsageError, match="unknown dtype"):
        MODELS["pythia-70m"].fits(dtype, 1, [80 * GB])


def test_20b_fp16_does_not_fit_one_40gb_gpu():
    ok, reason = MODELS[NEOX_20B].fits("fp16", 1, [40 * GB])
    assert ok is False
    assert reason == (
        "gpt-neox-20b fp16 needs 20.55e9 params x 2 B = 41.1 GB of weights, / tp=1 x 1.2 headroom"
        " = 49.3 GB per GPU; found 1 GPU with 40.0 GB"
    )


def test_20b_fp16_fits_tp2_on_two_40gb_gpus():
    ok, reason = MODELS[NEOX_20B].fits("fp16", 2, [40 * GB, 40 * GB])
    assert ok is True
    for number in ("20.55e9", "41.1 GB", "tp=2", "1.2", "24.7 GB per GPU", "2 GPUs with 40.0 GB each"):
        assert number in reason


def test_20b_fp16_fits_one_80gb_gpu():
    ok, reason = MODELS[NEOX_20B].fits("fp16", 1, [80 * GB])
    assert ok is True
    assert "49.3 GB per GPU" in reason and "80.0 GB" in reason


def test_20b_fp32_does_not_fit_one_80gb_gpu():
    ok, reason = MODELS[NEOX_20B].fits("fp32", 1, [80 * GB])
    assert ok is False
    assert "x 4 B = 82.2 GB of weights" in reason and "98.7 GB per GPU" in reason


def test_fits_uses_smallest_of_first_tp_gpus():
    spec = MODELS[NEOX_20B]
    # tp=2 needs 24.7 GB per GPU: the 20 GB card in use decides, the 80 GB spare card does not help.
    ok, reason = spec.fits("fp16", 2, [80 * GB, 20 * GB, 80 * GB])
    assert ok is False
    assert "found 3 GPUs, using 2, the smallest with 20.0 GB" in reason
    # A small card beyond the first tp is not used.
    ok, reason = spec.fits("fp16", 1, [80 * GB, 20 * GB])
    assert ok is True
    assert "found 2 GPUs, using 1 with 80.0 GB" in reason


def test_fits_boundary_is_inclusive():
    spec = MODELS["pythia-70m"]
    need = spec.weight_bytes("fp16") * HEADROOM
    assert spec.fits("fp16", 1, [int(need) + 1])[0] is True
    assert spec.fits("fp16", 1, [int(need) - 1])[0] is False


def test_small_model_reason_is_not_rounded_to_zero():
    ok, reason = MODELS["pythia-14m"].fits("fp32", 1, [8 * GB])
    assert ok is True
    assert "14.1e6 params x 4 B = 0.0563 GB of weights" in reason


def test_fewer_gpus_than_tp():
    ok, reason = MODELS[NEOX_20B].fits("fp16", 4, [80 * GB, 80 * GB])
    assert ok is False
    assert reason == "gpt-neox-20b fp16 with tp=4 needs 4 GPUs, found 2 GPUs"
    ok, reason = MODELS[NEOX_20B].fits("fp16", 2, [80 * GB])
    assert ok is False
    assert "needs 2 GPUs, found 1 GPU" in reason


@pytest.mark.parametrize("name, tp, divides", [
    ("pythia-12b", 3, False), ("pythia-12b", 6, False), ("pythia-12b", 4, True), ("pythia-12b", 8, True),
    ("pythia-160m", 3, True), ("pythia-160m", 8, False), (NEOX_20B, 2, True), (NEOX_20B, 3, False)])
def test_uneven_heads_names_the_heads_and_the_tp(name, tp, divides):
    reason = MODELS[name].uneven_heads(tp)
    if divides:
        assert reason is None
    else:
        heads = MODELS[name].num_attention_heads
        assert reason == (f"{name} has {heads} attention heads, which --neox-tp={tp} does not divide: "
                          "DeepSpeed's injected kernels split the heads evenly among the GPUs")


def test_no_gpu():
    assert MODELS["pythia-70m"].fits("fp16", 1, []) == (False, "no CUDA GPU found")


@pytest.mark.parametrize("tp", [0, -1, 1.5, True])
def test_bad_tp_is_usage_error(tp):
    with pytest.raises(NeoxUsageError, match="tensor-parallel"):
        MODELS["pythia-70m"].fits("fp16", tp, [80 * GB])


def test_fits_reason_is_one_line():
    for args in [("fp16", 1, [40 * GB]), ("fp16", 2, [40 * GB, 80 * GB]), ("fp16", 8, [GB]), ("fp16", 1, [])]:
        assert "\n" not in MODELS[NEOX_20B].fits(*args)[1]


# --- transformers configs --------------------------------------------------------------------------


def test_hf_config_dict_fields():
    d = MODELS[NEOX_20B].hf_config_dict()
    assert d["model_type"] == "gpt_neox"
    assert d["architectures"] == ["GPTNeoXForCausalLM"]
    assert (d["bos_token_id"], d["eos_token_id"]) == (0, 0)
    assert d["attention_bias"] is True and d["use_cache"] is True
    assert d["initializer_range"] == 0.02 and d["torch_dtype"] == "float16"
    assert d["hidden_act"] == "gelu_fast"
    assert MODELS["pythia-160m"].hf_config_dict()["hidden_act"] == "gelu"


@pytest.mark.parametrize("name", ["pythia-160m-deduped", "pythia-12b", NEOX_20B])
def test_spec_from_hf_config_round_trip(name):
    transformers = pytest.importorskip("transformers")
    spec = MODELS[name]
    config = transformers.GPTNeoXConfig(**spec.hf_config_dict())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        assert getattr(config, key) == getattr(spec, key)
    rebuilt = spec_from_hf_config(config, "/models/local-copy")
    assert rebuilt.name == rebuilt.hub_id == "/models/local-copy"
    assert rebuilt.published_params is None
    expected = dataclasses.replace(spec, name=rebuilt.name, hub_id=rebuilt.hub_id, published_params=None)
    assert rebuilt == expected
    assert rebuilt.parameter_count() == spec.parameter_count()


def test_spec_from_hf_config_rejects_other_architectures():
    transformers = pytest.importorskip("transformers")
    with pytest.raises(NeoxUsageError) as excinfo:
        spec_from_hf_config(transformers.LlamaConfig(), "meta-llama/Llama-2-7b-hf")
    assert str(excinfo.value) == "'meta-llama/Llama-2-7b-hf' is not a GPT-NeoX model (model_type 'llama')"


def test_spec_from_hf_config_rejects_unbiased_attention():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(**{**MODELS["pythia-70m"].hf_config_dict(), "attention_bias": False})
    with pytest.raises(NeoxUsageError, match="attention_bias"):
        spec_from_hf_config(config, "no-bias")


# --- DeepSpeed's inference workspace (counted by the fit arithmetic) --------------------------------


def test_ds_workspace_of_20b_at_tp2_is_deepspeeds_formula_by_hand():
    """InferenceContext::GenWorkSpace (deepspeed 0.19.8), by hand for gpt-neox-20b, tp=2, 2048 tokens,
    batch 4, fp16: heads of 96 padded to 128, so a width of 64 x 128 = 8192; activations 10 x 8192 x 4,
    attention scores 4 x (64 / 2) x 2048, KV cache 44 layers x 4 x 8192 / 2 x 2; per token of 2048, x 2 B."""
    per_token = 10 * 8192 * 4 + 4 * 32 * 2048 + 44 * 4 * 4096 * 2
    assert MODELS[NEOX_20B].ds_workspace_bytes("fp16", 2, 2048, 4) == per_token * 2048 * 2 == 8_321_499_136


@pytest.mark.parametrize("size, head, padded", [("pythia-70m", 64, 64), ("pythia-2.8b", 80, 128),
                                                ("pythia-14m", 32, 32)])
def test_ds_workspace_pads_heads_as_flash_attention_does(size, head, padded):
    spec = MODELS[size]
    assert spec.head_size == head
    width = spec.num_attention_heads * padded
    per_token = 10 * width + spec.num_attention_heads * 16 + spec.num_hidden_layers * width * 2
    assert spec.ds_workspace_bytes("bf16", 1, 16, 1) == per_token * 16 * 2


def test_ds_workspace_grows_with_batch_and_tokens_and_shrinks_with_tp():
    spec = MODELS["pythia-1b"]
    base = spec.ds_workspace_bytes("fp16", 1, 1024, 2)
    assert spec.ds_workspace_bytes("fp16", 1, 1024, 4) == 2 * base
    assert spec.ds_workspace_bytes("fp16", 1, 2048, 2) > 2 * base       # the scores grow with tokens squared
    assert spec.ds_workspace_bytes("fp16", 2, 1024, 2) < base
    assert spec.ds_workspace_bytes("fp32", 1, 1024, 2) == 2 * base


def test_fits_counts_the_workspace_per_gpu():
    """gpt-neox-20b on one 60 GB GPU: the weights alone fit (49.3 GB with headroom); with DeepSpeed's
    15.3 GB workspace for 2048 tokens at batch 4 they do not, and the reason shows the sum."""
    spec = MODELS[NEOX_20B]
    assert spec.fits("fp16", 1, [60 * GB])[0] is True
    workspace = spec.ds_workspace_bytes("fp16", 1, 2048, 4)
    ok, reason = spec.fits("fp16", 1, [60 * GB], workspace)
    assert ok is False
    assert reason == ("gpt-neox-20b fp16 needs 20.55e9 params x 2 B = 41.1 GB of weights, / tp=1 + 15.3 GB "
                      "DeepSpeed workspace, x 1.2 headroom = 67.7 GB per GPU; found 1 GPU with 60.0 GB")
    # the seed's configuration still fits: tp=2 on two 40 GiB GPUs
    assert spec.fits("fp16", 2, [40 * 2**30] * 2, spec.ds_workspace_bytes("fp16", 2, 2048, 4))[0] is True


def test_a_worker_runtime_is_added_per_gpu_outside_the_headroom():
    """gpt-neox-20b at tp=2 (measured on 2 x H200, synthetic weights: 70.4 GB held by the two ranks'
    processes, 2 x 7936 MiB of it DeepSpeed's workspace): weights and workspace x 1.2 alone promise 69.3 GB;
    each rank's own CUDA runtime (WORKER_RUNTIME_BYTES) is counted on top, once per GPU."""
    from pytest_neoxmii.registry import WORKER_RUNTIME_BYTES
    spec = MODELS[NEOX_20B]
    workspace = spec.ds_workspace_bytes("fp16", 2, 2048, 4)
    ok, reason = spec.fits("fp16", 2, [40 * 2**30] * 2, workspace, WORKER_RUNTIME_BYTES)
    assert ok
    assert reason.endswith("/ tp=2 + 8.3 GB DeepSpeed workspace, x 1.2 headroom + 0.847 GB CUDA runtime of the "
                           "worker = 35.5 GB per GPU; found 2 GPUs with 42.9 GB each")
    per_gpu = (spec.weight_bytes("fp16") / 2 + workspace) * 1.2 + WORKER_RUNTIME_BYTES
    assert spec.fits("fp16", 2, [math.ceil(per_gpu)] * 2, workspace, WORKER_RUNTIME_BYTES)[0] is True
    assert spec.fits("fp16", 2, [math.floor(per_gpu)] * 2, workspace, WORKER_RUNTIME_BYTES)[0] is False


def test_scoring_the_longest_case_is_added_per_gpu_outside_the_headroom():
    """Each rank's process scores the 2016-token case with its own GPU memory (reference_first.scoring_bytes:
    1.0 GB for gpt-neox-20b in fp16). gpt-neox-20b at tp=2 still fits two 40 GB GPUs with it, the configuration
    the DeepSpeed-MII notes lead with."""
    from pytest_neoxmii.cases import plan_cases
    from pytest_neoxmii.reference_first import scoring_bytes
    from pytest_neoxmii.registry import WORKER_RUNTIME_BYTES
    spec = MODELS[NEOX_20B]
    workspace = spec.ds_workspace_bytes("fp16", 2, 2048, 4)
    scoring = scoring_bytes(plan_cases(2048, 32), spec.vocab_size, 2048, "fp16")
    ok, reason = spec.fits("fp16", 2, [40 * 2**30] * 2, workspace, WORKER_RUNTIME_BYTES, scoring)
    assert ok
    assert reason.endswith("x 1.2 headroom + 0.847 GB CUDA runtime of the worker + 1.0 GB to score the longest "
                           "case = 36.5 GB per GPU; found 2 GPUs with 42.9 GB each")
    per_gpu = spec.per_gpu_bytes("fp16", 2, workspace, WORKER_RUNTIME_BYTES, scoring)
    assert per_gpu == spec.per_gpu_bytes("fp16", 2, workspace, WORKER_RUNTIME_BYTES) + scoring
    assert spec.fits("fp16", 2, [math.floor(per_gpu)] * 2, workspace, WORKER_RUNTIME_BYTES, scoring)[0] is False
