"""Checks of the output folder before any download or merge work: a bad ``--output`` fails in seconds.

A merge writes a complete model after every step, plus the replaced weight files it recycles (see
:mod:`hf_merge.merging.state`), so the folder must be a folder (or creatable as one), writable, and on a
disk with room for about two copies of the base's weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hf_merge.errors import UsageError
from hf_merge.sizes import format_size

# The output holds the merged weights and, while a merge runs, the spare copy of the last step's.
_COPIES_WHILE_MERGING = 2


def check_output_folder(path: str | Path, *, weights_bytes: int | None = None) -> None:
    """Fail with one line if a merge could not write its result to ``path``.

    Args:
        path: The output folder; it may not exist yet.
        weights_bytes: Size of the base's weights, when known; the disk must hold two copies.

    Raises:
        UsageError: ``path`` (or a parent) is a file, is not writable, or its disk is too full.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output {path} is an existing file, not a folder: choose a folder path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output {path} cannot be created: {existing} is a file, not a folder")
    try:
        # A probe file is the only test that holds for root, read-only mounts and ACLs alike.
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".hf-merge-probe-"):
            pass
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else type(error).__name__
        raise UsageError(f"--output {path} is not writable ({existing}: {reason}): choose another folder") from None
    free = shutil.disk_usage(existing).free
    if weights_bytes is not None and free < _COPIES_WHILE_MERGING * weights_bytes:
        raise UsageError(
            f"--output {path}: {format_size(free)} free on its disk, a merge of this base needs about "
            f"{format_size(_COPIES_WHILE_MERGING * weights_bytes)}: free some space or choose another folder"
        )


def weights_bytes(reference: str, *, token: str | None = None) -> int | None:
    """Size of a model's weight files (safetensors, else pickle): a local folder's, or a Hub repo's
    as the Hub lists them (no download); ``None`` when the Hub does not say."""
    folder = Path(reference).expanduser()
    if folder.is_dir():
        files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
        return sum(f.stat().st_size for f in files if f.is_file())
    from hf_merge.hub import client as hub
    from hf_merge.hub.sources import split_reference

    repo_id, revision = split_reference(reference)
    with hub.hub_errors(reference, token=token):
        info = hub.api_client(token).model_info(repo_id, revision=revision, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or [] if s.size is not None}
    chosen = [size for name, size in sizes.items() if name.endswith(".safetensors")] or [
        size for name, size in sizes.items() if name.endswith(".bin")
    ]
    return sum(chosen) if chosen else None

