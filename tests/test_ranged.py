"""Partial downloads by HTTP ranges (hf_merge.hub.ranged) through the local Hub and the real client."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from hf_merge.errors import UsageError
from hf_merge.hub import ranged, remote_file, sources
from hf_merge.hub.transfer import Transfer
from hf_merge.hub_server.server import HubRequestHandler
from hf_merge.io.checkpoint import Checkpoint
from hf_merge.io.validation import SCOPES
from hf_merge.io.weights_writer import CheckpointWriter

VISION = SCOPES["vision"]


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return length, json.loads(handle.read(length))


def _bound(path: Path, prefixes: tuple[str, ...]) -> int:
    """Most bytes a ranged download of ``path`` may move: header, first read, tensors in scope, gaps."""
    length, header = _header(path)
    header.pop("__metadata__", None)
    selected = [v["data_offsets"] for n, v in header.items() if n.startswith(prefixes)]
    data = sum(end - start for start, end in selected)
    return 8 + length + remote_file.FIRST_READ_BYTES + data + ranged.MAX_GAP_BYTES * len(selected)


def _same_tensors(partial: Path, full: Path, prefixes: tuple[str, ...]) -> list[str]:
    with Checkpoint.open(partial) as part, Checkpoint.open(full) as whole:
        expected = [n for n in whole.names() if n.startswith(prefixes)]
        assert part.names() == expected
        for name in expected:
            a, b = part.get(name), whole.get(name)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
        return expected


@pytest.fixture()
def fresh(seeded_hub):
    """An expert with neither a partial nor a cached full download."""
    repo = seeded_hub.experts[4]
    sources.evict(sources.download_model(repo))
    shutil.rmtree(ranged.snapshot_path(repo, seeded_hub.commits[repo]), ignore_errors=True)
    return repo


def test_ranged_tensors_are_the_full_downloads_and_cost_fewer_bytes(seeded_hub, hub_server, fresh):
    transfer = Transfer()
    served = hub_server.bytes_served
    partial = sources.download_model(fresh, tensor_prefixes=VISION, transfer=transfer)
    served_partial = hub_server.bytes_served - served
    assert partial.tensor_prefixes == VISION and partial.commit_sha == seeded_hub.commits[fresh]
    assert partial.path.is_relative_to(ranged.ranged_root())
    assert "tensor_prefixes" not in partial.to_dict()  # the lineage is the same as a full download's

    served = hub_server.bytes_served
    full = sources.download_model(fresh)
    served_full = hub_server.bytes_served - served
    weights = full.path / "model.safetensors"

    names = _same_tensors(partial.path, full.path, VISION)
    assert names and any(n.startswith("visual_projection.") for n in names)
    assert 0 < transfer.bytes_received <= _bound(weights, VISION)
    assert transfer.bytes_received < weights.stat().st_size
    # The server counted the same weight bytes, plus the small files both downloads fetch whole.
    assert served_partial >= transfer.bytes_received
    assert served_partial < served_full
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (partial.path / name).read_bytes() == (full.path / name).read_bytes()


def test_a_complete_partial_download_is_reused_and_evict_removes_it(seeded_hub, fresh):
    first = sources.download_model(fresh, tensor_prefixes=VISION)
    again = Transfer()
    second = sources.download_model(fresh, tensor_prefixes=VISION, transfer=again)
    assert second.path == first.path and again.bytes_received == 0
    assert sources.evict(second) is True
    assert not first.path.exists()
    leftovers = list(first.path.parent.parent.glob("*/.*.tmp")) if first.path.parent.parent.exists() else []
    assert leftovers == []
    assert sources.download_model(fresh, tensor_prefixes=VISION).path.is_dir()  # downloads again


def test_sharded_expert_fetches_only_the_shards_in_scope(hub_api, tiny_experts, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_experts[0], folder)
    (folder / "model.safetensors").unlink()
    with Checkpoint.open(tiny_experts[0]) as source:
        tensors = {n: source.get(n) for n in source.names()}
    written = CheckpointWriter(folder, max_shard_size=60_000).save_dict(tensors)
    assert len(written) > 3  # several shards and the index
    repo = "alice/ranged-sharded"
    hub_api.create_repo(repo, exist_ok=True)
    hub_api.upload_folder(repo_id=repo, folder_path=folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    in_scope = {f for n, f in index.items() if n.startswith(VISION)}
    assert in_scope != set(index.values())  # some shards hold no vision tensor

    partial = sources.download_model(repo, tensor_prefixes=VISION)
    shards = {p.name for p in partial.path.glob("*.safetensors")}
    assert shards == in_scope
    kept = json.loads((partial.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(kept) == {n for n in index if n.startswith(VISION)}
    _same_tensors(partial.path, folder, VISION)


def test_a_server_that_ignores_ranges_gets_a_full_download(seeded_hub, fresh, monkeypatch):
    original = HubRequestHandler._resolve

    def no_ranges(self, *args, **kwargs):
        del self.headers["Range"]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HubRequestHandler, "_resolve", no_ranges)
    source = sources.download_model(fresh, tensor_prefixes=VISION)
    assert source.tensor_prefixes is None
    assert not source.path.is_relative_to(ranged.ranged_root())
    with Checkpoint.open(source.path) as checkpoint:
        assert any(n.startswith("text_model.") for n in checkpoint.names())
    assert not ranged.snapshot_path(fresh, seeded_hub.commits[fresh]).exists()
    assert list(ranged.snapshot_path(fresh, "x").parent.glob(".*.tmp")) == []


def test_pickle_only_weights_fall_back_to_the_full_download(hub_api, tiny_base, tmp_path):
    folder = tmp_path / "pickle-model"
    folder.mkdir()
    shutil.copy(tiny_base / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    repo = "alice/ranged-pickle"
    hub_api.create_repo(repo, exist_ok=True)
    hub_api.upload_folder(repo_id=repo, folder_path=folder)
    source = sources.download_model(repo, allow_pickle=True, tensor_prefixes=VISION)
    assert source.tensor_prefixes is None and (source.path / "pytorch_model.bin").is_file()


def test_the_engine_refuses_a_partial_expert_missing_tensors_of_its_scope(seeded_hub, tmp_path):
    from hf_merge.merging.engine import ContinualMerger

    partial = sources.download_model(seeded_hub.experts[0], tensor_prefixes=VISION)
    with ContinualMerger(seeded_hub.base_dir, tmp_path / "out", "average", scope="all") as merger:
        with pytest.raises(UsageError) as info:
            merger.add(partial)
    assert "partial_download: false" in str(info.value) and "\n" not in str(info.value)


def test_bytes_served_counts_file_content(seeded_hub, hub_server, fresh):
    served = hub_server.bytes_served
    source = sources.download_model(fresh)
    files = sum(p.stat().st_size for p in source.path.iterdir() if p.is_file())
    assert hub_server.bytes_served - served == files


def test_a_throttled_server_serves_the_same_bytes(seeded_hub, hub_server, fresh):
    hub_server.bandwidth_bytes_per_s = 50e6
    try:
        source = sources.download_model(fresh, tensor_prefixes=VISION)
    finally:
        hub_server.bandwidth_bytes_per_s = None
    _same_tensors(source.path, seeded_hub.expert_dirs[4], VISION)


def test_bandwidth_flag_parses_rates():
    from hf_merge.cli.hub import parse_rate

    assert parse_rate("20MB") == 20e6
    assert parse_rate("20MB/s") == 20e6
    assert parse_rate("500KiB") == 500 * 1024
    assert parse_rate("1000") == 1000
    for bad in ("fast", "-3MB", "0"):
        with pytest.raises(UsageError):
            parse_rate(bad)


def test_no_partial_download_flag_reaches_the_recipe():
    from hf_merge.api import _partial_prefixes
    from hf_merge.cli import build_parser
    from hf_merge.cli.merge import _recipe_fields
    from hf_merge.recipe import EvalSpec, MergeRecipe

    parser = build_parser()
    flagged = _recipe_fields(parser.parse_args(["merge", "--base", "a/b", "--experts", "c/d", "--no-partial-download"]))
    assert flagged["partial_download"] is False
    assert "partial_download" not in _recipe_fields(parser.parse_args(["merge", "--base", "a/b", "--experts", "c/d"]))
    add = parser.parse_args(["add", "a/merged", "--experts", "c/e", "--no-partial-download"])
    assert add.partial_download is False

    recipe = MergeRecipe.from_dict({"base": "a/b", "experts": ["c/d"], **flagged})
    assert MergeRecipe.from_yaml(recipe.to_yaml()).partial_download is False
    assert "partial_download" not in MergeRecipe(base="a/b", experts=["c/d"]).to_dict()  # on by default
    assert _partial_prefixes(recipe) is None
    assert _partial_prefixes(MergeRecipe(base="a/b", experts=["c/d"])) == VISION
    assert _partial_prefixes(MergeRecipe(base="a/b", experts=["c/d"], scope="all")) is None
    every_step = MergeRecipe(base="a/b", experts=["c/d"], eval=EvalSpec(tasks=["mnist"], every_step=True))
    assert _partial_prefixes(every_step) is None  # experts are evaluated from full snapshots anyway
    with pytest.raises(Exception, match="partial_download"):
        MergeRecipe(base="a/b", experts=["c/d"], partial_download="yes")
