"""Lazy safetensors reading (single, sharded, every dtype) and the streaming sharded writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_merge.errors import CheckpointError
from hf_merge.io.checkpoint import Checkpoint, TensorSpec, all_finite, parse_size
from hf_merge.io.weights_writer import CheckpointWriter


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(7, 5, generator=g),
        "b.f16": torch.randn(3, 4, generator=g).half(),
        "c.bf16": torch.randn(9, generator=g).bfloat16(),
        "d.f64": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        "e.i64": torch.arange(11),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(3.5),
        "h.empty": torch.zeros(0, 4),
    }


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with Checkpoint.open(tmp_path) as checkpoint:
        assert checkpoint.names() == sorted(tensors)
        assert checkpoint.config == {"model_type": "clip"}
        for name, tensor in tensors.items():
            assert checkpoint.shape(name) == tuple(tensor.shape)
            assert checkpoint.dtype(name) == tensor.dtype
            read = checkpoint.get(name)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor)
        read = checkpoint.get("a.f32")
        read += 1  # a private copy: the file is not affected
        assert torch.equal(checkpoint.get("a.f32"), tensors["a.f32"])


def test_writer_output_is_loadable_by_safetensors(tmp_path):
    tensors = sample_tensors()
    written = CheckpointWriter(tmp_path).save_dict(tensors)
    assert written == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_sharded_round_trip_with_index(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((64, 64), float(i)) for i in range(5)}  # 16 KiB each
    written = CheckpointWriter(tmp_path, max_shard_size="40KB").save_dict(tensors)
    assert written[-1] == "model.safetensors.index.json"
    shards = [f for f in written if f.endswith(".safetensors")]
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    with Checkpoint.open(tmp_path) as checkpoint:
        for name, tensor in tensors.items():
            assert torch.equal(checkpoint.get(name), tensor)


def test_writer_streams_tensors_from_a_callback(tmp_path):
    asked = []

    def fetch(name):
        asked.append(name)
        return torch.ones(3) * len(asked)

    specs = [TensorSpec("z", (3,), torch.float32), TensorSpec("y", (3,), torch.float32)]
    CheckpointWriter(tmp_path).save(specs, fetch)
    assert asked == ["y", "z"]  # written in name order, one at a time
    with pytest.raises(CheckpointError, match="'x' changed shape"):
        CheckpointWriter(tmp_path / "bad").save([TensorSpec("x", (2,), torch.float32)], lambda n: torch.ones(3))


def test_truncated_file_names_the_first_tensor_past_the_end(tmp_path):
    save_file({"a": torch.zeros(10), "b": torch.zeros(1000)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated: tensor 'b'"):
        Checkpoint.open(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(tmp_path)


def test_missing_weights_shard_and_pickle_policy(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Checkpoint.open(tmp_path)
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        Checkpoint.open(tmp_path)
    with Checkpoint.open(tmp_path, allow_pickle=True) as checkpoint:
        assert torch.equal(checkpoint.get("w"), torch.ones(2))
    sharded = tmp_path / "sharded"
    CheckpointWriter(sharded, max_shard_size=8).save_dict({"a": torch.ones(2), "b": torch.ones(2)})
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* missing"):
        Checkpoint.open(sharded)


def test_all_finite_is_exact_even_when_the_sum_overflows():
    assert all_finite(torch.randn(1000))
    assert all_finite(torch.full((100,), 3e38))  # the float32 sum overflows; every value is finite
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))  # a NaN sum, caught as well
    assert not all_finite(torch.tensor([1.0, float("-inf")], dtype=torch.bfloat16))
    assert all_finite(torch.tensor([1, 2, 3])) and all_finite(torch.empty(0))


def test_required_finite_tensors_are_checked_on_read(tmp_path):
    save_file({"a": torch.tensor([1.0, float("nan")]), "b": torch.tensor([float("inf")])}, tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as checkpoint:
        assert checkpoint.get("a").isnan().any()  # nothing asked yet
        checkpoint.require_finite(["a"], "org/expert")
        with pytest.raises(CheckpointError, match=r"^expert org/expert: tensor 'a' contains NaN or Inf values$"):
            checkpoint.get("a")
        assert checkpoint.get("b").isinf().all()  # not in the required set


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size(123) == 123


def test_reads_into_given_memory_and_scratch_slots_reuse_it(tmp_path):
    from safetensors.torch import save_file

    from hf_merge.merging.methods.base import read_scratch, release_scratch

    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.arange(6, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with Checkpoint.open(tmp_path) as ck:
        out = torch.empty(3, 4)
        assert ck.get("a", out=out) is out and torch.equal(out, tensors["a"])
        with pytest.raises(ValueError, match="cannot read tensor 'a'"):
            ck.get("a", out=torch.empty(4, 3))
        first = read_scratch(ck, "a", 0)
        assert torch.equal(first, tensors["a"])
        second = read_scratch(ck, "b", 0)  # smaller: the same memory, read over
        assert second.data_ptr() == first.data_ptr() and torch.equal(second, tensors["b"])
        assert torch.equal(read_scratch(ck, "a", 1), tensors["a"])  # another slot, other memory
        release_scratch()
