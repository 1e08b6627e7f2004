"""Git objects as the Hub names them, and the error type of the local Hub.

Blob ids are git's (``sha1("blob <size>\\0" + content)``); a large file is stored with Git LFS, so the
git tree holds its pointer file and downloads answer with its sha256. Which files go to LFS follows
the ``.gitattributes`` the Hub puts in every new repo, plus its 10 MB limit for regular files.
"""

from __future__ import annotations

import hashlib
from typing import Any

# What the Hub puts in every new repo: these patterns are stored with Git LFS.
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp",
    )
)
_PATTERNS = [line.split()[0] for line in GITATTRIBUTES.splitlines()]
_LFS_SUFFIXES = tuple(pattern[1:] for pattern in _PATTERNS if pattern.startswith("*.") and pattern.count("*") == 1)
# The Hub refuses regular (non-LFS) files from 10 MB on.
LFS_THRESHOLD = 10 * 1024 * 1024


class HubError(Exception):
    """An HTTP error the server answers with: status, ``X-Error-Code`` and a one-line message."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.body = body or {}


def git_blob_sha1(data: bytes) -> str:
    """The object id git gives a file's content (``blob <size>\\0`` + content)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file that stands in the git tree for a large file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def should_use_lfs(path: str, size: int, sample: bytes) -> bool:
    """Upload mode the Hub picks: LFS for tracked suffixes, large files and binary content."""
    return path.endswith(_LFS_SUFFIXES) or size >= LFS_THRESHOLD or b"\0" in sample
