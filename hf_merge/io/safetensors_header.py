"""The one parser of safetensors headers, checking them as strictly as the safetensors library.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the data section.
A header can lie: a negative offset reads the header itself as weights, two tensors can share
bytes, a byte range can disagree with its shape and dtype. The reference reader refuses all of
that, and so does :func:`parse_header`, for local files (:mod:`hf_merge.io.checkpoint`) and for the
headers of remote files read by range requests (:mod:`hf_merge.hub.ranged`) alike:

- the header is at most :data:`MAX_HEADER_BYTES` and lies inside the file;
- it is a JSON object; ``__metadata__``, when present, maps strings to strings;
- every tensor has exactly ``dtype`` (a known one), ``shape`` (non-negative integers) and
  ``data_offsets`` (two non-negative integers, begin <= end), and no name appears twice;
- end - begin == number of elements x dtype size;
- sorted by offset, the tensors are contiguous from byte 0 and end exactly where the file ends
  (no gap, no overlap, no trailing bytes).

Every failure is one :class:`~hf_merge.errors.CheckpointError` line naming the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from hf_merge.errors import CheckpointError

#: The safetensors library refuses larger headers (``MAX_HEADER_SIZE``); so do we.
MAX_HEADER_BYTES = 100_000_000
PREFIX_BYTES = 8

#: Bytes per element of every dtype the safetensors format defines in whole bytes. (The sub-byte
#: F4 and F6 types are left out: no CLIP checkpoint uses them and no reader here could.)
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_FIELDS = {"dtype", "shape", "data_offsets"}
_ADVICE = "the file is corrupt or was not written by a safetensors writer; download it again or drop this model"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a header. ``start`` and ``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: the tensors sorted by offset, the metadata, and where the data begins."""

    header_len: int
    metadata: dict[str, str]
    entries: list[HeaderEntry]

    @property
    def data_start(self) -> int:
        """Absolute offset of the data section in the file."""
        return PREFIX_BYTES + self.header_len


def header_length(prefix: bytes, file_size: int, label: str) -> int:
    """The header length announced by a file's first 8 bytes, checked against the cap and the file size."""
    if len(prefix) < PREFIX_BYTES or file_size < PREFIX_BYTES:
        raise CheckpointError(f"{label}: file is truncated (no safetensors header); download it again")
    (length,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{label}: safetensors header of {length} bytes is over the {MAX_HEADER_BYTES}-byte limit; {_ADVICE}")
    if length > file_size - PREFIX_BYTES:
        raise CheckpointError(f"{label}: file is truncated inside its header; download it again")
    return int(length)


def parse_header(raw: bytes, *, file_size: int, label: str) -> SafetensorsHeader:
    """Parse and check a header (the ``header_len`` bytes after the prefix) of a file of ``file_size`` bytes.

    Args:
        raw: The JSON header bytes.
        file_size: Size of the whole file, to check that the tensors cover its data exactly.
        label: The file, for messages (a path, or ``repo/filename``).

    Raises:
        CheckpointError: One line naming ``label`` and, where one is to blame, the tensor.
    """
    header = _load_json(raw, label)
    metadata = _metadata(header.pop("__metadata__", None), label)
    entries = sorted((_entry(name, value, label) for name, value in header.items()), key=lambda e: (e.start, e.end))
    position, previous = 0, None
    for entry in entries:
        if entry.start != position:
            if entry.start < position and previous is not None:
                problem = f"shares bytes with tensor {previous.name!r} (data bytes {previous.start}..{previous.end})"
            else:
                problem = f"leaves {entry.start - position} bytes before it that belong to no tensor"
            raise CheckpointError(f"{label}: tensor {entry.name!r} starts at data byte {entry.start} and {problem}; {_ADVICE}")
        position, previous = entry.end, entry
    data_len = file_size - PREFIX_BYTES - len(raw)
    if position != data_len:
        if position > data_len:
            cut = next(e for e in entries if e.end > data_len)
            raise CheckpointError(
                f"{label}: file is truncated: tensor {cut.name!r} ends at byte {PREFIX_BYTES + len(raw) + cut.end} "
                f"but the file has {file_size} bytes; download it again"
            )
        raise CheckpointError(f"{label}: {data_len - position} bytes after the last tensor belong to none; {_ADVICE}")
    return SafetensorsHeader(len(raw), metadata, entries)


def _load_json(raw: bytes, label: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise ValueError(f"the name {key!r} appears twice")
            result[key] = value
        return result

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{label}: unreadable safetensors header ({_short(err)}); {_ADVICE}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{label}: safetensors header is not a JSON object; {_ADVICE}")
    return header


def _metadata(value: Any, label: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CheckpointError(f"{label}: '__metadata__' must map strings to strings; {_ADVICE}")
    return value


def _entry(name: str, value: Any, label: str) -> HeaderEntry:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{label}: tensor {name!r} {problem}; {_ADVICE}")

    if not isinstance(value, dict):
        raise bad("is not described by a JSON object")
    missing, extra = _FIELDS - value.keys(), value.keys() - _FIELDS
    if missing:
        raise bad(f"has no {', '.join(sorted(missing))}")
    if extra:
        raise bad(f"has unknown fields {', '.join(sorted(map(repr, extra)))}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad(f"has an invalid shape {_short(shape)} (a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise bad(f"has invalid data_offsets {_short(offsets)} (two non-negative integers)")
    start, end = offsets
    if start > end:
        raise bad(f"begins after it ends (data_offsets {start} > {end})")
    count = 1
    for dim in shape:
        count *= dim
    expected = count * DTYPE_SIZES[dtype]
    if end - start != expected:
        raise bad(f"takes {end - start} bytes but its shape {shape} of {dtype} needs {expected}")
    return HeaderEntry(name, dtype, tuple(shape), start, end)


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, Exception) else str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
