"""Written steps: a prepared spare and earlier files of the run save bytes, never change the result."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_merge import durable_file
from hf_merge.checkpoint import Checkpoint
from hf_merge.engine import ContinualMerger, merge
from hf_merge.errors import IncompatibleExpertError
from hf_merge.step_writer import StepWriter
from hf_merge.testing.tiny_clip import build_tiny_clip


@pytest.fixture
def small_buffers(monkeypatch):
    """Buffers far smaller than the tiny model, so its unmerged text tower spans many of them."""
    monkeypatch.setattr(durable_file, "_CHUNK", 4 * 4096)


@pytest.fixture
def no_spare_prepared(monkeypatch):
    monkeypatch.setattr(StepWriter, "_start_preparing", lambda self: None)


def weight_writes(monkeypatch) -> list[tuple[str, int]]:
    """(file name, bytes) of every write into a weight file of an output's staging folder."""
    real_open, real_pwrite, names, writes = os.open, os.pwrite, {}, []

    def opening(path, flags, *args):
        fd = real_open(path, flags, *args)
        names[fd] = Path(path)
        return fd

    def writing(fd, data, offset):
        path = names.get(fd)
        if path is not None and path.parent.name == ".hf-merge-staging" and path.suffix == ".safetensors":
            writes.append((path.name, len(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "pwrite", writing)
    return writes


def merged_bytes(folder: Path) -> int:
    with Checkpoint.open(folder) as checkpoint:
        return sum(checkpoint.get(n).numel() * checkpoint.get(n).element_size()
                   for n in checkpoint.names() if n.startswith(("vision_model.", "visual_projection.")))


@pytest.mark.parametrize("method", ["task_arithmetic", "opcm", "magmax"])
@pytest.mark.parametrize("checkpoint_every", [None, 1])
def test_the_result_is_the_same_with_and_without_a_prepared_spare(method, checkpoint_every, tiny_base, tiny_experts,
                                                                   tmp_path, monkeypatch, small_buffers):
    prepared = merge(tiny_base, tiny_experts[:3], method, tmp_path / "prepared", checkpoint_every=checkpoint_every)
    monkeypatch.setattr(StepWriter, "_start_preparing", lambda self: None)
    plain = merge(tiny_base, tiny_experts[:3], method, tmp_path / "plain", checkpoint_every=checkpoint_every)
    assert (prepared.output_dir / "model.safetensors").read_bytes() == (plain.output_dir / "model.safetensors").read_bytes()
    assert prepared.state.to_json() == plain.state.to_json()
    assert not (tmp_path / "prepared" / ".hf-merge-spare").exists()


def test_each_write_of_a_run_writes_only_the_merged_tensors(tiny_base, tiny_experts, tmp_path, monkeypatch, small_buffers):
    writes = weight_writes(monkeypatch)
    written_per_step = []
    merge(tiny_base, tiny_experts[:3], "task_arithmetic", tmp_path / "out", checkpoint_every=1,
          on_step=lambda step, out, state: written_per_step.append(sum(n for _, n in writes) - sum(written_per_step)))
    size = (tmp_path / "out" / "model.safetensors").stat().st_size
    merged = merged_bytes(tmp_path / "out")
    assert merged < 0.7 * size  # the text tower is the rest
    assert len(written_per_step) == 3
    for total in written_per_step:  # the merged tensors, plus a few blocks where they meet the others
        assert merged <= total <= merged + 4 * 4096, (written_per_step, merged, size)


def test_without_a_spare_every_byte_is_written(tiny_base, tiny_experts, tmp_path, monkeypatch, small_buffers,
                                               no_spare_prepared):
    writes = weight_writes(monkeypatch)
    merge(tiny_base, tiny_experts[:2], "task_arithmetic", tmp_path / "out")
    assert sum(n for _, n in writes) >= (tmp_path / "out" / "model.safetensors").stat().st_size


def test_a_spare_left_by_another_process_is_rewritten_in_full(tiny_base, tiny_experts, tmp_path, small_buffers):
    out = tmp_path / "out"
    with ContinualMerger(tiny_base, out, "task_arithmetic", checkpoint_every=1) as merger:
        merger.add(tiny_experts[0])
    # a crashed run's spare: the right layout and size, but bytes nobody vouches for
    spare = out / ".hf-merge-spare"
    spare.mkdir()
    stale = bytearray((out / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(stale[:8], "little")
    stale[header:] = b"\x7f" * (len(stale) - header)
    (spare / "model.safetensors").write_bytes(bytes(stale))
    with ContinualMerger.resume(out) as merger:
        merger.add(tiny_experts[1])
    reference = merge(tiny_base, tiny_experts[:2], "task_arithmetic", tmp_path / "reference")
    assert (out / "model.safetensors").read_bytes() == (reference.output_dir / "model.safetensors").read_bytes()


def test_a_run_that_writes_nothing_leaves_no_folder_and_no_thread(tiny_base, tmp_path):
    other = build_tiny_clip(tmp_path / "other", hidden_size=48)  # another architecture: refused
    out = tmp_path / "out"
    with pytest.raises(IncompatibleExpertError):
        with ContinualMerger(tiny_base, out, "task_arithmetic") as merger:
            merger.add(other)
    assert not out.exists()
    assert not [t for t in threading.enumerate() if t.name == "hf-merge-prepare"]


def test_a_failed_preparation_costs_speed_not_the_result(tiny_base, tiny_experts, tmp_path, monkeypatch, caplog,
                                                         small_buffers):
    real = Checkpoint.read_raw

    def failing_in_the_background(self, name, out, start=0):
        if threading.current_thread().name == "hf-merge-prepare":
            raise OSError(28, "No space left on device")
        return real(self, name, out, start)

    monkeypatch.setattr(Checkpoint, "read_raw", failing_in_the_background)
    with caplog.at_level(logging.DEBUG, logger="hf_merge"):
        result = merge(tiny_base, tiny_experts[:2], "task_arithmetic", tmp_path / "out")
    assert "could not prepare a spare weight file" in caplog.text
    merged = load_file(str(result.output_dir / "model.safetensors"))
    base = load_file(str(tiny_base / "model.safetensors"))
    for name, value in merged.items():
        if name.startswith("text_model."):
            assert torch.equal(value, base[name]), name
    monkeypatch.undo()
    expected = merge(tiny_base, tiny_experts[:2], "task_arithmetic", tmp_path / "expected")
    assert (result.output_dir / "model.safetensors").read_bytes() == (expected.output_dir / "model.safetensors").read_bytes()
