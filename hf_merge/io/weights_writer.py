"""Writing safetensors weight files one tensor at a time, skipping the bytes a file already holds.

:class:`CheckpointWriter` writes tensors into transformers-style shards (``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``) without building a file
in memory. Tensors are either computed (``fetch(name)`` gives them when it is their turn) or copied:
their stored bytes go from the source checkpoint's file into the write buffer, with no tensor in
between.

A merge writes the same layout at every step (the base's tensors, sorted, split by
``max_shard_size``), and every tensor it does not merge is a copy of the base's bytes. So a weight
file this process wrote earlier in the run, found again unchanged (:class:`WrittenFiles`), already
holds all of them: overwriting it in place, only the merged tensors' bytes are written. For the
vision tower of a CLIP model that is 60 % of the file.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_merge.errors import CheckpointError
from hf_merge.io.checkpoint import (
    DTYPE_NAMES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    Checkpoint,
    TensorSpec,
    parse_size,
)
from hf_merge.io.durable_file import DurableFile, Fill, is_sole_link


@dataclass(frozen=True)
class _Written:
    mtime_ns: int
    size: int
    header: bytes
    copied: frozenset[str]


class WrittenFiles:
    """The weight files this process wrote, and which of their tensors are copies of the source's bytes.

    A file is known by its device and inode, and trusted only while its size and modification time
    are those it had when written and it has no other name: a write to it since, by anyone, moves
    the modification time on (to the file system clock's resolution; the files are spares in the
    merge's own folder). What a process did not write itself (a file of an earlier run) is never
    trusted, so a restart writes in full.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[int, int], _Written] = {}

    def remember(self, path: Path, header: bytes, copied: frozenset[str]) -> None:
        """Record ``path`` as just written with ``header``, tensors ``copied`` holding the source's bytes."""
        info = os.lstat(path)
        self._files[(info.st_dev, info.st_ino)] = _Written(info.st_mtime_ns, info.st_size, header, copied)

    def held(self, path: Path, header: bytes) -> frozenset[str]:
        """The copied tensors ``path`` still holds, if it has exactly ``header``; else nothing."""
        try:
            info = os.lstat(path)
        except OSError:
            return frozenset()
        known = self._files.pop((info.st_dev, info.st_ino), None)  # it is about to be rewritten
        unchanged = known is not None and (known.mtime_ns, known.size, known.header) == (info.st_mtime_ns, info.st_size, header)
        return known.copied if known is not None and unchanged and is_sole_link(path) else frozenset()


class CheckpointWriter:
    """Write tensors into transformers-layout safetensors shards, one tensor resident at a time."""

    def __init__(self, out_dir: str | Path, max_shard_size: int | str = "5GB"):
        self.out_dir = Path(out_dir)
        self.max_shard_size = parse_size(max_shard_size)

    def save_dict(self, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Write a mapping of tensors; returns the file names written."""
        specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
        return self.save(specs, tensors.__getitem__)

    def shards(self, specs: Iterable[TensorSpec]) -> list[tuple[str, list[TensorSpec]]]:
        """The weight files ``specs`` are written into: (file name, its tensors in order)."""
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in sorted(specs, key=lambda s: s.name):
            if shards[-1] and size + spec.nbytes > self.max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        if len(shards) == 1:
            return [(SAFE_WEIGHTS_NAME, shards[0])]
        return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", shard) for i, shard in enumerate(shards)]

    def save(
        self,
        specs: Iterable[TensorSpec],
        fetch: Callable[[str], torch.Tensor],
        *,
        source: Checkpoint | None = None,
        copied: frozenset[str] = frozenset(),
        written: WrittenFiles | None = None,
    ) -> list[str]:
        """Write every tensor of ``specs``, asking ``fetch(name)`` for its data when it is its turn.

        Tensors named in ``copied`` are copied from ``source``'s stored bytes instead (their specs
        must be the source's shape and dtype). With ``written``, a file found there is overwritten
        without the copied bytes it already holds, and every file written is recorded in it.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        plan = self.shards(specs)
        for filename, shard in plan:
            write_safetensors(self.out_dir / filename, shard, fetch, source=source, copied=copied, written=written)
        names = [filename for filename, _ in plan]
        if len(plan) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for _, shard in plan for s in shard)},
                "weight_map": {s.name: filename for filename, shard in plan for s in shard},
            }
            (self.out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            names.append(SAFE_WEIGHTS_INDEX_NAME)
        return names


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write one safetensors file from a mapping (no sharding)."""
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in sorted(tensors.items())]
    write_safetensors(Path(path), specs, tensors.__getitem__)


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte length and JSON header of a file holding ``specs`` in this order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data aligned to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(encoded)) + encoded


@dataclass
class _Piece:
    length: int
    fill: Fill | None  # None: a computed tensor, fetched when its turn comes
    held: bool  # the file already holds these bytes
    spec: TensorSpec | None = None


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    fetch: Callable[[str], torch.Tensor],
    *,
    source: Checkpoint | None = None,
    copied: frozenset[str] = frozenset(),
    written: WrittenFiles | None = None,
) -> None:
    """Write one safetensors file of ``specs`` (see :meth:`CheckpointWriter.save`)."""
    header = safetensors_header(specs)
    held = written.held(path, header) if written is not None else frozenset()
    # An existing file of ours (a recycled spare) is overwritten in place: its blocks are reused.
    # Anything linked elsewhere is replaced, never written through.
    if not is_sole_link(path) and os.path.lexists(path):
        path.unlink()
        held = frozenset()

    def copy_header(view: memoryview, start: int) -> None:
        view[:] = header[start : start + len(view)]

    def copy_stored(name: str) -> Fill:
        if source is None:
            raise ValueError(f"tensor {name!r} is to be copied from the source, but no source was given")
        reader = source
        return lambda view, start: reader.read_raw(name, view, start)

    pieces = [_Piece(len(header), copy_header, bool(held))]
    for spec in specs:
        fill = copy_stored(spec.name) if spec.name in copied else None
        pieces.append(_Piece(spec.nbytes, fill, fill is not None and spec.name in held, spec))
    with DurableFile(path) as handle:
        for skipped, group in itertools.groupby(pieces, key=lambda piece: piece.held):
            run = list(group)
            if skipped:  # consecutive held pieces pass as one
                handle.skip(sum(piece.length for piece in run), _joined(run))
                continue
            for piece in run:
                if piece.fill is not None:
                    handle.write_from(piece.length, piece.fill)
                elif piece.spec is not None:
                    _write_tensor(handle, piece.spec, fetch(piece.spec.name))
    if written is not None:
        written.remember(path, header, copied & {s.name for s in specs})


def _write_tensor(handle: DurableFile, spec: TensorSpec, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise CheckpointError(f"tensor '{spec.name}' changed shape or dtype while being written")
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    if data.numel():
        handle.write(data.numpy())


def _joined(pieces: list[_Piece]) -> Fill:
    """One fill over consecutive pieces (only the few bytes at the ends of a skipped run are asked for)."""
    starts, offset = [], 0
    for piece in pieces:
        starts.append(offset)
        offset += piece.length

    def fill(view: memoryview, start: int) -> None:
        end = start + len(view)
        for piece, begin in zip(pieces, starts, strict=False):
            low, high = max(start, begin), min(end, begin + piece.length)
            if low < high and piece.fill is not None:  # a held run copies bytes only (every piece has a fill)
                piece.fill(view[low - start : high - start], low - begin)

    return fill
