"""Lazy tensor access over safetensors checkpoints (the writer is :mod:`hf_merge.io.weights_writer`).

A merge never loads a whole checkpoint: :class:`Checkpoint` parses the safetensors headers and
reads one tensor at a time with positioned reads straight into the tensor's memory (one copy out of
the page cache; a memory map would add a page fault per 4 KiB and, until released, the file's pages
to the process's resident memory).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from typing import Any

import torch

from hf_merge.errors import CheckpointError
from hf_merge.io.safetensors_header import PREFIX_BYTES, header_length, parse_header

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_PREFAULT_BYTES = 1 << 20

#: The safetensors name of each dtype.
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``1000`` -> bytes (decimal units, as transformers uses)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and checked up front, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            file_size = path.stat().st_size
            with open(path, "rb") as handle:
                header_len = header_length(handle.read(PREFIX_BYTES), file_size, str(path))
                raw = handle.read(header_len)
        except OSError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
        header = parse_header(raw, file_size=file_size, label=str(path))
        self.metadata: dict[str, str] = header.metadata
        self.tensors: dict[str, TensorInfo] = {}
        for entry in header.entries:
            if entry.dtype not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {entry.name!r} has unsupported dtype {entry.dtype}")
            self.tensors[entry.name] = TensorInfo(_DTYPES[entry.dtype], entry.shape, header.data_start + entry.start,
                                                  header.data_start + entry.end)
        self._file: FileIO | None = None
        self._opening = threading.Lock()

    def _handle(self) -> FileIO:
        with self._opening:  # positioned reads share the handle; a second thread must not open another
            if self._file is None:
                self._file = open(self.path, "rb", buffering=0)
            return self._file

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A private copy of one tensor, read straight into its memory (into ``out``'s when given:
        :meth:`Checkpoint.get` checks that it is a contiguous tensor of the same shape and dtype)."""
        info = self.tensors[name]
        tensor = faulted_empty(info.shape, info.dtype) if out is None else out
        if info.end > info.start:
            # numpy arrays have the buffer protocol, but numpy's stubs do not declare `__buffer__`.
            self.read_raw(name, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
        return tensor

    def read_raw(self, name: str, out: memoryview, start: int = 0) -> None:
        """Bytes ``start..start + len(out)`` of tensor ``name`` as stored, into ``out`` (the caller
        keeps them inside the tensor)."""
        _read_exactly(self._handle(), out, self.tensors[name].start + start, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _read_exactly(handle: FileIO, out: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(out):
        if hasattr(os, "preadv"):  # positioned: no seek, and safe for several readers of one handle
            got = os.preadv(handle.fileno(), [out[done:]], offset + done)
        else:
            handle.seek(offset + done)
            got = handle.readinto(out[done:])
        if not got:
            raise CheckpointError(f"{path}: file ended early (truncated while being read?); download it again")
        done += got


class Checkpoint:
    """A model folder opened lazily: config plus tensors by name, one at a time.

    Use :meth:`open`. Tensors keep their stored dtype; callers convert for computation.
    """

    def __init__(self, path: Path, config: dict[str, Any], files: list[SafetensorsFile], tensors: dict[str, Any]):
        self.path = path
        self.config = config
        self._files = files
        self._where = tensors  # name -> SafetensorsFile, or a loaded Tensor (pickle checkpoints)
        self._finite: frozenset[str] = frozenset()
        self._label = str(path)

    @classmethod
    def open(cls, path: str | Path, allow_pickle: bool = False) -> Checkpoint:
        """Open a snapshot folder (``config.json`` + single or sharded safetensors).

        ``pytorch_model.bin`` is read only with ``allow_pickle=True``, and then with
        ``torch.load(weights_only=True)``.
        """
        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such model folder")
        config: dict[str, Any] = {}
        if (folder / "config.json").is_file():
            try:
                config = json.loads((folder / "config.json").read_text())
            except ValueError as err:
                raise CheckpointError(f"{folder / 'config.json'}: invalid JSON ({err})") from err
        files: list[SafetensorsFile] = []
        where: dict[str, Any] = {}
        if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
            try:
                index = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{folder / SAFE_WEIGHTS_INDEX_NAME}: invalid index ({err})") from err
            by_file: dict[str, SafetensorsFile] = {}
            for name, filename in index.items():
                if filename not in by_file:
                    if not (folder / filename).is_file():
                        raise CheckpointError(f"{folder}: shard {filename} listed in the index is missing")
                    by_file[filename] = SafetensorsFile(folder / filename)
                    files.append(by_file[filename])
                if name not in by_file[filename].tensors:
                    raise CheckpointError(f"{folder}: tensor '{name}' is not in shard {filename}")
                where[name] = by_file[filename]
        elif (folder / SAFE_WEIGHTS_NAME).is_file():
            single = SafetensorsFile(folder / SAFE_WEIGHTS_NAME)
            files.append(single)
            where = dict.fromkeys(single.tensors, single)
        elif (folder / PICKLE_WEIGHTS_NAME).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{folder}: only {PICKLE_WEIGHTS_NAME} (pickle) found; pass allow_pickle=True to read it"
                )
            try:
                where = dict(torch.load(folder / PICKLE_WEIGHTS_NAME, map_location="cpu", weights_only=True, mmap=True))
            except Exception as err:  # torch raises many types for bad pickles
                raise CheckpointError(f"{folder / PICKLE_WEIGHTS_NAME}: cannot be read ({err})") from err
        else:
            raise CheckpointError(f"{folder}: no model.safetensors, shard index or weights file found")
        return cls(folder, config, files, where)

    def names(self) -> list[str]:
        """Tensor names, sorted (the order every pass uses)."""
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        source = self._where[name]
        return source.tensors[name].shape if isinstance(source, SafetensorsFile) else tuple(source.shape)

    def dtype(self, name: str) -> torch.dtype:
        source = self._where[name]
        return source.tensors[name].dtype if isinstance(source, SafetensorsFile) else source.dtype

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (a fresh CPU copy in its stored dtype, or into ``out``: a contiguous
        tensor of its shape and dtype whose memory is reused, see
        :func:`hf_merge.merging.methods.base.read_scratch`).

        :class:`CheckpointError` if ``name`` is one of the tensors :meth:`require_finite` named and
        holds NaN or Inf."""
        source = self._where[name]
        if out is not None and (tuple(out.shape) != self.shape(name) or out.dtype != self.dtype(name)
                                or not out.is_contiguous()):
            raise ValueError(f"cannot read tensor '{name}' ({self.dtype(name)}, {list(self.shape(name))}) "
                             f"into a {out.dtype} tensor of shape {list(out.shape)}")
        if isinstance(source, SafetensorsFile):
            tensor = source.get(name, out)
        else:
            tensor = source.clone() if out is None else out.copy_(source)
        if name in self._finite and not all_finite(tensor):
            raise CheckpointError(f"expert {self._label}: tensor '{name}' contains NaN or Inf values")
        return tensor

    def read_raw(self, name: str, out: memoryview, start: int = 0) -> None:
        """Bytes ``start..start + len(out)`` of tensor ``name`` as stored, into ``out``: a copy of a
        tensor's bytes without a tensor in between (the NaN check of :meth:`get` does not apply)."""
        if start < 0 or start + len(out) > TensorSpec(name, self.shape(name), self.dtype(name)).nbytes:
            raise ValueError(f"bytes {start}..{start + len(out)} are outside tensor '{name}'")
        source = self._where[name]
        if isinstance(source, SafetensorsFile):
            source.read_raw(name, out, start)
        else:
            stored = memoryview(source.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            out[:] = stored[start : start + len(out)]

    def require_finite(self, names: Iterable[str], label: str) -> None:
        """Check ``names`` for NaN and Inf whenever they are read.

        A merge reads every tensor anyway; checking then, instead of in a pass of its own, saves
        reading the expert twice. The caller must be ready to undo a step that fails midway."""
        self._finite = frozenset(names)
        self._label = label

    def close(self) -> None:
        for handle in self._files:
            handle.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def faulted_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``, with a large tensor's memory touched in parallel before it is read into.

    Fresh memory faults in page by page as it is first written; inside a read that happens in one
    thread, in the kernel's copy. A parallel ``zero_()`` first took a 350 MB read of fresh memory
    from 0.18-0.26 s to 0.11-0.14 s."""
    tensor = torch.empty(shape, dtype=dtype)
    if tensor.numel() * tensor.element_size() >= _PREFAULT_BYTES:
        tensor.reshape(-1).view(torch.uint8).zero_()
    return tensor


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. NaN and Inf make the sum non-finite, and a sum costs a thirtieth
    of an element-wise test; only a non-finite sum (or an overflowing one) needs that test."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor to be written (known before its data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()
