"""A large file written once and made durable: O_DIRECT through two aligned buffers where allowed.

Every weight file a merge writes is fsynced before the step is committed. Through the page cache
that means copying every byte into newly allocated cache pages and then writing those pages out;
with ``O_DIRECT`` the bytes go from reused, page-aligned buffers straight to the disk and the
fsync has almost nothing left to do (benchmarks/results/merge_speed.md measures both). Where the
file system refuses ``O_DIRECT`` (tmpfs, some overlay file systems, macOS, Windows) the same calls
write through the page cache instead; the bytes on disk are the same either way. A file being
overwritten in place can be passed over where it already holds the right bytes (:meth:`DurableFile.skip`).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_ALIGN = 4096  # O_DIRECT needs offsets, lengths and addresses aligned to the logical block size
_CHUNK = 8 << 20  # each of the two buffers, reused for the whole file

#: ``fill(view, start)``: copy bytes ``start..start + len(view)`` of some source into ``view``.
Fill = Callable[[memoryview, int], None]

#: Set ``HF_MERGE_DIRECT_IO=0`` to always write through the page cache.
ENV_DIRECT_IO = "HF_MERGE_DIRECT_IO"


class DurableFile:
    """Write ``path`` from the start (an existing file is overwritten in place, then cut to size).

    ``write`` takes any bytes-like object; :meth:`close` writes what is buffered, truncates the file
    to the bytes written and fsyncs it. Use as a context manager; on an exception the file is closed
    without being made durable (the caller discards it).

    Two buffers take turns: while one goes to the disk in a background thread, the caller fills the
    other, so copying (and whatever the caller computes between writes) overlaps the disk's time. A
    failed background write is raised by the next call.
    """

    def __init__(self, path: str | Path, *, direct: bool | None = None):
        self.path = Path(path)
        if direct is None:
            direct = os.environ.get(ENV_DIRECT_IO, "1") != "0"
        self.direct = bool(direct) and hasattr(os, "O_DIRECT")
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0)
        self._fd = -1
        if self.direct:
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
            except OSError:
                self.direct = False
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o644)
        self._buffers = [mmap.mmap(-1, _CHUNK), mmap.mmap(-1, _CHUNK)]  # anonymous maps are page-aligned
        self._buffer = self._buffers[0]
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hf-merge-write")
        self._in_flight: Future | None = None
        self._start = 0  # file offset of the buffer's first byte (aligned)
        self._used = 0
        self.size = 0  # set by close()

    @property
    def position(self) -> int:
        """Where the next byte goes: the file's size once closed."""
        return self._start + self._used

    def write(self, data: object) -> None:
        """Append ``data`` (bytes, bytearray, memoryview, a numpy array's memory)."""
        # numpy arrays have the buffer protocol, but numpy's stubs do not declare `__buffer__`.
        source = memoryview(data).cast("B")  # type: ignore[arg-type]

        def copy(view: memoryview, start: int) -> None:
            view[:] = source[start : start + len(view)]

        self.write_from(len(source), copy)

    def write_from(self, length: int, fill: Fill) -> None:
        """Append ``length`` bytes that ``fill(view, start)`` copies into the buffer, ``view`` taking
        bytes ``start..start + len(view)`` of them: a reader fills the buffer straight from its file."""
        done = 0
        while done < length:
            take = min(length - done, _CHUNK - self._used)
            with memoryview(self._buffer) as whole, whole[self._used : self._used + take] as view:
                fill(view, done)
            self._used += take
            done += take
            if self._used == _CHUNK:
                self._hand_over(_CHUNK)

    def skip(self, length: int, fill: Fill) -> None:
        """Pass over ``length`` bytes the file already holds at this position, writing none of them
        but the few that share a disk block with written bytes (``O_DIRECT`` writes whole blocks):
        ``fill`` gives those, as in :meth:`write_from`."""
        end = self.position + length
        if end <= self._start + _CHUNK:  # ends inside this buffer: copying is cheaper than a split write
            self.write_from(length, fill)
            return
        head = -self._used % _ALIGN  # completes the buffer's last block
        self.write_from(head, fill)
        if self._used:
            self._hand_over(self._used)
        self._start, self._used = end - end % _ALIGN, 0
        tail = end % _ALIGN  # starts the block the next write goes into
        self.write_from(tail, lambda view, start: fill(view, length - tail + start))

    def _hand_over(self, length: int) -> None:
        """Send the buffer's first ``length`` bytes to the disk in the background and go on filling
        the other buffer."""
        self._wait()
        self._in_flight = self._writer.submit(self._drain, self._buffer, length, self._start)
        self._buffer = self._buffers[1] if self._buffer is self._buffers[0] else self._buffers[0]
        self._start += length
        self._used = 0

    def _wait(self) -> None:
        """Wait for the write in flight, raising its error."""
        pending, self._in_flight = self._in_flight, None
        if pending is not None:
            pending.result()

    def _drain(self, buffer: mmap.mmap, length: int, offset: int) -> None:
        """Write the first ``length`` bytes of ``buffer`` at ``offset`` (multiples of the alignment
        when direct)."""
        written = 0
        with memoryview(buffer) as whole, whole[:length] as view:
            while written < length:
                try:
                    written += os.pwrite(self._fd, view[written:], offset + written)
                except OSError as err:
                    if not (self.direct and err.errno == errno.EINVAL):
                        raise
                    self._stop_direct()  # the file system opened the file O_DIRECT but refuses the write

    def _stop_direct(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self) -> None:
        """Write the rest, cut the file to the bytes written, fsync it and close it."""
        if self._fd < 0:
            return
        try:
            self._wait()
            tail = self._used
            if tail:
                # a direct write of the last block goes past the end; the truncate cuts it off
                self._drain(self._buffer, -(-tail // _ALIGN) * _ALIGN if self.direct else tail, self._start)
            self.size = self.position
            os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            self._release()

    def _release(self) -> None:
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - the file is being discarded, or close() already raised this
            pass
        finally:
            self._writer.shutdown()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            for buffer in self._buffers:
                try:
                    buffer.close()
                except BufferError:  # a failed write's traceback still holds a view of it; freed with that
                    pass

    def __enter__(self) -> DurableFile:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._release()


def is_sole_link(path: Path) -> bool:
    """``path`` is a regular file with no other name (not a symlink, not hard-linked from a
    download cache): writing into it changes nothing but this file."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1
