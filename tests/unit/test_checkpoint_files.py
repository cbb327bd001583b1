"""checkpoint_files.problem: a checkpoint directory that is not whole is one line naming the file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pytest_neoxmii import checkpoint_files

NO_WEIGHTS = ("has no weights: none of model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
              "pytorch_model.bin.index.json")


@pytest.fixture
def checkpoint(tmp_path):
    """A directory from_pretrained would load: one safetensors file and a tokenizer."""
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


def test_a_whole_checkpoint_has_no_problem(checkpoint):
    assert checkpoint_files.problem(checkpoint) is None


def test_no_weight_file(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    assert checkpoint_files.problem(checkpoint) == f"'{checkpoint}' {NO_WEIGHTS}"


def test_no_tokenizer_and_the_two_files_a_bpe_tokenizer_may_have_instead(checkpoint):
    (checkpoint / "tokenizer.json").unlink()
    assert checkpoint_files.problem(checkpoint) == (f"'{checkpoint}' has no tokenizer: neither tokenizer.json "
                                                    "nor vocab.json with merges.txt")
    (checkpoint / "vocab.json").write_text("{}")
    assert checkpoint_files.problem(checkpoint) is not None          # vocab.json alone is not a tokenizer
    (checkpoint / "merges.txt").write_text("")
    assert checkpoint_files.problem(checkpoint) is None


@pytest.mark.parametrize("change", [-1, +1])
def test_a_safetensors_file_one_byte_off_its_header_was_not_written_whole(checkpoint, change):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-1] if change < 0 else data + b"\0")
    assert checkpoint_files.problem(checkpoint) == (
        f"'{file}' is {len(data) + change} bytes where its header says {len(data)}: the file was not written "
        "whole (an interrupted copy or download?)")


def test_a_safetensors_file_cut_inside_its_header(checkpoint):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    file.write_bytes(data[:20])
    assert checkpoint_files.problem(checkpoint) == (
        f"'{file}' is not a safetensors file: its header length ({header_len} bytes) runs past the file's end")


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"\x04\0\0\0\0\0\0\0{bad"])
def test_a_file_that_is_no_safetensors_at_all(checkpoint, content):
    file = checkpoint / "model.safetensors"
    file.write_bytes(content)
    assert checkpoint_files.problem(checkpoint).startswith(f"'{file}' is not a safetensors file: ")


def test_sharded_weights_are_checked_shard_by_shard(checkpoint):
    whole = checkpoint / "model.safetensors"
    whole.rename(checkpoint / "model-00001-of-00002.safetensors")
    save_file({"c": torch.zeros(4)}, str(checkpoint / "model-00002-of-00002.safetensors"))
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))
    assert checkpoint_files.problem(checkpoint) is None
    second = checkpoint / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes()[:-4])
    assert checkpoint_files.problem(checkpoint).startswith(f"'{second}' is ")
    second.unlink()
    assert checkpoint_files.problem(checkpoint) == (f"'{index}' names the shard model-00002-of-00002.safetensors, "
                                                    f"which is not in '{checkpoint}'")


def test_an_index_that_is_not_one(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    index = checkpoint / "pytorch_model.bin.index.json"
    index.write_text('{"metadata": {}}')
    assert checkpoint_files.problem(checkpoint) == f"'{index}' is not a weight index (KeyError: 'weight_map')"


def test_pytorch_shards_are_checked_for_presence(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
    assert "names the shard pytorch_model-1.bin" in checkpoint_files.problem(checkpoint)
    (checkpoint / "pytorch_model-1.bin").write_bytes(b"not checked further: a pickle")
    assert checkpoint_files.problem(checkpoint) is None


# -- stored_dtype: what the host-memory fit counts as the checkpoint's own pages ------------------------------

@pytest.mark.parametrize("dtype,name", [(torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_the_dtype_every_floating_tensor_is_stored_in(tmp_path, dtype, name):
    save_file({"w": torch.zeros(3, 5, dtype=dtype), "b": torch.ones(7, dtype=dtype),
               "masked_bias": torch.zeros(2, dtype=torch.bool), "steps": torch.zeros(1, dtype=torch.int64)},
              str(tmp_path / "model.safetensors"))
    assert checkpoint_files.stored_dtype(tmp_path) == name


def test_no_stored_dtype_for_mixed_pickled_unreadable_or_missing_weights(tmp_path):
    save_file({"w": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_files.stored_dtype(tmp_path) is None                      # fp16 and fp32
    (tmp_path / "model.safetensors").write_bytes(b"\x04\0\0\0\0\0\0\0{bad")
    assert checkpoint_files.stored_dtype(tmp_path) is None                      # unreadable
    (tmp_path / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(3, dtype=torch.float16)}, tmp_path / "pytorch_model.bin")
    assert checkpoint_files.stored_dtype(tmp_path) is None                      # read, not mapped
    (tmp_path / "pytorch_model.bin").unlink()
    assert checkpoint_files.stored_dtype(tmp_path) is None                      # no weights


def test_the_stored_dtype_of_sharded_weights_is_every_shards(tmp_path):
    save_file({"a": torch.zeros(3, dtype=torch.bfloat16)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3, dtype=torch.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_files.stored_dtype(tmp_path) == "bf16"
    save_file({"b": torch.zeros(3, dtype=torch.float16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert checkpoint_files.stored_dtype(tmp_path) is None
