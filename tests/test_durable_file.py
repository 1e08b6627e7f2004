"""DurableFile: the bytes on disk are the bytes written, with O_DIRECT or without, and on fallback."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from hf_merge import durable_file
from hf_merge.durable_file import DurableFile

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
    real_write = os.write
    calls = {"n": 0}

    def refuse_second(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refuse_second)
    data = _payload(3 * durable_file._CHUNK + 999)
    path = tmp_path / "f.bin"
    handle = DurableFile(path, direct=True)
    was_direct = handle.direct
    with handle:
        handle.write(data)
    assert path.read_bytes() == data
    assert handle.direct is False or not was_direct


def test_other_write_errors_propagate(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
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
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
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

    real_write = os.write
    started, release = threading.Event(), threading.Event()

    def slow(fd, data):
        started.set()
        release.wait(5)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", slow)
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
