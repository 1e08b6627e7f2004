"""A task's test images preprocessed once, by worker processes, and kept for every later evaluation.

:meth:`PixelCache.open` returns the :class:`PixelSet` of a task under one image processor. The first
time, the images are decoded and preprocessed by ``workers`` processes (a ``torch.utils.data``
``DataLoader`` over chunks of the split) and the pixels are stored as they arrive, so the first
evaluation runs while the set is still being built; every later evaluation of the task (the next
merge step, the base, each expert) reads the stored pixels.

What is stored: the processor's uint8 crops when :class:`~hf_merge.evaluation.preprocessing.PixelLookup`
reproduces the processor's float output from them bit for bit (checked on the first images of every
set built), else the float pixels. A set is kept in memory while the cache's memory budget allows,
else in a memory-mapped ``.npy`` file under ``<cache>/eval-pixels/<key>/`` (``$HF_MERGE_CACHE`` or
``~/.cache/hf-merge``), which later runs reuse. The key is a SHA-256 of the dataset's fingerprint
(revision or content, split, holdout, limit) and the processor's class and settings, so a set written under
another processor config or dataset revision is never read.

The sets on disk are bounded: ``$HF_MERGE_EVAL_CACHE_MAX_GB`` GiB (a positive number such as ``20``
or ``0.5``; 20 GiB when unset). Each read of a set records its use; after a set is completed, the
least recently used sets are deleted until the rest fit the bound, sparing the set just written, the
sets this process has mapped and those another process used in the last seconds. A set larger than
the bound is kept for the run that wrote it, with a warning, and is the first deleted later.
:func:`clear_pixel_cache` deletes them all (see :mod:`hf_merge.evaluation.pixel_disk`).

An image that cannot be decoded is skipped with one warning naming its index, and counted
(:attr:`PixelSet.undecodable`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_merge.errors import EvaluationError
from hf_merge.evaluation import pixel_disk
from hf_merge.evaluation.datasets import TaskData
from hf_merge.evaluation.pixel_disk import MAX_GB_ENV, clear_pixel_cache, default_cache_dir, human
from hf_merge.evaluation.preprocessing import (
    PixelLookup,
    Preprocessing,
    crops_and_pixels,
    process,
)
from hf_merge.log import get_logger

logger = get_logger(__name__)

CACHE_FORMAT = 1
CHUNK = 32  # images per worker task: large enough to amortise the transfer, small enough to start soon
_VERIFY = 8  # images whose uint8 crops are checked against the processor's float output
_WARNINGS = 10  # undecodable images named one by one, per task; the rest are only counted
_META, _PIXELS = pixel_disk.META, pixel_disk.PIXELS
__all__ = ["PixelCache", "PixelSet", "clear_pixel_cache", "default_cache_dir", "default_workers"]


def default_workers() -> int:
    """Preprocessing processes: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class PixelSet:
    """The preprocessed images of one task under one processor.

    Attributes:
        key: The cache key (see the module docstring).
        kept: Index, in the task's data, of each stored image (undecodable ones are left out).
        pixels: ``(len(kept), C, H, W)`` uint8 crops (``lookup`` set) or float32 pixel values.
        lookup: Turns the crops into the processor's float pixels; ``None`` when floats are stored.
        undecodable: Indices of the images that could not be decoded.
        location: ``"memory"`` or the folder of the memory-mapped file.
    """

    key: str
    kept: list[int] = field(default_factory=list)
    pixels: np.ndarray | None = None
    lookup: PixelLookup | None = None
    undecodable: list[int] = field(default_factory=list)
    location: str = "memory"

    def __len__(self) -> int:
        return len(self.kept)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored pixels."""
        return 0 if self.pixels is None else int(self.pixels.nbytes)


class PixelCache:
    """Preprocessed pixels of every task evaluated in this run; see the module docstring.

    Args:
        workers: Processes that decode and preprocess (0: in this process).
        memory_budget: Bytes of pixels kept in memory; sets beyond it go to memory-mapped files.
        cache_dir: Folder of the memory-mapped files (default :func:`default_cache_dir`).
        disk_budget: Bytes the completed sets on disk may hold, all runs together (default
            ``$HF_MERGE_EVAL_CACHE_MAX_GB`` GiB, else 20 GiB); see the module docstring.
    """

    def __init__(self, *, workers: int | None = None, memory_budget: int = 2 * 1024**3,
                 cache_dir: str | Path | None = None, disk_budget: int | None = None):
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise EvaluationError(f"workers must be 0 or more, got {self.workers}")
        self.memory_budget = memory_budget
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        # Read here, not after the first set is built: a bad value stops the run before any work.
        self.disk_budget = pixel_disk.disk_budget() if disk_budget is None else disk_budget
        if self.disk_budget <= 0:
            raise EvaluationError(f"disk_budget must be a positive number of bytes, got {self.disk_budget}")
        self._warned_over = False
        self._sets: dict[str, PixelSet] = {}
        self.builds = 0  # sets preprocessed (not read from memory or disk), for tests and benchmarks

    def key(self, data: TaskData, preprocessing: Preprocessing) -> str:
        """The key of ``data`` under ``preprocessing`` (see the module docstring)."""
        if not data.fingerprint:
            raise EvaluationError(f"task {data.task.name}: the dataset has no fingerprint to key its pixels by")
        parts = [CACHE_FORMAT, data.fingerprint, len(data), preprocessing.fingerprint()]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]

    def batches(self, data: TaskData, preprocessing: Preprocessing, batch_size: int) -> Iterator[tuple[np.ndarray, PixelSet]]:
        """``(pixels, set)`` batch by batch, ``batch_size`` stored images at a time, building the set if needed.

        Batches are consecutive stored images, as the model saw them without a cache; ``set.kept``
        maps them back to the data and ``set.undecodable`` is complete once the iteration ends.
        """
        key = self.key(data, preprocessing)
        ready = self._sets.get(key) or self._from_disk(key)
        if ready is not None:
            self._sets[key] = ready
            if ready.location != "memory":
                pixel_disk.touch(Path(ready.location))  # a use: what eviction orders sets by
            for start in range(0, len(ready), batch_size):
                assert ready.pixels is not None
                yield ready.pixels[start : start + batch_size], ready
            return
        building = _Build(self, key, data, preprocessing)
        done = 0
        try:
            for stored in building.run():
                while stored - done >= batch_size:
                    yield building.pixels_set.pixels[done : done + batch_size], building.pixels_set  # type: ignore[index]
                    done += batch_size
            stored = len(building.pixels_set)  # rows past it were allocated for undecodable images
            if stored > done:
                yield building.pixels_set.pixels[done:stored], building.pixels_set  # type: ignore[index]
        except BaseException:
            building.abandon()
            raise
        self._sets[key] = building.finish()
        self.builds += 1
        if self._sets[key].location != "memory":
            self._bound_disk(key, building.data.task.name)

    def _bound_disk(self, key: str, task: str) -> None:
        """Evict least recently used sets after ``key`` was written; say when the bound cannot be kept."""
        freed, total = pixel_disk.evict(self.cache_dir, self.disk_budget, keep=key)
        bound = f"{human(self.disk_budget)} (${MAX_GB_ENV})"
        if freed:
            logger.info("pixel cache: freed %s of least recently used sets, to stay within %s", human(freed), bound)
        written = next((e.size for e in pixel_disk.entries(self.cache_dir) if e.key == key), 0)
        if written > self.disk_budget:
            logger.warning("%s: its preprocessed images (%s) are more than the pixel cache's bound of %s: "
                           "kept for this run, and the first set deleted later", task, human(written), bound)
        elif total > self.disk_budget and not self._warned_over:
            self._warned_over = True  # each later set would say the same
            logger.warning("pixel cache: %s on disk, over its bound of %s: the other sets are in use by this "
                           "run or were just used by another; they are deleted after it", human(total), bound)

    def _in_memory_bytes(self) -> int:
        return sum(s.nbytes for s in self._sets.values() if s.location == "memory")

    def _from_disk(self, key: str) -> PixelSet | None:
        folder = self.cache_dir / key
        try:
            meta = json.loads((folder / _META).read_text(encoding="utf-8"))
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                return None
            pixels = np.load(folder / _PIXELS, mmap_mode="r")
        except (OSError, ValueError):
            return None
        pixel_disk.hold(folder, pixels)
        lookup = PixelLookup(torch.tensor(meta["lookup"], dtype=torch.float32)) if meta.get("lookup") else None
        return PixelSet(key, list(meta["kept"]), pixels[: len(meta["kept"])], lookup, list(meta["undecodable"]), str(folder))


class _Build:
    """One set being built: workers' chunks written in order into memory or a memory-mapped file."""

    def __init__(self, cache: PixelCache, key: str, data: TaskData, preprocessing: Preprocessing):
        self.cache, self.data, self.preprocessing = cache, data, preprocessing
        self.pixels_set = PixelSet(key)
        self.folder: Path | None = None
        self.staging: Path | None = None
        self.warned = 0

    def run(self) -> Iterator[int]:
        """Fill the set chunk by chunk; yields how many images are stored so far."""
        chunks = _Chunks(self.data, self.preprocessing, uint8=False)
        first = chunks.decode(0, min(len(self.data), CHUNK))
        use_crops = self._choose_storage(first)
        chunks.uint8 = use_crops
        self._store(chunks.process(first))
        yield len(self.pixels_set)
        rest = _Chunks(self.data, self.preprocessing, uint8=use_crops, start=CHUNK)
        for result in _load(rest, self.cache.workers):
            self._store(result)
            yield len(self.pixels_set)
        if not self.pixels_set.kept:
            raise EvaluationError(f"task {self.data.task.name}: none of its {len(self.data)} images could be decoded")

    def _choose_storage(self, first: _Decoded) -> bool:
        """uint8 crops when the lookup reproduces the processor's floats on the first images, else floats."""
        sample = first.images[:_VERIFY]
        if not sample:
            return False
        crops, pixels = crops_and_pixels(self.preprocessing, sample)
        lookup = PixelLookup.of(self.preprocessing.processor, channels=pixels.shape[1]) if crops is not None else None
        if crops is None or lookup is None or not torch.equal(lookup(torch.from_numpy(crops)), torch.from_numpy(pixels)):
            logger.info("%s: storing float pixels (the processor's output is not rebuilt exactly from uint8 crops)",
                        self.data.task.name)
            return False
        self.pixels_set.lookup = lookup
        return True

    def _store(self, result: _Processed) -> None:
        self._warn(result.undecodable)
        self.pixels_set.undecodable.extend(index for index, _ in result.undecodable)
        if result.pixels is None or not len(result.pixels):
            return
        target = self.pixels_set
        if target.pixels is None:
            target.pixels = self._allocate(result.pixels)
        stored = len(target.kept)
        target.pixels[stored : stored + len(result.pixels)] = result.pixels
        target.kept.extend(result.kept)
        if self.staging is not None:
            pixel_disk.touch(self.staging)  # alive: another process's cleanup keeps this folder

    def _allocate(self, sample: np.ndarray) -> np.ndarray:
        shape = (len(self.data), *sample.shape[1:])
        size = int(np.prod(shape)) * sample.dtype.itemsize
        if self.cache._in_memory_bytes() + size <= self.cache.memory_budget:
            return np.empty(shape, dtype=sample.dtype)
        self.cache.cache_dir.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=pixel_disk.STAGING, dir=self.cache.cache_dir))
        self.folder = self.cache.cache_dir / self.pixels_set.key
        logger.info("%s: %.1f GB of preprocessed images go to %s", self.data.task.name, size / 1e9, self.folder)
        return np.lib.format.open_memmap(self.staging / _PIXELS, mode="w+", dtype=sample.dtype, shape=shape)

    def _warn(self, undecodable: list[tuple[int, str]]) -> None:
        for index, reason in undecodable:
            self.warned += 1
            if self.warned <= _WARNINGS:
                logger.warning("%s: skipping image %d, which cannot be decoded (%s)", self.data.task.name, index, reason)
            elif self.warned == _WARNINGS + 1:
                logger.warning("%s: more images cannot be decoded; each is skipped and counted", self.data.task.name)

    def finish(self) -> PixelSet:
        """The completed set; a memory-mapped one is moved into place with its ``meta.json`` last."""
        result = self.pixels_set
        if result.pixels is not None:
            result.pixels = result.pixels[: len(result.kept)]
        if self.staging is None or self.folder is None:
            return result
        assert isinstance(result.pixels, np.memmap)
        result.pixels.flush()
        meta = {"format": CACHE_FORMAT, "key": result.key, "task": self.data.task.name, "source": self.data.source,
                "preprocessing": self.preprocessing.config(), "kept": result.kept, "undecodable": result.undecodable,
                "lookup": result.lookup.table.tolist() if result.lookup is not None else None}
        (self.staging / _META).write_text(json.dumps(meta), encoding="utf-8")
        (self.staging / pixel_disk.USED).touch()
        # Mapped before the rename: the mapping follows the file, whatever another process deletes later.
        mapped = np.load(self.staging / _PIXELS, mmap_mode="r")
        pixel_disk.remove(self.folder)  # an incomplete folder under the same key
        try:
            os.replace(self.staging, self.folder)
        except OSError:
            # Another process completed the same set meanwhile: theirs stays, ours is still mapped.
            pixel_disk.remove(self.staging)
        pixel_disk.hold(self.folder, mapped)
        result.pixels = mapped[: len(result.kept)]
        result.location = str(self.folder)
        return result

    def abandon(self) -> None:
        """Drop a set whose evaluation stopped midway (its staging file included)."""
        if self.staging is not None:
            pixel_disk.remove(self.staging)


@dataclass
class _Decoded:
    start: int
    indices: list[int]
    images: list[Any]
    undecodable: list[tuple[int, str]]


@dataclass
class _Processed:
    kept: list[int]
    pixels: np.ndarray | None
    undecodable: list[tuple[int, str]]


class _Chunks(torch.utils.data.Dataset):
    """Chunk ``k`` of the data (``CHUNK`` images from ``start + k * CHUNK``), decoded and preprocessed."""

    def __init__(self, data: TaskData, preprocessing: Preprocessing, *, uint8: bool, start: int = 0):
        self.data, self.preprocessing, self.uint8, self.start = data, preprocessing, uint8, start

    def __len__(self) -> int:
        return max(0, -(-(len(self.data) - self.start) // CHUNK))

    def __getitem__(self, k: int) -> _Processed:
        begin = self.start + k * CHUNK
        return self.process(self.decode(begin, min(begin + CHUNK, len(self.data))))

    def decode(self, begin: int, stop: int) -> _Decoded:
        decoded = _Decoded(begin, [], [], [])
        for index in range(begin, stop):
            try:
                decoded.images.append(self.data.image(index))
                decoded.indices.append(index)
            except EvaluationError as error:
                # The reason alone: the task and index are in the warning, object addresses say nothing.
                decoded.undecodable.append((index, re.sub(r" <[^>]*>", "", str(error).rpartition(": ")[2])))
        return decoded

    def process(self, decoded: _Decoded) -> _Processed:
        if not decoded.images:
            return _Processed([], None, decoded.undecodable)
        pixels = process(self.preprocessing, decoded.images, crops=self.uint8)
        return _Processed(decoded.indices, pixels, decoded.undecodable)


def _load(chunks: _Chunks, workers: int) -> Iterator[_Processed]:
    """The chunks in order, from ``workers`` processes (or this one)."""
    if len(chunks) == 0:
        return
    if workers == 0 or len(chunks) == 1:
        yield from (chunks[k] for k in range(len(chunks)))
        return
    # fork: a task's data reads through closures (datasets, folders, functions) that do not pickle.
    context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(
        chunks, batch_size=None, num_workers=min(workers, len(chunks)), collate_fn=_as_is,
        worker_init_fn=_one_thread, multiprocessing_context=context, prefetch_factor=4,
    )
    yield from loader


def _as_is(item: Any) -> Any:
    return item


def _one_thread(_: int) -> None:
    # Each worker is one core's worth of decoding; torch's own threads would only compete.
    torch.set_num_threads(1)
