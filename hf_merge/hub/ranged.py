"""Download only the tensors a merge reads: HTTP ``Range`` requests guided by the safetensors header.

A safetensors file starts with an 8-byte length and a JSON header that says where every tensor's
bytes are. :func:`download_ranged` reads that header with a ``Range`` request, keeps the tensors
whose names start with the given prefixes (the merge scope: ``vision_model.``, ...), fetches their
bytes (adjacent tensors in one request) and writes a valid safetensors file holding just those
tensors. Sharded repos are read through ``model.safetensors.index.json``: only the shards that
hold tensors in scope are touched. Config, processor and tokenizer files are downloaded whole.

Partial snapshots never enter the Hub cache, whose blob store must only hold complete files whose
etags match: they live under ``$HF_HOME/hf-merge/ranged/<org>--<name>/<commit sha>/``, are built in
a temporary folder and renamed into place when complete, and :func:`remove_snapshot` deletes them.
When a ranged download is not possible (the server answers ``200`` to a ``Range`` request, there
is no ``model.safetensors`` or index, the header is unreadable) :func:`download_ranged` returns
``None`` and the caller downloads the full snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants

from hf_merge.errors import CheckpointError
from hf_merge.hub import client as hub
from hf_merge.hub.remote_file import RangeRefused, RemoteFile, read_remote_header, remote_size
from hf_merge.hub.transfer import Transfer
from hf_merge.io.safetensors_header import HeaderEntry
from hf_merge.log import get_logger
from hf_merge.sizes import format_size

logger = get_logger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = ".hf-merge-ranged.json"
# Tensors closer than this are fetched in one request, the gap included (fewer round trips).
MAX_GAP_BYTES = 64 * 1024
# Everything of a model repo except the weights themselves, downloaded whole.
_SMALL_FILE_PATTERNS = [p for p in hub.MODEL_PATTERNS if p != "*.safetensors"]


@dataclass(frozen=True)
class RangedSnapshot:
    """A partial snapshot on disk and what it cost.

    Attributes:
        path: Folder with the config files and safetensors holding only the tensors in scope.
        bytes_received: Bytes of weight files received for it (headers and tensor data; 0 when reused).
        bytes_full: Size of the weight files it was cut from (what a full download moves).
    """

    path: Path
    bytes_received: int
    bytes_full: int


def ranged_root() -> Path:
    """Where partial snapshots live (``$HF_HOME/hf-merge/ranged``)."""
    return Path(constants.HF_HOME) / "hf-merge" / "ranged"


def snapshot_path(repo_id: str, commit_sha: str) -> Path:
    """The folder of ``repo_id``'s partial snapshot at ``commit_sha``."""
    return ranged_root() / repo_id.replace("/", "--") / commit_sha


def download_ranged(
    repo_id: str,
    commit_sha: str,
    files: Sequence[str],
    prefixes: Sequence[str],
    *,
    token: str | None,
    transfer: Transfer | None = None,
) -> RangedSnapshot | None:
    """Download the tensors of ``repo_id`` at ``commit_sha`` whose names start with ``prefixes``.

    Args:
        files: The repo's file names (from ``model_info``).
        prefixes: Tensor name prefixes to keep (the merge scope).
        token: Token for private or gated repos (never logged).
        transfer: Cancel switch and byte counter (see :class:`~hf_merge.hub.transfer.Transfer`).

    Returns:
        The partial snapshot, or ``None`` when only a full download can get the weights.
    """
    transfer = transfer or Transfer()
    prefixes = tuple(prefixes)
    if SAFE_WEIGHTS_INDEX_NAME not in files and SAFE_WEIGHTS_NAME not in files:
        logger.debug("%s has no %s or shard index: downloading it whole", repo_id, SAFE_WEIGHTS_NAME)
        return None
    destination = snapshot_path(repo_id, commit_sha)
    if _complete(destination, prefixes):
        logger.info("Using the partial download of %s in %s", repo_id, destination)
        return RangedSnapshot(destination, 0, int(_manifest(destination).get("bytes_full", 0)))
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{commit_sha[:12]}-", suffix=".tmp", dir=destination.parent))
    try:
        huggingface_hub.snapshot_download(
            repo_id, revision=commit_sha, token=token if token else False, allow_patterns=_SMALL_FILE_PATTERNS,
            local_dir=staging, endpoint=hub.endpoint(), library_name="hf-merge", tqdm_class=transfer.progress_class(),
        )
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # the client's bookkeeping for local_dir
        weight_map = _weight_map(staging)
        shards = sorted({f for n, f in weight_map.items() if n.startswith(prefixes)}) if weight_map else [SAFE_WEIGHTS_NAME]
        if not shards:
            logger.debug("no tensor of %s starts with %s: downloading it whole", repo_id, prefixes)
            return None
        before = transfer.bytes_received
        full = 0
        kept: dict[str, str] = {}
        for shard in shards:
            try:
                names, size = _fetch_shard(repo_id, commit_sha, shard, staging / shard, prefixes, token, transfer)
            except RangeRefused:
                logger.debug("the server ignored a Range request for %s/%s: downloading it whole", repo_id, shard)
                return None
            full += size
            kept.update(dict.fromkeys(names, shard))
        if weight_map:
            full += sum(remote_size(repo_id, commit_sha, f, token) for f in set(weight_map.values()) - set(shards))
            _write_index(staging, kept)
        received = transfer.bytes_received - before
        (staging / MANIFEST_NAME).write_text(json.dumps(
            {"prefixes": list(prefixes), "commit_sha": commit_sha, "bytes_received": received, "bytes_full": full}
        ))
        if _complete(destination, prefixes):  # another process finished the same download first
            return RangedSnapshot(destination, received, full)
        shutil.rmtree(destination, ignore_errors=True)  # an older partial download for other prefixes
        os.rename(staging, destination)
        logger.info("Downloaded %s of %s (%.0f %%) of %s's weights for tensors under %s",
                    format_size(received), format_size(full), 100 * received / max(full, 1), repo_id, ", ".join(prefixes))
        return RangedSnapshot(destination, received, full)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_snapshot(path: str | Path) -> bool:
    """Delete a partial snapshot (and its repo folder once empty); anything else is left alone."""
    path = Path(path).resolve()
    root = ranged_root().resolve()
    if root not in path.parents or not (path / MANIFEST_NAME).is_file():
        return False
    shutil.rmtree(path)
    try:
        path.parent.rmdir()  # only when no other revision or download is left in it
    except OSError:
        pass
    return True


# ------------------------------------------------------------------------------------ internals
def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _complete(folder: Path, prefixes: tuple[str, ...]) -> bool:
    return _manifest(folder).get("prefixes") == list(prefixes)


def _weight_map(folder: Path) -> dict[str, str] | None:
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        return None
    try:
        return dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index.name}: invalid shard index ({err})") from err


def _write_index(folder: Path, kept: dict[str, str]) -> None:
    path = folder / SAFE_WEIGHTS_INDEX_NAME
    index = json.loads(path.read_text())
    index["weight_map"] = dict(sorted(kept.items()))
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _fetch_shard(
    repo_id: str, commit_sha: str, filename: str, out: Path, prefixes: tuple[str, ...], token: str | None,
    transfer: Transfer,
) -> tuple[list[str], int]:
    """Write the tensors of one remote safetensors file under ``prefixes`` to ``out``.

    Returns the names written and the remote file's size."""
    remote = RemoteFile(repo_id, commit_sha, filename, token, transfer)
    if remote.size < 8:  # size unknown, or no room for a header: let the full download report it
        raise RangeRefused()
    header = read_remote_header(remote)
    kept = [e for e in header.entries if e.name.startswith(prefixes)]
    _write_partial(out, header.metadata, kept, remote, header.data_start)
    return [e.name for e in kept], remote.size


def _coalesce(entries: list[HeaderEntry]) -> list[tuple[int, int]]:
    """Byte ranges covering ``entries`` (sorted), merging neighbours closer than ``MAX_GAP_BYTES``."""
    ranges: list[list[int]] = []
    for entry in entries:
        if entry.end <= entry.start:
            continue
        if ranges and entry.start - ranges[-1][1] <= MAX_GAP_BYTES:
            ranges[-1][1] = max(ranges[-1][1], entry.end)
        else:
            ranges.append([entry.start, entry.end])
    return [(start, end) for start, end in ranges]


def _write_partial(out: Path, metadata: dict[str, str], kept: list[HeaderEntry], remote: RemoteFile, data_start: int) -> None:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for entry in kept:
        size = entry.end - entry.start
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data aligned to 8 bytes, as the reference writer does
    segments = [(e.start, e.end) for e in kept if e.end > e.start]
    with open(out, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        index = 0
        for start, end in _coalesce(kept):
            position = start
            for chunk in remote.read(data_start + start, data_start + end):
                low, high = position, position + len(chunk)
                # Copy the parts of this chunk that belong to kept tensors (gaps are dropped).
                while index < len(segments) and segments[index][0] < high:
                    seg_start, seg_end = segments[index]
                    a, b = max(seg_start, low), min(seg_end, high)
                    if b > a:
                        handle.write(chunk[a - low:b - low])
                    if seg_end > high:
                        break
                    index += 1
                position = high
        handle.flush()
        os.fsync(handle.fileno())

