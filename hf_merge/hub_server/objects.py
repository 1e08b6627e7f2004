"""The local Hub's object store: content-addressed files, atomic writes, and garbage collection.

Layout under ``root``::

    objects/blobs/ab/<git blob sha1>      regular files, addressed as git addresses them
    objects/lfs/ab/<sha256>               large files, addressed as Git LFS addresses them
    tmp/                                  partial writes, renamed into place when complete

Objects are shared by every repo underneath (one copy of a file however many repos hold it);
which repo may *reach* which LFS object is the storage's business (:mod:`~hf_merge.hub_server.storage`).

Garbage collection deletes the objects no repo references. It must not run while a writer is
between storing an object and recording the commit (or upload) that references it, so writers
hold :attr:`ObjectStore.gc_lock` shared and the collector holds it exclusively.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from hf_merge.hub_server.git import HubError, git_blob_sha1
from hf_merge.log import get_logger

logger = get_logger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NO_SPACE_MESSAGE = "No space left on the local Hub's disk: delete repos (or free space on its disk), then retry."
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def no_space_error(error: BaseException) -> HubError | None:
    """The Hub's ``507 Insufficient Storage`` for a full disk (or quota); ``None`` for any other error."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
        return HubError(507, NO_SPACE_MESSAGE, code="InsufficientStorage")
    return None


class SharedExclusiveLock:
    """Many holders in shared mode, or one in exclusive mode; exclusive waiters block new shared ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_exclusive += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class ObjectStore:
    """Blobs and LFS objects under ``root``; temporary files of a previous run are removed on start."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        for sub in ("objects/blobs", "objects/lfs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.gc_lock = SharedExclusiveLock()
        self.removed_temporaries = self._clean_temporaries()

    def _clean_temporaries(self) -> int:
        # One server owns a root: whatever is in tmp/ now is a write that died with an earlier run.
        count = 0
        for path in (self.root / "tmp").iterdir():
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                count += 1
            except OSError as error:
                logger.warning("Cannot remove leftover temporary %s: %s", path.name, error)
        if count:
            logger.info("Removed %d temporary file(s) left by an interrupted run", count)
        return count

    def tmp_path(self) -> Path:
        """A fresh path under ``tmp/`` (same file system as the objects, so renames are atomic)."""
        return self.root / "tmp" / uuid.uuid4().hex

    def write_atomic(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` through a temporary file; a failed write leaves nothing behind."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_path()
        try:
            with open(tmp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    # ---- objects -------------------------------------------------------------------------------
    def blob_path(self, oid: str) -> Path:
        return self.root / "objects" / "blobs" / oid[:2] / oid

    def lfs_path(self, sha256: str) -> Path:
        return self.root / "objects" / "lfs" / sha256[:2] / sha256

    def put_blob(self, data: bytes) -> str:
        """Store a regular file's content; returns its git blob sha1."""
        oid = git_blob_sha1(data)
        path = self.blob_path(oid)
        if not path.exists():
            self.write_atomic(path, data)
        return oid

    def lfs_size(self, sha256: str) -> int | None:
        """Size of a stored LFS object, or ``None`` if it was never (completely) uploaded."""
        if not _SHA256_RE.fullmatch(sha256 or ""):
            return None
        path = self.lfs_path(sha256)
        return path.stat().st_size if path.exists() else None

    def receive_lfs(self, stream: Iterable[bytes], sha256: str, size: int) -> Path:
        """Stream an upload to a temporary file, checked against its promised size and sha256.

        The caller moves the returned file into place (:meth:`install_lfs`) or deletes it.
        """
        tmp = self.tmp_path()
        digest, written = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as file:
                for chunk in stream:
                    written += len(chunk)
                    if written > size:
                        raise HubError(400, f"Upload is larger than the announced {size} bytes.")
                    digest.update(chunk)
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
            if written != size:
                raise HubError(400, f"Upload has {written} bytes, {size} were announced.")
            if digest.hexdigest() != sha256:
                raise HubError(400, "Upload content does not match its sha256 oid.")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def install_lfs(self, tmp: Path, sha256: str) -> None:
        """Move a checked upload into place (hold :attr:`gc_lock` shared around this and its record)."""
        path = self.lfs_path(sha256)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def open_content(self, sha256: str | None, oid: str) -> BinaryIO:
        path = self.lfs_path(sha256) if sha256 else self.blob_path(oid)
        return open(path, "rb")

    # ---- garbage collection ----------------------------------------------------------------------
    def sweep(self, blobs: set[str], lfs: set[str]) -> tuple[int, int]:
        """Delete every object not in ``blobs`` / ``lfs`` (hold :attr:`gc_lock` exclusively).

        Returns:
            (objects removed, bytes freed).
        """
        removed = freed = 0
        for kind, keep in (("blobs", blobs), ("lfs", lfs)):
            for path in (self.root / "objects" / kind).glob("*/*"):
                if path.name in keep:
                    continue
                try:
                    size = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed, freed = removed + 1, freed + size
        return removed, freed
