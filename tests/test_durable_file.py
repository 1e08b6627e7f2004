"""DurableFile: the bytes on disk are the bytes written, with O_DIRECT or without, and on fallback."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from hf_merge.io import durable_file
from hf_merge.io.durable_file import DurableFile

SIZES = [0, 1, 4095, 4096, 4097, durable_file._CHUNK - 1, durable_file._CHUNK, 2 * durable_file._CHUNK + 12345]


def _payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed + size).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_bytes_on_disk_are_the_bytes_written(tmp_path, size, direct):
    data = _payload(size)
    path = tmp_path / "f.bin"
    with DurableFile(path, direct=direct) as handle:
        # uneven pieces, as a header and tensors of any size arrive
        for start in range(0, size, 7777):
            handle.write(data[start : start + 7777])
    assert handle.size == size
    assert path.read_bytes() == data


def test_direct_io_is_used_where_the_file_system_allows_it(tmp_path):
    with DurableFile(tmp_path / "f.bin", direct=True) as handle:
        handle.write(b"x" * 10)
        used = handle.direct
    probe_ok = True
    try:
        fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        os.close(fd)
    except OSError:
        probe_ok = False
    assert used == probe_ok


def test_an_existing_larger_file_is_overwritten_and_cut_to_size(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\xff" * (3 * 4096 + 5))
    inode = path.stat().st_ino
    with DurableFile(path) as handle:
        handle.write(b"abc")
    assert path.read_bytes() == b"abc"
    assert path.stat().st_ino == inode  # in place: a recycled spare keeps its blocks


def test_numpy_and_memoryview_inputs(tmp_path):
    array = np.arange(1000, dtype=np.float32)
    path = tmp_path / "f.bin"
    with DurableFile(path) as handle:
        handle.write(array.view(np.uint8))
        handle.write(memoryview(b"tail"))
    assert path.read_bytes() == array.tobytes() + b"tail"


def test_open_refused_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    data = _payload(durable_file._CHUNK + 100)
    path = tmp_path / "f.bin"
    with DurableFile(path, direct=True) as handle:
        handle.write(data)
        assert handle.direct is False
    assert path.read_bytes() == data


def test_write_refused_midway_switches_to_the_page_cache(tmp_path, monkeypatch):
    real_write = os.pwrite
    calls = {"n": 0}

    def refuse_second(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_second)
    data = _payload(3 * durable_file._CHUNK + 999)
    path = tmp_path / "f.bin"
    handle = DurableFile(path, direct=True)
    was_direct = handle.direct
    with handle:
        handle.write(data)
    assert path.read_bytes() == data
    assert handle.direct is False or not was_direct


def test_other_write_errors_propagate(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        with DurableFile(tmp_path / "f.bin", direct=False) as handle:
            handle.write(b"x" * (durable_file._CHUNK + 1))


def test_environment_turns_direct_io_off(tmp_path, monkeypatch):
    monkeypatch.setenv(durable_file.ENV_DIRECT_IO, "0")
    with DurableFile(tmp_path / "f.bin") as handle:
        handle.write(b"abc")
        assert handle.direct is False
    assert (tmp_path / "f.bin").read_bytes() == b"abc"


def test_a_failed_background_write_is_raised_by_the_next_write(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    handle = DurableFile(tmp_path / "f.bin", direct=False)
    with pytest.raises(OSError, match="No space"):
        with handle:
            handle.write(b"x" * durable_file._CHUNK)  # handed to the background writer
            handle.write(b"y" * durable_file._CHUNK)  # waits for it before the next hand-over: raises here
            pytest.fail("the second write should have raised")  # pragma: no cover
    assert handle._fd == -1


def test_filling_overlaps_the_disk_write(tmp_path, monkeypatch):
    """While one buffer is being written, the caller is already filling the other."""
    import threading

    real_write = os.pwrite
    started, release = threading.Event(), threading.Event()

    def slow(fd, data, offset):
        started.set()
        release.wait(5)
        return real_write(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow)
    data = _payload(2 * durable_file._CHUNK + 10)
    path = tmp_path / "f.bin"
    with DurableFile(path, direct=False) as handle:
        handle.write(data[: durable_file._CHUNK])
        assert started.wait(5)
        handle.write(data[durable_file._CHUNK : durable_file._CHUNK + 100])  # returns while the disk is busy
        assert not release.is_set()
        release.set()
        handle.write(data[durable_file._CHUNK + 100 :])
    assert path.read_bytes() == data


def _record_writes(monkeypatch) -> list[tuple[int, int]]:
    """(offset, length) of every write that reaches the file."""
    real_write, writes = os.pwrite, []

    def recording(fd, data, offset):
        writes.append((offset, len(data)))
        return real_write(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording)
    return writes


# (kind, length): "w" writes new bytes, "s" skips bytes the file holds
LAYOUTS = [
    [("w", 100), ("s", 5 * 4096 + 17), ("w", 3000)],  # a skip longer than the buffer, unaligned ends
    [("s", 9000), ("w", 1)],  # the file's start skipped
    [("w", 4096), ("s", 8 * 4096), ("s", 12345), ("w", 7)],  # aligned start, two skips in a row
    [("w", 10), ("s", 30), ("w", 10)],  # a skip inside the buffer: copied, not split
    [("w", 5000), ("s", 50_000)],  # the file ends in a skip
]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_skipped_bytes_are_kept_and_not_written(tmp_path, monkeypatch, layout, direct):
    monkeypatch.setattr(durable_file, "_CHUNK", 4 * 4096)  # small buffers: the skips span several
    size = sum(length for _, length in layout)
    old, new = _payload(size, seed=1), _payload(size, seed=2)
    path = tmp_path / "f.bin"
    path.write_bytes(old + b"\xee" * 999)  # a longer file: cut to size at the end
    expected, position, skipped = bytearray(), 0, []
    writes = _record_writes(monkeypatch)
    with DurableFile(path, direct=direct) as handle:
        for kind, length in layout:
            piece = slice(position, position + length)
            if kind == "w":
                handle.write(new[piece])
                expected += new[piece]
            else:
                handle.skip(length, lambda view, start, at=position: view.__setitem__(slice(None), old[at + start : at + start + len(view)]))
                expected += old[piece]
                skipped.append((position, position + length))
            position += length
    assert path.read_bytes() == bytes(expected)
    assert handle.size == size
    for begin, end in skipped:
        if end - begin > durable_file._CHUNK:
            # only the blocks shared with written bytes are rewritten: whole blocks inside are not
            inner = (-(-begin // 4096) * 4096, end // 4096 * 4096)
            rewritten = sum(max(0, min(o + n, inner[1]) - max(o, inner[0])) for o, n in writes)
            assert rewritten == 0, (begin, end, writes)


def test_write_from_fills_the_buffer_in_place(tmp_path):
    data = _payload(3 * durable_file._CHUNK + 5)
    asked = []

    def fill(view, start):
        asked.append((start, len(view)))
        view[:] = data[start : start + len(view)]

    with DurableFile(tmp_path / "f.bin") as handle:
        handle.write(b"head")
        handle.write_from(len(data), fill)
    assert (tmp_path / "f.bin").read_bytes() == b"head" + data
    # contiguous pieces, none larger than a buffer
    assert [s for s, _ in asked] == [sum(n for _, n in asked[:i]) for i in range(len(asked))]
    assert max(n for _, n in asked) <= durable_file._CHUNK
