"""One file of a Hub repo read by byte ranges, and the checked safetensors headers read that way.

:class:`RemoteFile` sends ``Range`` requests with the Hub's headers (the token only towards the Hub
itself, never to a CDN it redirects to). :func:`read_remote_header` reads a safetensors header with
one request for most files and checks it with :mod:`hf_merge.io.safetensors_header`, so the
preflight (:func:`remote_tensor_table`) and partial downloads (:mod:`hf_merge.hub.ranged`) refuse a
lying header before any weights move.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import huggingface_hub
from huggingface_hub import constants

from hf_merge.errors import CheckpointError
from hf_merge.hub.transfer import Transfer
from hf_merge.io.safetensors_header import (
    PREFIX_BYTES,
    SafetensorsHeader,
    header_length,
    parse_header,
)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Enough for the header of a ViT-L CLIP in one request; a longer header costs one more request.
FIRST_READ_BYTES = 100_000
_CHUNK = 1 << 20


class RangeRefused(Exception):
    """The server sent the whole file instead of the requested range."""


def _url(repo_id: str, commit_sha: str, filename: str) -> str:
    return huggingface_hub.hf_hub_url(repo_id, filename, revision=commit_sha, endpoint=constants.ENDPOINT)


def remote_size(repo_id: str, commit_sha: str, filename: str, token: str | None) -> int:
    meta = huggingface_hub.get_hf_file_metadata(_url(repo_id, commit_sha, filename), token=token if token else False)
    return int(meta.size or 0)


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class RemoteFile:
    """One remote file read by ranges, with the Hub's headers (auth only towards the Hub itself)."""

    def __init__(self, repo_id: str, commit_sha: str, filename: str, token: str | None, transfer: Transfer):
        from huggingface_hub.utils import build_hf_headers

        url = _url(repo_id, commit_sha, filename)
        meta = huggingface_hub.get_hf_file_metadata(url, token=token if token else False, library_name="hf-merge")
        self.name = f"{repo_id}/{filename}"
        self.location = meta.location or url
        self.size = int(meta.size or 0)
        self.headers = build_hf_headers(token=token if token else False, library_name="hf-merge")
        self.headers["Accept-Encoding"] = "identity"  # byte offsets are offsets of the stored bytes
        if _origin(self.location) != _origin(url):  # a signed CDN URL: the token stays with the Hub
            for key in [k for k in self.headers if k.lower() == "authorization"]:
                del self.headers[key]
        self.transfer = transfer

    def read(self, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` in chunks; :class:`RangeRefused` if the server ignores the range."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        self.transfer.check()
        headers = {**self.headers, "Range": f"bytes={start}-{end - 1}"}
        with get_session().stream("GET", self.location, headers=headers, follow_redirects=True,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            if response.status_code != 206 or not response.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
                raise RangeRefused()
            done = 0
            for chunk in response.iter_bytes(_CHUNK):
                if chunk:
                    done += len(chunk)
                    self.transfer.received(len(chunk))
                    yield chunk
        if done != end - start:
            raise CheckpointError(f"{self.name}: the server sent {done} of {end - start} bytes of a range; try again")

    def read_all(self, start: int, end: int) -> bytes:
        return b"".join(self.read(start, end))


def read_remote_header(remote: RemoteFile) -> SafetensorsHeader:
    """The checked header of a remote safetensors file, read by range requests (one for most files)."""
    first = remote.read_all(0, min(remote.size, FIRST_READ_BYTES))
    header_len = header_length(first[:PREFIX_BYTES], remote.size, remote.name)
    raw = first[PREFIX_BYTES:PREFIX_BYTES + header_len]
    if len(raw) < header_len:
        raw += remote.read_all(len(first), PREFIX_BYTES + header_len)
    return parse_header(raw, file_size=remote.size, label=remote.name)


def remote_tensor_table(repo_id: str, commit_sha: str, files: Sequence[str], *, token: str | None,
                        transfer: Transfer | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from the checked headers of a repo's safetensors weights.

    Reads ``model.safetensors``'s header, or the shard index and every shard's header: a few
    kilobytes per file, so a lying header is refused before any weights move."""
    transfer = transfer or Transfer()
    if SAFE_WEIGHTS_INDEX_NAME in files:
        index = RemoteFile(repo_id, commit_sha, SAFE_WEIGHTS_INDEX_NAME, token, transfer)
        try:
            weight_map = dict(json.loads(index.read_all(0, index.size))["weight_map"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index.name}: invalid shard index ({err})") from None
        shards = sorted({str(f) for f in weight_map.values()})
    elif SAFE_WEIGHTS_NAME in files:
        shards = [SAFE_WEIGHTS_NAME]
    else:
        shards = sorted(f for f in files if f.endswith(".safetensors"))
    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in shards:
        for entry in read_remote_header(RemoteFile(repo_id, commit_sha, shard, token, transfer)).entries:
            table[entry.name] = (entry.dtype, entry.shape)
    return table
