"""Lying safetensors headers are refused as the safetensors library refuses them: locally, through
range requests on the Hub, and by the CLI before any step."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_merge.errors import CheckpointError
from hf_merge.hub import client as hub
from hf_merge.hub import ranged
from hf_merge.io.checkpoint import Checkpoint
from hf_merge.io.safetensors_header import MAX_HEADER_BYTES, parse_header

# Two float32 tensors of 4 and 2 elements: 24 bytes of data.
GOOD = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
DATA = bytes(range(24))

LIES = {
    "negative offset": ({**GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "'b'"),
    "aliasing tensors": ({**GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "'b'"),
    "begin after end": ({**GOOD, "b": {"dtype": "F32", "shape": [0], "data_offsets": [24, 16]}}, "'b'"),
    "length mismatch": ({**GOOD, "b": {"dtype": "F32", "shape": [3], "data_offsets": [16, 24]}}, "'b'"),
    "missing dtype": ({**GOOD, "b": {"shape": [2], "data_offsets": [16, 24]}}, "'b' has no dtype"),
    "unknown dtype": ({**GOOD, "b": {"dtype": "F31", "shape": [2], "data_offsets": [16, 24]}}, "'b' has unknown dtype"),
    "gap": ({**GOOD, "b": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}}, "'b'"),
    "overlap": ({**GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, "'b'"),
    "bytes after the last tensor": ({**GOOD, "b": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}, "after the last tensor"),
    "offsets not integers": ({**GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [16.0, 24]}}, "'b'"),
    "metadata not strings": ({**GOOD, "__metadata__": {"format": 1}}, "__metadata__"),
    "shape not a list": ({**GOOD, "b": {"dtype": "F32", "shape": 2, "data_offsets": [16, 24]}}, "'b'"),
}


def write(folder: Path, header: dict | bytes, data: bytes = DATA) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    (folder / "config.json").write_text("{}")
    return folder / "model.safetensors"


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_lying_local_header_is_one_line_naming_file_and_tensor(lie, tmp_path):
    header, named = LIES[lie]
    path = write(tmp_path / "m", header)
    with pytest.raises(CheckpointError) as caught:
        Checkpoint.open(tmp_path / "m")
    message = one_line(caught.value)
    assert str(path) in message and named in message


def test_an_honest_header_in_any_order_reads_back(tmp_path):
    write(tmp_path / "m", {"b": GOOD["b"], "__metadata__": {"format": "pt"}, "a": GOOD["a"]})
    with Checkpoint.open(tmp_path / "m") as checkpoint:
        assert checkpoint.names() == ["a", "b"]
        assert checkpoint.get("b").view(torch.uint8).tolist() == list(range(16, 24))
    # what the reference writer writes is accepted, padding of the header included
    save_file({"x": torch.arange(6.0).reshape(2, 3), "e": torch.zeros(0)}, tmp_path / "ref.safetensors",
              metadata={"format": "pt"})
    raw = (tmp_path / "ref.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = parse_header(raw[8:8 + length], file_size=len(raw), label="ref")
    assert [(e.name, e.shape) for e in header.entries] == [("e", (0,)), ("x", (2, 3))]


def test_duplicate_names_huge_headers_and_control_characters(tmp_path):
    raw = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}'
    write(tmp_path / "dup", raw)
    with pytest.raises(CheckpointError, match="appears twice"):
        Checkpoint.open(tmp_path / "dup")
    path = write(tmp_path / "big", b"{}")
    blob = bytearray(path.read_bytes())
    blob[:8] = struct.pack("<Q", MAX_HEADER_BYTES + 1)
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="limit"):
        Checkpoint.open(tmp_path / "big")
    write(tmp_path / "ctl", {"a\nb": {"dtype": "F32", "shape": [5], "data_offsets": [0, 24]}})
    with pytest.raises(CheckpointError) as caught:
        Checkpoint.open(tmp_path / "ctl")
    assert "'a\\nb'" in one_line(caught.value)


def test_a_lying_header_on_the_hub_is_refused_by_range_requests(seeded_hub, hub_api, tmp_path):
    header, _ = LIES["negative offset"]
    repo = "alice/lying-header"
    hub_api.create_repo(repo, exist_ok=True)
    folder = tmp_path / "lying"
    shutil.copytree(seeded_hub.expert_dirs[0], folder)
    (folder / "model.safetensors").unlink()
    write(folder, header)
    shutil.copy(seeded_hub.expert_dirs[0] / "config.json", folder / "config.json")
    sha = hub_api.upload_folder(repo_id=repo, folder_path=folder).oid
    files = hub_api.list_repo_files(repo)
    with pytest.raises(CheckpointError) as caught:  # what the preflight reads
        hub.tensor_table(repo, sha, token=None)
    assert f"{repo}/model.safetensors" in one_line(caught.value) and "'b'" in str(caught.value)
    with pytest.raises(CheckpointError):  # what a partial download reads
        ranged.download_ranged(repo, sha, files, ("",), token=None)
    assert not ranged.snapshot_path(repo, sha).exists()


def test_the_cli_refuses_a_lying_expert_before_step_one(tiny_base, tmp_path, capsys):
    from hf_merge.cli import main

    write(tmp_path / "liar", LIES["aliasing tensors"][0])
    shutil.copy(tiny_base / "config.json", tmp_path / "liar" / "config.json")
    code = main(["merge", "--base", str(tiny_base), "--experts", str(tmp_path / "liar"), "--output",
                 str(tmp_path / "out"), "-q"])
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "liar/model.safetensors" in lines[0] and "'b'" in lines[0]
    assert not (tmp_path / "out" / "merge_state.json").exists()
