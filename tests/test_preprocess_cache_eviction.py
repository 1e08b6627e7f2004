"""The pixel cache on disk stays within ``$HF_MERGE_EVAL_CACHE_MAX_GB``: least recently used sets go first,
never the set just written, one this process has mapped or one another process just used; a set
larger than the bound is kept for its run with one warning and goes first later; partial folders are
never read and are removed; :func:`clear_pixel_cache` frees what it reports.

Every set here is built through :meth:`PixelCache.batches` with no memory budget, so it is
memory-mapped under ``$HF_MERGE_CACHE/eval-pixels`` as a set too large for memory would be. Each
``_run`` is one evaluation run: its cache, and so its mappings, are gone when it returns.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from hf_merge.errors import EvaluationError
from hf_merge.evaluation import DatasetSpec, PixelCache, Task, clear_pixel_cache, load_task_data, pin_image_processor, pixel_disk
from hf_merge.evaluation.synthetic import COLOR_NAMES

ENV = "HF_MERGE_EVAL_CACHE_MAX_GB"
GIB = 1024**3
HOUR = 3600.0


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_MERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(ENV, raising=False)
    return tmp_path / "cache" / "eval-pixels"


@pytest.fixture(scope="module")
def preprocessing(tiny_base):
    from transformers import CLIPProcessor

    return pin_image_processor(CLIPProcessor.from_pretrained(tiny_base))


def _task(seed: int, per_class: int = 1) -> Task:
    spec = DatasetSpec(kind="python", path="hf_merge.evaluation.synthetic:solid_colors",
                       options={"n_per_class": per_class, "seed": seed})
    return Task(f"colors-{seed}", COLOR_NAMES, ("a {} square.",), spec)


def _run(preprocessing, seed: int, per_class: int = 1) -> tuple[str, int]:
    """One run evaluating one task: ``(its key, sets it built)``; it keeps no mapping once returned."""
    cache = PixelCache(workers=0, memory_budget=0)
    data = load_task_data(_task(seed, per_class))
    rows = sum(len(pixels) for pixels, _ in cache.batches(data, preprocessing, batch_size=4))
    (stored,) = cache._sets.values()
    assert stored.location == str(cache.cache_dir / stored.key) and rows == len(data) == 8 * per_class
    return stored.key, cache.builds


def _du(folder: Path) -> int:
    """Bytes of the files under ``folder``, counted here independently of the module."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def _used(cache_dir: Path, key: str, hours_ago: float) -> None:
    stamp = time.time() - hours_ago * HOUR
    os.utime(cache_dir / key / "used", (stamp, stamp))


def _keys(cache_dir: Path) -> set[str]:
    return {entry.key for entry in pixel_disk.entries(cache_dir)}


def _bound(monkeypatch, size: float) -> None:
    monkeypatch.setenv(ENV, repr(size / GIB))  # a fraction of a GiB, as a user may write it


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_least_recently_used_set_goes_and_a_recent_read_keeps_one(preprocessing, cache_dir, monkeypatch, caplog):
    monkeypatch.setattr(pixel_disk, "RECENT_S", 0.0)  # no other process here: the order of use alone decides
    a, b, c = (_run(preprocessing, seed)[0] for seed in (1, 2, 3))
    for key, hours in ((a, 3), (b, 2), (c, 1)):
        _used(cache_dir, key, hours)
    entries = {entry.key: entry for entry in pixel_disk.entries(cache_dir)}
    crop = preprocessing.processor.crop_size
    for key, entry in entries.items():  # every file of the set: 8 uint8 crops and their header, meta.json, `used`
        pixels = os.path.getsize(cache_dir / key / "pixels.npy")
        assert entry.size == _du(cache_dir / key) > pixels > 8 * 3 * crop["height"] * crop["width"] >= pixels - 4096
    assert set(entries) == {a, b, c} and entries[a].last_used < entries[b].last_used < entries[c].last_used

    assert _run(preprocessing, 1) == (a, 0)  # a later run reads A from disk: a use, recorded
    assert pixel_disk.entries(cache_dir) and min(e.last_used for e in pixel_disk.entries(cache_dir)) == entries[b].last_used

    size = max(entry.size for entry in entries.values())
    _bound(monkeypatch, 3.5 * size)  # three sets fit, four do not
    with caplog.at_level(logging.INFO, logger="hf_merge"):
        d, built = _run(preprocessing, 4)
    assert built == 1 and _keys(cache_dir) == {a, c, d}  # B, the least recently used, went; A, written first, stays
    assert _du(cache_dir) == sum(e.size for e in pixel_disk.entries(cache_dir)) <= 3.5 * size
    assert f"freed {pixel_disk.human(entries[b].size)} of least recently used sets" in caplog.text
    assert not _warnings(caplog)


def test_the_set_just_written_and_one_mapped_by_this_process_are_never_evicted(preprocessing, cache_dir, monkeypatch, caplog):
    monkeypatch.setattr(pixel_disk, "RECENT_S", 0.0)
    a, b = (_run(preprocessing, seed)[0] for seed in (1, 2))
    reader = PixelCache(workers=0, memory_budget=0)  # a run still evaluating task A: its pixels are mapped
    assert sum(len(p) for p, _ in reader.batches(load_task_data(_task(1)), preprocessing, 4)) == 8
    _used(cache_dir, a, 3)
    _used(cache_dir, b, 2)
    size = max(entry.size for entry in pixel_disk.entries(cache_dir))
    _bound(monkeypatch, 1.5 * size)  # room for one set
    with caplog.at_level(logging.WARNING, logger="hf_merge"):
        c = _run(preprocessing, 3)[0]
    assert _keys(cache_dir) == {a, c}  # A is mapped, C just written: B goes, and the total stays over
    assert len(_warnings(caplog)) == 1 and "over its bound" in _warnings(caplog)[0] and ENV in _warnings(caplog)[0]
    assert reader._sets[a].pixels.sum() > 0  # still readable

    del reader
    gc.collect()
    assert not pixel_disk.in_use()
    _used(cache_dir, a, 3)
    d = _run(preprocessing, 4)[0]
    assert _keys(cache_dir) == {d}  # A is no longer mapped and C is not the set just written: both go


def test_evict_spares_the_key_it_keeps_and_accounts_every_byte(preprocessing, cache_dir, monkeypatch):
    monkeypatch.setattr(pixel_disk, "RECENT_S", 0.0)
    a, b, c = (_run(preprocessing, seed)[0] for seed in (1, 2, 3))
    assert not pixel_disk.in_use()  # what protects a set just written in its run is `keep` alone here
    _used(cache_dir, a, 3)
    sizes = {key: _du(cache_dir / key) for key in (a, b, c)}
    assert pixel_disk.evict(cache_dir, 1, keep=a) == (sizes[b] + sizes[c], sizes[a])  # (freed, still held)
    assert _keys(cache_dir) == {a} and _du(cache_dir) == sizes[a]


def test_a_set_used_seconds_ago_by_another_process_is_kept(preprocessing, cache_dir, monkeypatch):
    a, b = (_run(preprocessing, seed)[0] for seed in (1, 2))
    _used(cache_dir, a, 2)
    _used(cache_dir, b, 1 / HOUR)  # another run read B a second ago (and may be mapping it now)
    _bound(monkeypatch, 1.5 * max(entry.size for entry in pixel_disk.entries(cache_dir)))
    c = _run(preprocessing, 3)[0]
    assert _keys(cache_dir) == {b, c}


def test_a_set_larger_than_the_bound_is_kept_for_its_run_then_goes_first(preprocessing, cache_dir, monkeypatch, caplog):
    monkeypatch.setattr(pixel_disk, "RECENT_S", 0.0)
    small = _run(preprocessing, 1)[0]
    size = pixel_disk.entries(cache_dir)[0].size
    clear_pixel_cache()
    _bound(monkeypatch, 2.5 * size)
    with caplog.at_level(logging.WARNING, logger="hf_merge"):
        big = _run(preprocessing, 9, per_class=8)[0]  # 64 images: over 3.5 small sets (whose meta.json weighs too)
    assert _keys(cache_dir) == {big}
    (warning,) = _warnings(caplog)
    assert warning.startswith("colors-9: its preprocessed images (") and "kept for this run" in warning and ENV in warning

    # Later runs: the large set goes before sets used less recently than it.
    monkeypatch.delenv(ENV)
    assert _run(preprocessing, 1)[0] == small
    s2 = _run(preprocessing, 2)[0]
    _used(cache_dir, small, 3)
    _used(cache_dir, big, 1)
    _used(cache_dir, s2, 0.5)
    _bound(monkeypatch, 3.5 * size)
    assert next(e.size for e in pixel_disk.entries(cache_dir) if e.key == big) > 3.5 * size
    s3 = _run(preprocessing, 3)[0]
    assert _keys(cache_dir) == {small, s2, s3}  # least recently used alone would have taken the small one too


def test_partial_folders_are_never_read_and_are_removed(preprocessing, cache_dir, monkeypatch):
    key = PixelCache(workers=0).key(load_task_data(_task(1)), preprocessing)
    cache_dir.mkdir(parents=True)
    (cache_dir / key).mkdir()  # a crash while deleting it: pixels without meta.json
    np.save(cache_dir / key / "pixels.npy", np.zeros((8, 3, 2, 2), dtype=np.uint8))
    assert key not in _keys(cache_dir)
    assert _run(preprocessing, 1) == (key, 1)  # built again, not read
    assert (cache_dir / key / "meta.json").exists()

    stale, live, trash, orphan = (cache_dir / name for name in (".building-stale", ".building-live", ".evicting-x", "ab" * 20))
    for folder in (stale, live, trash, orphan):
        folder.mkdir()
        (folder / "pixels.npy").write_bytes(b"\0" * 1000)
    for folder, hours in ((stale, 2), (orphan, 1 / 60)):
        stamp = time.time() - hours * HOUR
        for path in (folder / "pixels.npy", folder):
            os.utime(path, (stamp, stamp))
    assert _keys(cache_dir) == {key}  # none of them counts as a set
    other = _run(preprocessing, 2)[0]  # a completed set: the cache is tidied
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([key, other, live.name])  # a builder still writes there


@pytest.mark.parametrize("value", ["abc", "0", "-2", "nan", "inf", "20GB"])
def test_a_bad_bound_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(EvaluationError) as error:
        PixelCache(workers=0)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{ENV}={value!r}: expected a positive number of GiB")


def test_the_bound_reads_fractions_of_a_gib(monkeypatch):
    assert PixelCache(workers=0).disk_budget == 20 * GIB
    monkeypatch.setenv(ENV, "0.5")
    assert PixelCache(workers=0).disk_budget == GIB // 2
    monkeypatch.setenv(ENV, " 1e-6 ")
    assert PixelCache(workers=0).disk_budget == int(1e-6 * GIB)


def test_clear_pixel_cache_frees_what_it_reports(preprocessing, cache_dir):
    for seed in (1, 2):
        _run(preprocessing, seed)
    (cache_dir / ".building-stale").mkdir()
    (cache_dir / ".building-stale" / "pixels.npy").write_bytes(b"\0" * 5000)
    os.utime(cache_dir / ".building-stale", (0, 0))
    os.utime(cache_dir / ".building-stale" / "pixels.npy", (0, 0))
    reader = PixelCache(workers=0, memory_budget=0)
    assert sum(len(p) for p, _ in reader.batches(load_task_data(_task(3)), preprocessing, 4)) == 8
    (mapped,) = reader._sets

    before = _du(cache_dir)
    freed = clear_pixel_cache()
    assert freed == before - _du(cache_dir) > 5000
    assert _keys(cache_dir) == {mapped} and _du(cache_dir) == _du(cache_dir / mapped)  # still read by this process

    del reader
    gc.collect()
    held = _du(cache_dir)
    assert clear_pixel_cache(cache_dir) == held > 0  # the folder can be named
    assert not _keys(cache_dir) and _du(cache_dir) == 0 and clear_pixel_cache() == 0
    assert _run(preprocessing, 3)[1] == 1  # built again
