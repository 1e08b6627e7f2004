"""The prefetcher: one expert ahead at most, errors at the right expert, clean cancellation, same result."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from hf_merge.errors import ModelNotFoundError
from hf_merge.hub import ranged, sources
from hf_merge.hub.prefetch import THREAD_PREFIX, Prefetcher
from hf_merge.hub.sources import ModelSource
from hf_merge.hub.transfer import Transfer
from hf_merge.io.checkpoint import Checkpoint
from hf_merge.io.validation import SCOPES


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


class _SlowFolders:
    """A fake download: makes a folder per expert, blocking until the test lets it finish."""

    def __init__(self, root: Path, fail_at: int | None = None):
        self.root = root
        self.fail_at = fail_at
        self.started: list[int] = []
        self.release: dict[int, threading.Event] = {}
        self.began = threading.Condition()
        self.most_on_disk = 0

    def __call__(self, index: int, transfer: Transfer) -> ModelSource:
        with self.began:
            self.started.append(index)
            self.began.notify_all()
        gate = self.release.setdefault(index, threading.Event())
        while not gate.wait(0.01):
            transfer.check()
        if index == self.fail_at:
            raise ModelNotFoundError(f"repository alice/expert-{index} not found on the test Hub")
        folder = self.root / f"expert-{index}"
        folder.mkdir()
        self.most_on_disk = max(self.most_on_disk, len(list(self.root.iterdir())))
        return ModelSource.local(folder)

    def wait_started(self, count: int) -> None:
        with self.began:
            assert self.began.wait_for(lambda: len(self.started) >= count, timeout=30)

    def finish(self, index: int) -> None:
        self.release.setdefault(index, threading.Event()).set()


def test_never_more_than_one_expert_ahead_and_two_on_disk(tmp_path):
    fake = _SlowFolders(tmp_path)
    n = 5
    with Prefetcher(range(n), fake, discard=lambda s: shutil.rmtree(s.path)) as fetched:
        fake.finish(0)
        for index, source in enumerate(fetched):
            assert source.path.name == f"expert-{index}"
            if index + 1 < n:
                fake.wait_started(index + 2)  # the next one is downloading while we "merge" this one
            assert fake.started == list(range(min(index + 2, n)))  # and nothing beyond it
            fake.finish(index + 1)
            shutil.rmtree(source.path)  # evict before asking for the next
    assert fake.most_on_disk <= 2
    assert _prefetch_threads() == []


def test_ahead_zero_downloads_only_when_asked(tmp_path):
    fake = _SlowFolders(tmp_path)
    for i in range(3):
        fake.finish(i)
    seen = []
    for index, source in enumerate(Prefetcher(range(3), fake, ahead=0)):
        assert fake.started == list(range(index + 1))
        seen.append(source.path.name)
    assert seen == ["expert-0", "expert-1", "expert-2"]


def test_a_failed_download_surfaces_at_its_expert(tmp_path):
    fake = _SlowFolders(tmp_path, fail_at=2)
    for i in range(4):
        fake.finish(i)
    merged = []
    with pytest.raises(ModelNotFoundError) as info:
        with Prefetcher(range(4), fake) as fetched:
            for source in fetched:
                merged.append(source.path.name)
    assert merged == ["expert-0", "expert-1"]  # the experts before it are all handed out
    assert str(info.value) == "repository alice/expert-2 not found on the test Hub"
    assert 3 not in fake.started  # nothing is fetched beyond the failure
    assert _prefetch_threads() == []


def test_an_error_while_merging_cancels_the_download_in_flight(tmp_path):
    fake = _SlowFolders(tmp_path)
    fake.finish(0)
    with pytest.raises(RuntimeError, match="merge failed"):
        with Prefetcher(range(3), fake) as fetched:
            for _source in fetched:
                fake.wait_started(2)
                raise RuntimeError("merge failed")  # expert 1 is still downloading (never released)
    assert _prefetch_threads() == []
    assert [p.name for p in tmp_path.iterdir()] == ["expert-0"]  # expert 1 left nothing behind


def test_cancelling_a_real_ranged_download_leaves_no_file(seeded_hub, hub_server):
    experts = seeded_hub.experts[1:3]
    for repo in experts:
        sources.evict(sources.download_model(repo))
        shutil.rmtree(ranged.snapshot_path(repo, seeded_hub.commits[repo]), ignore_errors=True)
    prefixes = SCOPES["vision"]

    def fetch(reference: str, transfer: Transfer) -> ModelSource:
        return sources.resolve(reference, tensor_prefixes=prefixes, transfer=transfer)

    hub_server.bandwidth_bytes_per_s = 100_000  # the second expert takes seconds to arrive
    try:
        with pytest.raises(RuntimeError, match="merge failed"):
            with Prefetcher(experts, fetch) as fetched:
                for source in fetched:
                    assert source.tensor_prefixes == prefixes
                    raise RuntimeError("merge failed")
    finally:
        hub_server.bandwidth_bytes_per_s = None
    assert _prefetch_threads() == []
    second = ranged.snapshot_path(experts[1], seeded_hub.commits[experts[1]])
    assert not second.exists()
    assert list(ranged.ranged_root().rglob("*.tmp")) == []  # no staging folder left
    assert list(Path(constants.HF_HUB_CACHE).rglob("*.incomplete")) == []


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(folder) as checkpoint:
        return {n: checkpoint.get(n) for n in checkpoint.names()}


def test_merged_result_is_the_same_with_and_without_prefetch_and_ranges(seeded_hub, tmp_path):
    from hf_merge.api import merge
    from hf_merge.merging import engine
    from hf_merge.merging.state import MergeState

    experts = seeded_hub.experts[:3]
    reference = engine.merge_weights(seeded_hub.base_dir, seeded_hub.expert_dirs[:3], "opcm", tmp_path / "local")
    outputs = {}
    for label, partial in (("ranged", True), ("full", False)):
        result = merge(base=seeded_hub.base, experts=experts, method="opcm", output=str(tmp_path / label),
                       evict=True, partial_download=partial)
        outputs[label] = result.output_dir
        assert [s["commit_sha"] for s in result.steps] == [seeded_hub.commits[e] for e in experts]
    expected = _tensors(reference.output_dir)
    for label, folder in outputs.items():
        got = _tensors(folder)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (label, name)
    lineage = [MergeState.load(outputs[label]).lineage for label in outputs]
    assert lineage[0] == lineage[1]
    for repo in experts:  # evicted: neither a partial nor a full copy is left
        assert not ranged.snapshot_path(repo, seeded_hub.commits[repo]).exists()
    assert _prefetch_threads() == []


def test_the_full_downloads_progress_bar_stops_it_when_cancelled():
    from hf_merge.hub.transfer import DownloadCancelled

    transfer = Transfer()
    bar = transfer.progress_class()(total=10, disable=True)
    bar.update(4)  # counts as usual while wanted
    transfer.cancel()
    with pytest.raises(DownloadCancelled):
        bar.update(4)
    bar.close()
    transfer = Transfer()
    transfer.received(3)
    transfer.received(5)
    assert transfer.bytes_received == 8
