"""The pixel cache's folder on disk: completed sets, when each was last used, and the bound that evicts them.

``<cache>/eval-pixels/`` (see :mod:`hf_merge.evaluation.preprocess_cache`) holds:

- ``<key>/``: a completed set: ``pixels.npy``, ``meta.json`` and ``used``, whose mtime is the set's
  last use (touched whenever the set is read, not only when it is written). A set is complete once
  its folder exists with its ``meta.json``: it is written in a ``.building-*`` folder, ``meta.json``
  last, and renamed into place, so no reader ever finds half a set under its key.
- ``.building-*``: a set being written, or one left by a process that stopped midway.
- ``.evicting-*``: a set being deleted (renamed first, for the same reason).

After each completed set, :func:`evict` deletes the least recently used sets until the completed sets
hold at most the bound: ``$HF_MERGE_EVAL_CACHE_MAX_GB`` GiB (a positive number such as ``20`` or
``0.5``), 20 GiB when unset. :func:`clear_pixel_cache` deletes every set this process is not using.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_merge.errors import EvaluationError

MAX_GB_ENV = "HF_MERGE_EVAL_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
GIB = 1024**3
META = "meta.json"
PIXELS = "pixels.npy"
USED = "used"
STAGING = ".building-"
TRASH = ".evicting-"
# Another process may read a set between listing it and mapping it, or be about to map the set it
# has just written; rather than lock, a set used in the last RECENT_S seconds is never evicted.
# (A set that another process has already mapped is safe to delete on POSIX: its mapping stays valid.)
RECENT_S = 10.0
# A builder touches its staging folder at every chunk it stores; one untouched this long is left
# by a process that stopped midway.
STALE_S = 3600.0

# Sets mapped by this process, by folder: an entry stays mapped while any array still views its memmap.
_mapped: dict[str, list[weakref.ref[np.ndarray]]] = {}


@dataclass(frozen=True)
class CacheEntry:
    """A completed set on disk.

    Attributes:
        key: Its cache key (the folder's name).
        folder: Its folder.
        size: Bytes of its files.
        last_used: When it was last read or written (seconds since the epoch).
    """

    key: str
    folder: Path
    size: int
    last_used: float


def default_cache_dir() -> Path:
    """``$HF_MERGE_CACHE/eval-pixels``, else ``~/.cache/hf-merge/eval-pixels``."""
    root = os.environ.get("HF_MERGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "hf-merge") / "eval-pixels"


def disk_budget() -> int:
    """Bytes the completed sets may hold: ``$HF_MERGE_EVAL_CACHE_MAX_GB`` GiB, else 20 GiB."""
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * GIB)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise EvaluationError(
            f"{MAX_GB_ENV}={raw!r}: expected a positive number of GiB (such as 20 or 0.5), "
            "the most disk space the evaluation pixel cache may use"
        )
    return max(1, int(value * GIB))


def human(size: float) -> str:
    """``size`` bytes in GiB, MiB or KiB, whichever reads best (bounds in tests are a few KiB)."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} bytes"


def is_key(name: str) -> bool:
    """Whether ``name`` is a set's folder name (a 40-digit hex key) rather than staging or trash."""
    return len(name) == 40 and all(c in "0123456789abcdef" for c in name)


def hold(folder: Path, mapped: np.ndarray) -> None:
    """Mark ``folder`` in use by this process while ``mapped`` (or any view of it) is alive."""
    refs = _mapped.setdefault(os.path.abspath(folder), [])
    refs[:] = [r for r in refs if r() is not None] + [weakref.ref(mapped)]


def in_use() -> set[str]:
    """Absolute folders of the sets that this process still has mapped."""
    for folder in list(_mapped):
        _mapped[folder] = [r for r in _mapped[folder] if r() is not None]
        if not _mapped[folder]:
            del _mapped[folder]
    return set(_mapped)


def touch(path: Path) -> None:
    """Record a use of the set in ``path`` (or a builder's progress in its staging folder)."""
    try:
        if path.name.startswith(STAGING):
            os.utime(path)
        else:
            (path / USED).touch()
    except OSError:
        pass  # evicted meanwhile by another process, or a read-only cache: the set is still readable


def entries(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """The completed sets under ``cache_dir`` (default :func:`default_cache_dir`), partial folders left out."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = []
    for folder in _children(root):
        if not is_key(folder.name):
            continue
        try:
            stamp = folder / USED if (folder / USED).exists() else folder / META  # META: written before `used` existed
            found.append(CacheEntry(folder.name, folder, _size(folder), stamp.stat().st_mtime))
        except OSError:
            continue  # no meta.json: incomplete; or removed while listed
    return found


def evict(cache_dir: Path, budget: int, *, keep: str) -> tuple[int, int]:
    """Delete least recently used sets until the completed ones hold at most ``budget`` bytes.

    Never deleted: the set ``keep`` (just written), sets this process has mapped, and sets used in the
    last :data:`RECENT_S` seconds. Sets larger than ``budget`` go first (each was kept only for the run
    that wrote it). Partial folders are removed on the way. Returns ``(bytes freed, bytes still held)``.
    """
    now = time.time()
    freed = _sweep(cache_dir, now)
    found = entries(cache_dir)
    total = sum(entry.size for entry in found)
    mapped = in_use()
    for entry in sorted(found, key=lambda e: (e.size <= budget, e.last_used)):
        if total <= budget:
            break
        if entry.key == keep or os.path.abspath(entry.folder) in mapped or now - entry.last_used < RECENT_S:
            continue
        if remove(entry.folder):
            total -= entry.size
            freed += entry.size
    return freed, total


def clear_pixel_cache(cache_dir: str | Path | None = None) -> int:
    """Delete the evaluation pixel cache's sets from disk; returns the bytes freed.

    Sets this process still has mapped are kept (their space would only be freed when unmapped), as
    are staging folders another process is still writing. Another process reading a deleted set
    keeps its mapping; one about to read it builds it again.

    Args:
        cache_dir: The cache's folder (default :func:`default_cache_dir`).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    freed = _sweep(root, time.time())
    mapped = in_use()
    for entry in entries(root):
        if os.path.abspath(entry.folder) not in mapped and remove(entry.folder):
            freed += entry.size
    return freed


def remove(folder: Path) -> bool:
    """Delete ``folder``, renamed out of its key first so that no reader finds it half deleted."""
    trash = folder.parent / f"{TRASH}{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.replace(folder, trash)
    except OSError:
        return False  # already gone: another process evicted it
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _sweep(root: Path, now: float) -> int:
    """Remove what no completed set owns: trash, stale staging folders, key folders without ``meta.json``."""
    freed = 0
    for folder in _children(root):
        name = folder.name
        try:
            if name.startswith(TRASH):
                stale = True  # another process deleting it too is harmless: rmtree ignores what vanished
            elif name.startswith(STAGING):
                stale = now - _newest(folder) > STALE_S
            elif is_key(name):
                stale = not (folder / META).exists() and now - _newest(folder) > RECENT_S
            else:
                continue  # not ours
            size = _size(folder) if stale else 0
        except OSError:
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            freed += size
    return freed


def _children(root: Path) -> list[Path]:
    try:
        return [path for path in root.iterdir() if path.is_dir()]
    except OSError:
        return []


def _files(folder: Path) -> list[os.stat_result]:
    return [path.stat() for path in folder.rglob("*") if path.is_file()]


def _size(folder: Path) -> int:
    return sum(stat.st_size for stat in _files(folder))


def _newest(folder: Path) -> float:
    return max([folder.stat().st_mtime] + [stat.st_mtime for stat in _files(folder)])
