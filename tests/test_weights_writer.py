"""The safetensors writer: copied tensors, and the bytes a file of this process already holds."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_merge.io import durable_file
from hf_merge.io.checkpoint import Checkpoint, TensorSpec
from hf_merge.io.weights_writer import WrittenFiles, safetensors_header, write_safetensors


@pytest.fixture
def small_buffers(monkeypatch):
    monkeypatch.setattr(durable_file, "_CHUNK", 4 * 4096)  # tensors span several buffers


@pytest.fixture
def source(tmp_path):
    """A stored checkpoint: a few tensors of odd sizes, so none starts on a block boundary."""
    torch.manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3000, 7),
        "b.bias": torch.randn(5),
        "c.weight": torch.randn(40, 1001),
        "d.weight": torch.randn(123, 77).half(),
        "e.weight": torch.randn(9000),
    }
    (tmp_path / "src").mkdir()
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    with Checkpoint.open(tmp_path / "src") as checkpoint:
        yield checkpoint, tensors


def specs_of(tensors):
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in sorted(tensors.items())]


def bytes_written(monkeypatch) -> list[int]:
    real, total = os.pwrite, [0]

    def counting(fd, data, offset):
        total[0] += len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    return total


def test_copied_tensors_are_the_stored_bytes(tmp_path, source, small_buffers):
    checkpoint, tensors = source
    computed = {"c.weight": torch.full((40, 1001), 2.5)}
    path = tmp_path / "out.safetensors"
    copied = frozenset(tensors) - set(computed)
    write_safetensors(path, specs_of(tensors), computed.__getitem__, source=checkpoint, copied=copied)
    assert load_file(str(path)).keys() == tensors.keys()
    for name, value in load_file(str(path)).items():
        assert torch.equal(value, computed.get(name, tensors[name])), name


def test_a_file_written_before_gets_only_the_computed_bytes(tmp_path, source, small_buffers, monkeypatch):
    checkpoint, tensors = source
    written, path = WrittenFiles(), tmp_path / "out.safetensors"
    copied = frozenset(tensors) - {"c.weight"}
    write_safetensors(path, specs_of(tensors), {"c.weight": torch.ones(40, 1001)}.__getitem__,
                      source=checkpoint, copied=copied, written=written)
    first_size = path.stat().st_size
    total = bytes_written(monkeypatch)
    write_safetensors(path, specs_of(tensors), {"c.weight": torch.full((40, 1001), 3.0)}.__getitem__,
                      source=checkpoint, copied=copied, written=written)
    out = load_file(str(path))
    assert torch.equal(out["c.weight"], torch.full((40, 1001), 3.0))
    for name in copied:
        assert torch.equal(out[name], tensors[name]), name
    computed_bytes = 40 * 1001 * 4
    # the computed tensor plus at most a block at each of its ends, and the last block
    assert computed_bytes <= total[0] <= computed_bytes + 3 * 4096 < first_size


def _change_in_place(path):
    with open(path, "r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\x00" * 8)


@pytest.mark.parametrize("change", ["modified", "hard-linked", "other layout", "another process"])
def test_a_file_not_known_to_hold_the_bytes_is_written_in_full(tmp_path, source, small_buffers, monkeypatch, change):
    checkpoint, tensors = source
    written, path = WrittenFiles(), tmp_path / "out.safetensors"
    copied = frozenset(tensors) - {"c.weight"}
    specs = specs_of(tensors)
    fetch = {"c.weight": torch.ones(40, 1001)}.__getitem__
    write_safetensors(path, specs, fetch, source=checkpoint, copied=copied, written=written)
    if change == "modified":
        _change_in_place(path)
        os.utime(path, ns=(0, 0))  # whatever the clock's resolution, the time differs
    elif change == "hard-linked":
        os.link(path, tmp_path / "elsewhere.safetensors")
    elif change == "other layout":
        specs = specs[:-1]  # one tensor fewer: another header
        copied = copied - {specs_of(tensors)[-1].name}
    elif change == "another process":
        written = WrittenFiles()
    total = bytes_written(monkeypatch)
    write_safetensors(path, specs, fetch, source=checkpoint, copied=copied, written=written)
    assert total[0] >= path.stat().st_size
    out = load_file(str(path))
    for spec in specs:
        assert torch.equal(out[spec.name], torch.ones(40, 1001) if spec.name == "c.weight" else tensors[spec.name])
    if change == "hard-linked":
        assert torch.equal(load_file(str(tmp_path / "elsewhere.safetensors"))["c.weight"], torch.ones(40, 1001))


def test_a_failed_write_is_forgotten(tmp_path, source, small_buffers):
    checkpoint, tensors = source
    written, path = WrittenFiles(), tmp_path / "out.safetensors"
    copied = frozenset(tensors) - {"c.weight"}
    write_safetensors(path, specs_of(tensors), {"c.weight": torch.ones(40, 1001)}.__getitem__,
                      source=checkpoint, copied=copied, written=written)

    def broken(name):
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_safetensors(path, specs_of(tensors), broken, source=checkpoint, copied=copied, written=written)
    assert written.held(path, safetensors_header(specs_of(tensors))) == frozenset()
