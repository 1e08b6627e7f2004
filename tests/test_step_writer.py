"""Written steps: the run's own earlier weight files save bytes, never change the result."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hf_merge.io import durable_file
from hf_merge.io.checkpoint import Checkpoint
from hf_merge.io.weights_writer import WrittenFiles
from hf_merge.merging.engine import ContinualMerger
from hf_merge.merging.engine import merge_weights as merge


@pytest.fixture
def small_buffers(monkeypatch):
    """Buffers far smaller than the tiny model, so its unmerged text tower spans many of them."""
    monkeypatch.setattr(durable_file, "_CHUNK", 4 * 4096)


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
def test_the_result_is_the_same_with_and_without_reusing_bytes(method, checkpoint_every, tiny_base, tiny_experts,
                                                                tmp_path, monkeypatch, small_buffers):
    reused = merge(tiny_base, tiny_experts[:4], method, tmp_path / "reused", checkpoint_every=checkpoint_every)
    monkeypatch.setattr(WrittenFiles, "held", lambda self, path, header: frozenset())
    plain = merge(tiny_base, tiny_experts[:4], method, tmp_path / "plain", checkpoint_every=checkpoint_every)
    assert (reused.output_dir / "model.safetensors").read_bytes() == (plain.output_dir / "model.safetensors").read_bytes()
    assert reused.state.to_json() == plain.state.to_json()
    assert not (tmp_path / "reused" / ".hf-merge-spare").exists()


def test_writes_from_the_third_on_write_only_the_merged_tensors(tiny_base, tiny_experts, tmp_path, monkeypatch,
                                                                small_buffers):
    writes = weight_writes(monkeypatch)
    per_step = []
    merge(tiny_base, tiny_experts[:4], "task_arithmetic", tmp_path / "out", checkpoint_every=1,
          on_step=lambda step, out, state: per_step.append(sum(n for _, n in writes) - sum(per_step)))
    size = (tmp_path / "out" / "model.safetensors").stat().st_size
    merged = merged_bytes(tmp_path / "out")
    assert merged < 0.7 * size  # the text tower is the rest
    assert len(per_step) == 4
    # the first two steps have no file of the run to overwrite yet
    assert per_step[0] >= size and per_step[1] >= size
    for total in per_step[2:]:  # the merged tensors, plus a few blocks where they meet the others
        assert merged <= total <= merged + 4 * 4096, (per_step, merged, size)


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


def test_a_written_step_is_written_while_it_is_merged(tiny_base, tiny_experts, tmp_path, monkeypatch, small_buffers):
    """The first merged tensor reaches the file before the step has finished its last one."""
    import threading

    from hf_merge.merging.methods.base import MergeMethod
    from hf_merge.merging.step_writer import PendingWrite

    first_written, merged_names = threading.Event(), []
    real_when_ready, real_done = PendingWrite._when_ready, MergeMethod._done

    def when_ready(self, name):
        tensor = real_when_ready(self, name)
        first_written.set()
        return tensor

    def done(self, name):
        merged_names.append((name, self.ready is not None))
        if name == self.context.names[-1] and self.step_count == 2:
            # the step's last tensor waits until the writer has taken an earlier one
            assert first_written.wait(10), "nothing was written while the step ran"
        real_done(self, name)

    monkeypatch.setattr(PendingWrite, "_when_ready", when_ready)
    monkeypatch.setattr(MergeMethod, "_done", done)
    result = merge(tiny_base, tiny_experts[:2], "task_arithmetic", tmp_path / "out")
    monkeypatch.undo()
    expected = merge(tiny_base, tiny_experts[:2], "task_arithmetic", tmp_path / "expected")
    # step 2 is written, so the method told the writer which tensors were final; step 1 is not
    assert {watched for _, watched in merged_names[len(merged_names) // 2 :]} == {True}
    assert {watched for _, watched in merged_names[: len(merged_names) // 2]} == {False}
    assert (result.output_dir / "model.safetensors").read_bytes() == (expected.output_dir / "model.safetensors").read_bytes()


def test_a_failed_background_write_leaves_the_last_written_step(tiny_base, tiny_experts, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "out"
    with ContinualMerger(tiny_base, out, "opcm", checkpoint_every=1) as merger:
        merger.add(tiny_experts[0])
        before = (out / "model.safetensors").read_bytes()
        real_pwrite = os.pwrite

        def full(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(OSError, match="No space"):
            merger.add(tiny_experts[1])
        assert (out / "model.safetensors").read_bytes() == before
        assert not (out / ".hf-merge-staging").exists()
        assert merger.step == 2 and merger.unwritten_steps == 1  # merged, not written
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        merger.flush()  # room again: the step is written
    expected = merge(tiny_base, tiny_experts[:2], "opcm", tmp_path / "expected")
    assert (out / "model.safetensors").read_bytes() == (expected.output_dir / "model.safetensors").read_bytes()


def test_a_file_begun_for_a_step_never_written_is_discarded(tiny_base, tiny_experts, tmp_path):
    import threading

    out = tmp_path / "out"
    merger = ContinualMerger(tiny_base, out, "task_arithmetic")  # writes every 8th step
    merger.add(tiny_experts[0])
    merger.add(tiny_experts[1])
    assert (out / ".hf-merge-staging").is_dir()  # the next write's file, begun with the first step
    assert merger.unwritten_steps == 2
    merger.close()  # the run ends without writing
    assert not (out / ".hf-merge-staging").exists()
    assert not (out / "merge_state.json").exists()
    assert not [t for t in threading.enumerate() if t.name == "hf-merge-write-step" and t.is_alive()]
    with ContinualMerger(tiny_base, out, "task_arithmetic") as merger:  # the folder is as good as new
        merger.add_all(tiny_experts[:2])
    expected = merge(tiny_base, tiny_experts[:2], "task_arithmetic", tmp_path / "expected")
    assert (out / "model.safetensors").read_bytes() == (expected.output_dir / "model.safetensors").read_bytes()
