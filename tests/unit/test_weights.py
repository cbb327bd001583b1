"""pytest_neoxmii.weights: seeded synthetic weights (deterministic, pinned, loadable, peaked), the synthetic
tokenizer, the build-once cache, and resolution of a hub id through the Hugging Face cache."""
from __future__ import annotations

import json
import os
import shutil
import stat
import zlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pytest_neoxmii import weights  # noqa: E402
from pytest_neoxmii.registry import lookup  # noqa: E402

SPEC_14M = lookup("pythia-14m")

# SHA-256 of synthetic pythia-14m, seed 0, fp16 (weights.fingerprint), generator v3. Computed here on the
# CPU (2-core AMD EPYC, numpy 2.4.6, torch 2.13). A change of the generator must bump SYNTHETIC_VERSION (it
# keys the cache and the baselines) and this value together. (v2 was 4b6d5112be8d..., torch's mt19937.)
FINGERPRINT_14M_SEED0 = "d81497199c4ecfd20dc07861092b9520e5838ddf03d4a895ded29a8b9b07b6c7"


@pytest.fixture(scope="module")
def fingerprint_seed0():
    return weights.fingerprint(weights.synthetic_state_dict(SPEC_14M, 0))


@pytest.fixture(scope="module")
def model_dir(neox_cache_dir):
    """The synthetic pythia-14m (seed 0) the session's shared cache already holds."""
    path = weights.build_synthetic(SPEC_14M, 0, neox_cache_dir)
    assert path == weights.synthetic_directory(SPEC_14M, 0, neox_cache_dir)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


# --- determinism ------------------------------------------------------------------------------------------

def test_same_seed_same_fingerprint(fingerprint_seed0):
    assert weights.fingerprint(weights.synthetic_state_dict(SPEC_14M, 0)) == fingerprint_seed0


def test_other_seed_other_fingerprint(fingerprint_seed0):
    assert weights.fingerprint(weights.synthetic_state_dict(SPEC_14M, 1)) != fingerprint_seed0


def test_fingerprint_is_pinned(fingerprint_seed0):
    assert fingerprint_seed0 == FINGERPRINT_14M_SEED0


def test_seeds_give_distinct_weights():
    prints = {weights.fingerprint(weights.synthetic_state_dict(SPEC_14M, s)) for s in (0, 1, 2)}
    assert len(prints) == 3


def test_tensor_seeds_are_distinct_per_seed_and_name():
    assert weights._tensor_seed(0, "gpt_neox.embed_in.weight") == zlib.crc32(b"gpt_neox.embed_in.weight")
    assert weights._tensor_seed(1, "gpt_neox.embed_in.weight") != weights._tensor_seed(0, "gpt_neox.embed_in.weight")
    assert weights._tensor_seed(0, "embed_out.weight") != weights._tensor_seed(0, "gpt_neox.embed_in.weight")


def test_chunks_of_one_tensor_are_different_streams():
    state = weights.synthetic_state_dict(SPEC_14M, 0)
    embed = state["gpt_neox.embed_in.weight"].view(-1)
    assert embed.numel() > weights.CHUNK                   # the 14m embedding spans two chunks
    first, second = embed[:1000], embed[weights.CHUNK:weights.CHUNK + 1000]
    assert not torch.equal(first, second)


def test_quantile_table_is_a_unit_normal():
    q = weights._unit_normal_quantiles()
    assert len(q) == 1 << 16 and (q[1:] > q[:-1]).all()   # strictly increasing: every level distinct
    assert abs(float(q.mean())) < 1e-12 and abs(float((q * q).mean()) - 1) < 1e-12
    assert 4.3 < float(q.max()) < 4.35 and float(q.min()) == -float(q.max())


def test_each_tensor_kind_keeps_its_mean_and_std():
    state = {k: v.float() for k, v in weights.synthetic_state_dict(SPEC_14M, 0).items()}
    h = SPEC_14M.hidden_size
    expected = {"embed_out.weight": (0.0, weights.SYNTHETIC_LOGIT_STD / h ** 0.5),   # the peaked logits
                "gpt_neox.embed_in.weight": (0.0, 1.0),
                "gpt_neox.layers.0.attention.dense.weight": (0.0, 1 / h ** 0.5),
                "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": (0.0, 1 / (4 * h) ** 0.5),
                "gpt_neox.layers.0.input_layernorm.weight": (1.0, 0.05)}
    for name, (mean, std) in expected.items():
        t = state[name]
        assert abs(t.mean().item() - mean) < 4 * std / t.numel() ** 0.5 + 1e-3, name
        assert abs(t.std().item() / std - 1) < 4 / (2 * t.numel()) ** 0.5 + 0.01, name   # 4 sampling sigmas


def test_streamed_file_equals_the_in_memory_weights_whatever_the_thread_count(tmp_path, monkeypatch,
                                                                             fingerprint_seed0):
    from safetensors.torch import load_file

    expected = weights.synthetic_state_dict(SPEC_14M, 0)
    for threads in (1, 3):
        monkeypatch.setattr(weights, "_build_threads", lambda n=threads: n)
        path = tmp_path / f"t{threads}.safetensors"
        digest, written = weights.write_synthetic_safetensors(SPEC_14M, 0, path)
        assert digest == fingerprint_seed0 and written == path.stat().st_size
        loaded = load_file(str(path))
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_every_tensor_depends_on_the_seed():
    a = weights.synthetic_state_dict(SPEC_14M, 0)
    b = weights.synthetic_state_dict(SPEC_14M, 1)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == torch.float16 for k in a)
    same = [k for k in a if torch.equal(a[k], b[k])]
    assert same == []


# --- the built directory ----------------------------------------------------------------------------------

def test_built_directory_loads_with_transformers(model_dir, model, tokenizer):
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.model_type == "gpt_neox"
    assert model.config.hidden_size == SPEC_14M.hidden_size
    assert model.config.num_hidden_layers == SPEC_14M.num_hidden_layers
    assert model.config.vocab_size == SPEC_14M.vocab_size
    assert sum(p.numel() for p in model.parameters()) == SPEC_14M.parameter_count()
    assert len(tokenizer) == SPEC_14M.vocab_size
    assert tokenizer.pad_token_id == 1 and tokenizer.eos_token_id == 0
    assert tokenizer.padding_side == "left"


def test_built_files_hold_the_pinned_weights(model_dir, model):
    provenance = json.loads((model_dir / weights.PROVENANCE_FILE).read_text())
    assert provenance["fingerprint_sha256"] == FINGERPRINT_14M_SEED0
    assert (provenance["seed"], provenance["architecture"]) == (0, "pythia-14m")
    assert provenance["generator_version"] == weights.SYNTHETIC_VERSION
    # What transformers loads (upcast to fp32) is exactly what was generated.
    loaded = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    assert weights.fingerprint(loaded) == FINGERPRINT_14M_SEED0


def test_tokenizer_round_trips_every_id(tokenizer):
    vocab = SPEC_14M.vocab_size
    sample = sorted({0, 1, 2, 3, vocab - 2, vocab - 1, *range(0, vocab, 97)})
    for i in sample:
        text = tokenizer.decode([i])
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [i], (i, text)
    # And the whole vocabulary as one sequence (special ids included).
    ids = list(range(vocab))
    assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_synthetic_tokenizer_matches_the_saved_one(tokenizer):
    fresh = weights.synthetic_tokenizer(SPEC_14M.vocab_size)
    assert fresh.get_vocab() == tokenizer.get_vocab()


def test_next_token_distributions_are_peaked(model, tokenizer):
    """What makes greedy comparisons meaningful: a clear top-1 at most steps (a freshly initialised
    GPT-NeoX is nearly uniform), and not one token winning everywhere."""
    gen = torch.Generator().manual_seed(1234)
    random_rows = torch.randint(2, SPEC_14M.vocab_size, (4, 64), generator=gen)
    text = tokenizer(" ".join(weights.FIXED_TEXT), return_tensors="pt")["input_ids"][:, :128]
    tops = []
    with torch.inference_mode():
        for ids in (random_rows, text):
            probs = model(input_ids=ids).logits.float().softmax(-1)
            tops.append(probs.max(-1))
    top1 = torch.cat([t.values.flatten() for t in tops])
    argmax = torch.cat([t.indices.flatten() for t in tops])
    assert top1.median().item() > 0.3
    assert argmax.unique().numel() > 0.25 * argmax.numel()


# --- the build cache --------------------------------------------------------------------------------------

def test_build_leaves_no_temporary_directory_and_is_reused(tmp_path, monkeypatch):
    path = weights.build_synthetic(SPEC_14M, 0, tmp_path)
    assert path.parent == tmp_path / "synthetic"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               weights.PROVENANCE_FILE}
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a model the cache already holds")

    monkeypatch.setattr(weights, "save_synthetic", no_rebuild)
    assert weights.build_synthetic(SPEC_14M, 0, tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_a_built_model_directory_has_the_mode_of_any_new_directory(tmp_path, umask, mode):
    """A cache shared on a multi-user machine: built through mkdtemp the directory was 0o700, and every other
    user's session failed to load the model with a PermissionError."""
    before = os.umask(umask)
    try:
        path = weights.build_synthetic(SPEC_14M, 0, tmp_path)
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_local_directory_holding_a_synthetic_build_says_its_weights_are_synthetic(tmp_path):
    """Pointed at a copy of a synthetic build (a CI cache, a shared folder), the header said only "weights from
    local directory": results from seeded random weights could pass for a real checkpoint's."""
    built = weights.build_synthetic(SPEC_14M, 0, tmp_path / "cache")
    copy = tmp_path / "models" / "mine"
    shutil.copytree(built, copy)
    assert weights.resolve(str(copy), "auto", None, 0, tmp_path / "cache").describe() == (
        f"synthetic weights (seed 0, generator v{weights.SYNTHETIC_VERSION}) in the pythia-14m shape, from local "
        f"directory {copy}")
    (copy / weights.PROVENANCE_FILE).unlink()          # a directory it did not build: as before
    assert weights.resolve(str(copy), "auto", None, 0, tmp_path / "cache").describe() == (
        f"weights from local directory {copy}")


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_written(spec, seed, directory):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(weights, "save_synthetic", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        weights.build_synthetic(SPEC_14M, 0, tmp_path)
    target = weights.synthetic_directory(SPEC_14M, 0, tmp_path)
    assert [p.name for p in target.parent.iterdir()] == [target.name + ".lock"]


def test_a_build_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    need = SPEC_14M.weight_bytes("fp16") + weights.SPARE_BYTES
    real = shutil.disk_usage

    def short_by_one_byte(path):
        return real(path)._replace(free=need - 1)

    monkeypatch.setattr(weights.shutil, "disk_usage", short_by_one_byte)
    with pytest.raises(OSError) as refused:
        weights.build_synthetic(SPEC_14M, 0, tmp_path)
    target = weights.synthetic_directory(SPEC_14M, 0, tmp_path)
    assert str(refused.value) == (f"[Errno 28] pythia-14m's synthetic weights need {need / 1e9:.2f} GB, and "
                                  f"{target.parent} has {(need - 1) / 1e9:.2f} GB free")
    assert [p.name for p in target.parent.iterdir()] == [target.name + ".lock"]     # nothing written
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: real(path)._replace(free=need))
    assert weights.build_synthetic(SPEC_14M, 0, tmp_path) == target                 # exactly enough: built


def test_synthetic_weights_that_cannot_be_built_fail_each_test_in_one_line(pytester, preloaded):
    """--neox-cache-dir where nothing can be made (procfs): the cache's check at start-up takes a directory
    not made yet; the build, in the `neox` fixture, was an OSError traceback at every test's setup."""
    pytester.makepyfile(test_two="def test_one(neox):\n    pass\n\ndef test_two(neox):\n    pass\n")
    result = pytester.runpytest("--neox-model=pythia-14m", "--neox-weights=synthetic", "--neox-backends=ds",
                                "--neox-cache-dir=/proc/self/neoxmii-cache", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    text = result.stdout.str()
    lines = [ln for ln in result.outlines if ln.startswith("the synthetic weights could not be built")]
    assert len(lines) == 2 and len(set(lines)) == 1, text
    assert lines[0].startswith("the synthetic weights could not be built under --neox-cache-dir "
                               "/proc/self/neoxmii-cache: "), text
    assert "Error: [Errno " in lines[0], text
    assert "Traceback" not in text and "pytest_neoxmii/" not in text and "During handling" not in text, text


def test_synthetic_resolution_builds_nothing(tmp_path):
    model = weights.resolve("pythia-14m", "synthetic", "main", 5, tmp_path)
    assert (model.source, model.weights_key, model.seed, model.path) == (
        "synthetic", f"synthetic-seed5-v{weights.SYNTHETIC_VERSION}", 5, None)
    assert list(tmp_path.iterdir()) == []
    built = weights.materialize(model, tmp_path)
    assert built.path == weights.synthetic_directory(SPEC_14M, 5, tmp_path)
    assert (built.path / weights.PROVENANCE_FILE).is_file()


# --- the hub cache ----------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, model_dir, monkeypatch):
    """A Hugging Face hub cache holding EleutherAI/pythia-14m at COMMIT (the synthetic model's files),
    with refs/main pointing at it; offline. huggingface_hub reads its environment when it is imported,
    so the constants it already read are set too."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-hub"
    repo = cache / "models--EleutherAI--pythia-14m"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)      # no newline, as the hub writes it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return snapshot


@pytest.mark.parametrize("name, revision", [("pythia-14m", "main"), ("EleutherAI/pythia-14m", "main"),
                                            ("pythia-14m", COMMIT)])
def test_hub_id_resolves_through_the_cache(hub_cache, tmp_path, name, revision):
    model = weights.resolve(name, "auto", revision, 0, tmp_path / "neox-cache")
    assert model.source == "hub"
    assert model.weights_key == f"hub@{COMMIT}"
    assert model.revision == COMMIT
    assert model.path.resolve() == hub_cache.resolve()
    assert model.spec == SPEC_14M
    assert model.describe() == f"real weights EleutherAI/pythia-14m@{COMMIT} from the hub cache"


def test_unknown_revision_offline_is_a_usage_error(hub_cache, tmp_path):
    from pytest_neoxmii.errors import NeoxUsageError

    with pytest.raises(NeoxUsageError, match="EleutherAI/pythia-14m@v9 is not in the hub cache and "
                                             "HF_HUB_OFFLINE is set: pass --neox-weights=synthetic"):
        weights.resolve("pythia-14m", "auto", "v9", 0, tmp_path)


@pytest.mark.usefixtures("preloaded")
def test_hub_id_in_a_pytest_run(pytester, hub_cache, neox_cache_dir):
    pytester.makepyfile(test_hub=f"""
def test_model_is_the_snapshot(neox):
    assert neox.model.source == "hub"
    assert str(neox.model.path) == {str(hub_cache)!r}
""")
    # A subprocess: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE from its environment.
    # An explicit dtype: the header then reads the same on every CPU make (the default depends on it).
    result = pytester.runpytest_subprocess("--neox-model=EleutherAI/pythia-14m", "--neox-backends=ds",
                                           "--neox-dtype=fp16", f"--neox-cache-dir={neox_cache_dir}",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert f"neoxmii: weights source hub (hub@{COMMIT}), dtype fp16, tp 1, backends ds" in result.outlines
    assert (f"neoxmii: model pythia-14m: real weights EleutherAI/pythia-14m@{COMMIT} from the hub cache"
            in result.outlines)


def test_local_directory_resolves_with_a_digest(model_dir, tmp_path):
    local = tmp_path / "my-model"
    shutil.copytree(model_dir, local)
    model = weights.resolve(str(local), "auto", None, 0, tmp_path / "cache")
    assert model.source == "local" and model.path == local.resolve()
    assert model.weights_key.startswith("local@") and len(model.weights_key) == len("local@") + 12
    assert model.spec.hidden_size == SPEC_14M.hidden_size
    # Replacing the checkpoint changes the key.
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(local / "model.safetensors"))
    save_file({**tensors, "extra": torch.zeros(2)}, str(local / "model.safetensors"))
    assert weights.resolve(str(local), "auto", None, 0, tmp_path / "cache").weights_key != model.weights_key
    assert os.path.isdir(local)
