"""Merge state JSON and the atomic replacement of an output folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hf_merge.errors import MergeStateError
from hf_merge.io.weights_writer import CheckpointWriter
from hf_merge.merging.state import STATE_NAME, MergeState, OutputTransaction, discard_spare, recover


def make_state(step: int) -> MergeState:
    return MergeState(
        method="opcm",
        hyperparameters={"alpha": 0.5},
        step=step,
        base={"repo_id": "org/base", "commit_sha": "a" * 40},
        lineage=[{"repo_id": f"org/e{i}", "commit_sha": "b" * 40, "step": i} for i in range(1, step + 1)],
        method_state={"prev_lambda": 1.5, "norms": [1.0, 2.0]},
    )


def commit_step(output, step: int, weights: dict[str, str]) -> None:
    tx = OutputTransaction(output)
    for name, text in weights.items():
        (tx.staging / name).write_text(text)
    make_state(step).save(tx.staging)
    tx.commit(list(weights))


def test_round_trip_and_json_layout(tmp_path):
    state = make_state(2)
    state.save(tmp_path)
    assert MergeState.load(tmp_path) == state
    data = json.loads((tmp_path / STATE_NAME).read_text())
    assert data["method_state"]["prev_lambda"] == 1.5
    assert [e["step"] for e in data["lineage"]] == [1, 2]
    assert not [p for p in tmp_path.iterdir() if p.name != STATE_NAME]  # no temp file left


def test_missing_corrupt_and_future_states_are_errors(tmp_path):
    with pytest.raises(MergeStateError, match="no merge state"):
        MergeState.load(tmp_path)
    (tmp_path / STATE_NAME).write_text("{not json")
    with pytest.raises(MergeStateError, match="corrupt"):
        MergeState.load(tmp_path)
    (tmp_path / STATE_NAME).write_text(json.dumps({"method": "opcm", "hyperparameters": {}, "bogus": 1}))
    with pytest.raises(MergeStateError, match="corrupt"):
        MergeState.load(tmp_path)
    (tmp_path / STATE_NAME).write_text(json.dumps({"method": "opcm", "hyperparameters": {}, "format_version": 99}))
    with pytest.raises(MergeStateError, match="newer"):
        MergeState.load(tmp_path)


def test_commit_replaces_weights_and_drops_stale_shards(tmp_path):
    commit_step(tmp_path, 1, {"model-00001-of-00002.safetensors": "1a", "model-00002-of-00002.safetensors": "1b",
                              "model.safetensors.index.json": "{}"})
    (tmp_path / "README.md").write_text("card")  # files of others are left alone
    commit_step(tmp_path, 2, {"model.safetensors": "2"})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "merge_state.json", "model.safetensors"]
    assert MergeState.load(tmp_path).step == 2


def test_recover_discards_an_unfinished_step(tmp_path):
    commit_step(tmp_path, 1, {"model.safetensors": "1"})
    tx = OutputTransaction(tmp_path)
    (tx.staging / "model.safetensors").write_text("half-written")
    recover(tmp_path)  # the process died before the commit point
    assert (tmp_path / "model.safetensors").read_text() == "1"
    assert MergeState.load(tmp_path).step == 1
    assert not tx.staging.exists()


def test_recover_rolls_an_interrupted_commit_forward(tmp_path, monkeypatch):
    commit_step(tmp_path, 1, {"model.safetensors": "1"})
    real_replace = os.replace
    moved = []

    def dying_replace(src, dst):
        # die after the commit point, once the weights moved but before the state did
        if str(dst).endswith(STATE_NAME) and ".hf-merge-pending" in str(src):
            raise KeyboardInterrupt
        moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        commit_step(tmp_path, 2, {"model.safetensors": "2"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "model.safetensors").read_text() == "2"
    assert MergeState.load(tmp_path).step == 1  # state not moved yet: recovery must run first
    recover(tmp_path)
    assert MergeState.load(tmp_path).step == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["merge_state.json", "model.safetensors"]
    assert (tmp_path / ".hf-merge-spare" / "model.safetensors").read_text() == "1"  # kept for reuse


def commit_tensors(output, step: int, tensors: dict[str, torch.Tensor], max_shard_size="5GB") -> list[str]:
    tx = OutputTransaction(output)
    written = CheckpointWriter(tx.staging, max_shard_size).save_dict(tensors)
    make_state(step).save(tx.staging)
    tx.commit(written)
    return written


def test_replaced_weight_files_are_rewritten_in_place_two_steps_later(tmp_path):
    inodes = []
    for step, size in ((1, 1000), (2, 1000), (3, 10)):  # step 3 writes a smaller file into a larger one
        commit_tensors(tmp_path, step, {"w": torch.full((size,), float(step))})
        inodes.append((tmp_path / "model.safetensors").stat().st_ino)
        assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], torch.full((size,), float(step)))
    assert inodes[0] != inodes[1] and inodes[2] == inodes[0]  # two files take turns
    assert torch.equal(load_file(tmp_path / ".hf-merge-spare" / "model.safetensors")["w"], torch.full((1000,), 2.0))
    discard_spare(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge_state.json", "model.safetensors"]


def test_a_spare_the_step_does_not_write_is_dropped(tmp_path):
    tensors = {"a": torch.zeros(300), "b": torch.ones(300)}
    commit_tensors(tmp_path, 1, tensors, max_shard_size=1500)
    commit_tensors(tmp_path, 2, tensors, max_shard_size=1500)  # spare: the two shards
    commit_tensors(tmp_path, 3, tensors)  # one file now: the spare shards are stale
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["merge_state.json", "model.safetensors"]
    assert list((tmp_path / ".hf-merge-spare").iterdir()) == []
    assert load_file(tmp_path / "model.safetensors")["b"].sum() == 300


def test_linked_files_are_never_written_through(tmp_path):
    elsewhere = tmp_path / "cache-blob"
    CheckpointWriter(tmp_path).save_dict({"w": torch.zeros(4)})
    os.link(tmp_path / "model.safetensors", elsewhere)
    CheckpointWriter(tmp_path).save_dict({"w": torch.ones(4)})
    assert torch.equal(load_file(elsewhere)["w"], torch.zeros(4))
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], torch.ones(4))
    os.symlink(elsewhere, tmp_path / "linked.safetensors")
    tx = OutputTransaction(tmp_path / "out")
    (tmp_path / "out" / ".hf-merge-spare").mkdir()
    os.symlink(elsewhere, tmp_path / "out" / ".hf-merge-spare" / "model.safetensors")
    tx.abort()
    assert OutputTransaction(tmp_path / "out").recycled == []  # a symlinked spare is not taken


@pytest.mark.parametrize("leftover", ["empty", "manifest only"])
def test_a_pending_folder_left_after_the_state_moved_is_cleared(tmp_path, leftover):
    # The last moments of a commit: every file moved, then the manifest deleted, then the folder.
    commit_step(tmp_path, 1, {"model.safetensors": "1"})
    commit_step(tmp_path, 2, {"model.safetensors": "2"})
    pending = tmp_path / ".hf-merge-pending"
    pending.mkdir()
    if leftover == "manifest only":
        (pending / ".manifest.json").write_text(json.dumps({"weight_files": ["model.safetensors"]}))
    commit_step(tmp_path, 3, {"model.safetensors": "3"})  # no "remove it by hand"
    assert MergeState.load(tmp_path).step == 3
    assert (tmp_path / "model.safetensors").read_text() == "3"
    assert not pending.exists()


def test_a_pending_folder_still_holding_the_state_without_manifest_is_refused(tmp_path):
    commit_step(tmp_path, 1, {"model.safetensors": "1"})
    pending = tmp_path / ".hf-merge-pending"
    pending.mkdir()
    make_state(2).save(pending)  # cannot come from a commit: the manifest goes only after the state moved
    with pytest.raises(MergeStateError, match="has no manifest") as caught:
        recover(tmp_path)
    assert "\n" not in str(caught.value) and str(pending) in str(caught.value)


_KILLED_CHILD = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_state import commit_step
out, marker = Path(sys.argv[1]), Path(sys.argv[2])
commit_step(out, 1, {"model.safetensors": "1"})
real_rmdir = os.rmdir
def rmdir(path, *args, **kwargs):
    if str(path).endswith(".hf-merge-pending"):  # manifest deleted, folder not yet
        marker.write_text("now")
        time.sleep(600)
    return real_rmdir(path, *args, **kwargs)
os.rmdir = rmdir
commit_step(out, 2, {"model.safetensors": "2"})
"""


def test_sigkill_between_manifest_and_folder_removal_then_next_step(tmp_path):
    import subprocess
    import sys

    from hf_merge.testing.processes import sigkill_when

    out, marker = tmp_path / "out", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(out), str(marker), os.path.dirname(__file__)])
    sigkill_when(child, marker, timeout=60, what="the end of step 2")
    assert sorted(p.name for p in (out / ".hf-merge-pending").iterdir()) == []
    commit_step(out, 3, {"model.safetensors": "3"})
    assert MergeState.load(out).step == 3 and (out / "model.safetensors").read_text() == "3"
    assert not (out / ".hf-merge-pending").exists()
