"""Merge state: everything a merge needs to continue, saved atomically next to the merged weights.

The output folder changes only through :class:`OutputTransaction`: a step's files are written into a
staging folder, the staging folder is renamed to a pending folder in one atomic rename (the commit
point), then its files are moved into place with ``merge_state.json`` last. :func:`recover` rolls a
pending step forward and discards a staging folder, so a process killed at any moment leaves either
the previous step or the new one, never a mix.

The weight files a step replaces are not deleted but kept in a spare folder, and the next step
rewrites them in place: a file whose pages are cached is overwritten at memory speed, while a new
file needs fresh page-cache pages and disk blocks (measured ten times slower on a 2-core virtual
machine, where allocating fresh pages is expensive) and deleting the old one frees them all again.
:func:`discard_spare` removes the spare folder when a run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_merge.errors import MergeStateError
from hf_merge.log import get_logger

logger = get_logger(__name__)

STATE_NAME = "merge_state.json"
STATE_TENSORS_NAME = "merge_state.safetensors"
FORMAT_VERSION = 1
_STAGING = ".hf-merge-staging"
_PENDING = ".hf-merge-pending"
_SPARE = ".hf-merge-spare"
_MANIFEST = ".manifest.json"


@dataclass
class MergeState:
    """What a resumed merge needs, as saved in ``<output>/merge_state.json``.

    Attributes:
        method: Registered method name (``"opcm"``, ``"average"``, ...).
        hyperparameters: The method's hyperparameters, defaults filled in.
        scope: Which tensors are merged (``"vision"``, ``"all"``, or a list of name prefixes).
        step: How many experts have been merged.
        base: Provenance of θ0 (``ModelSource.to_dict()``; ``local_path`` for a local folder).
        lineage: One entry per merged expert, in order: provenance plus its ``step`` (1-based).
        method_state: The method's own scalars (OPCM: ``prev_lambda``, ``norms``).
        state_tensors: Name of the file holding tensors a method keeps besides the weights, if any.
        merged_names: The tensors merged (decided by the first expert; ``None`` before it, and in
            merges saved before this was recorded, where the whole scope was merged).
        from_base: Tensors of the scope kept from the base, with the reason.
    """

    method: str
    hyperparameters: dict[str, Any]
    scope: str | list[str] = "vision"
    step: int = 0
    base: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    method_state: dict[str, Any] = field(default_factory=dict)
    state_tensors: str | None = None
    merged_names: list[str] | None = None
    from_base: dict[str, str] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, folder: str | Path) -> Path:
        """Write ``merge_state.json`` into ``folder`` atomically (temp file, fsync, rename)."""
        path = Path(folder) / STATE_NAME
        _atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "MergeState":
        """Read ``<folder>/merge_state.json``; :class:`MergeStateError` if missing or corrupt."""
        path = Path(folder) / STATE_NAME
        if not path.is_file():
            raise MergeStateError(f"{path}: no merge state here; this folder was not written by a merge")
        try:
            data = json.loads(path.read_text())
            if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
                raise MergeStateError(f"{path}: written by a newer hf-merge; upgrade to continue this merge")
            return cls(**data)
        except (ValueError, TypeError) as err:
            raise MergeStateError(f"{path}: corrupt merge state ({err})") from err


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def recover(output_dir: str | Path) -> None:
    """Finish a step whose commit was interrupted, and drop a step that never reached its commit."""
    output = Path(output_dir)
    if (output / _PENDING).is_dir():
        logger.info("completing the interrupted save of the last merged step in %s", output)
        _roll_forward(output)
    if (output / _STAGING).exists():
        logger.info("discarding an unfinished step in %s", output)
        shutil.rmtree(output / _STAGING)


class OutputTransaction:
    """Replace the weights and merge state of an output folder as one atomic step.

    Usage: ``tx = OutputTransaction(out)``; write files into ``tx.staging``; ``tx.commit(weight_files)``
    where ``weight_files`` are the weight file names of the new step (others are removed).
    ``tx.staging`` starts with the spare weight files of earlier steps, to be overwritten in place
    (see :func:`recyclable`); those the step does not write are dropped at the commit.
    """

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        recover(self.output_dir)
        self.staging = self.output_dir / _STAGING
        self.staging.mkdir()
        self.recycled: list[str] = []
        spare = self.output_dir / _SPARE
        if spare.is_dir():
            for item in sorted(spare.iterdir()):
                if recyclable(item):
                    os.replace(item, self.staging / item.name)
                    self.recycled.append(item.name)

    def commit(self, weight_files: list[str], other_files: Iterable[str] = ()) -> None:
        """Make the staged step the output's current one; ``other_files``: further files of
        ``staging`` written by this step (a recycled file in neither list is stale and dropped)."""
        written = set(weight_files) | set(other_files)
        for name in self.recycled:
            if name not in written:
                (self.staging / name).unlink(missing_ok=True)
        (self.staging / _MANIFEST).write_text(json.dumps({"weight_files": weight_files}))
        for item in self.staging.iterdir():
            if item.is_file():
                with open(item, "rb+") as handle:
                    os.fsync(handle.fileno())
        _fsync_dir(self.staging)
        os.replace(self.staging, self.output_dir / _PENDING)  # the commit point
        _fsync_dir(self.output_dir)
        _roll_forward(self.output_dir)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def is_sole_link(path: Path) -> bool:
    """``path`` is a regular file with no other name (not a symlink, not hard-linked from a
    download cache): writing into it changes nothing but this file."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


def recyclable(path: Path) -> bool:
    """A weight file that may be overwritten in place (see :func:`is_sole_link`)."""
    return path.suffix == ".safetensors" and is_sole_link(path)


def discard_spare(output_dir: str | Path) -> None:
    """Delete the weight files kept for the next step to overwrite (a run is over)."""
    shutil.rmtree(Path(output_dir) / _SPARE, ignore_errors=True)


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") and name != STATE_TENSORS_NAME or name == "model.safetensors.index.json"


def _roll_forward(output: Path) -> None:
    pending = output / _PENDING
    manifest_path = pending / _MANIFEST
    if not manifest_path.is_file():
        _clear_moved_pending(pending)
        return
    weight_files = set(json.loads(manifest_path.read_text())["weight_files"])
    # merge_state.json moves last: until it does, a reader sees the previous state and recovers first.
    items = sorted((p for p in pending.iterdir() if p.name != _MANIFEST), key=lambda p: p.name == STATE_NAME)
    spare = output / _SPARE
    for item in items:
        target = output / item.name
        if item.is_dir():
            if target.exists():
                shutil.rmtree(target)
        elif recyclable(target):  # the next step overwrites it instead of allocating a new file
            spare.mkdir(exist_ok=True)
            os.replace(target, spare / item.name)
        os.replace(item, target)
    for stale in output.iterdir():
        if stale.is_file() and _is_weight_file(stale.name) and stale.name not in weight_files:
            stale.unlink()
    _fsync_dir(output)
    manifest_path.unlink()
    pending.rmdir()


def _clear_moved_pending(pending: Path) -> None:
    """Remove a pending folder whose manifest is gone.

    The manifest enters the staging folder before the commit point and is deleted only after every
    file, ``merge_state.json`` last, has moved into place, so a pending folder without it is what a
    kill between that deletion and the folder's removal leaves: the step is complete. A pending
    folder that still holds ``merge_state.json`` without a manifest cannot come from a commit and is
    left for a person to look at."""
    if (pending / STATE_NAME).exists():
        raise MergeStateError(
            f"{pending}: pending step has no manifest but still holds {STATE_NAME}; "
            "move the folder away (it was not written by hf-merge's commit) and resume"
        )
    leftovers = sorted(p.name for p in pending.iterdir())
    if leftovers:
        logger.warning("removing leftovers of a completed step in %s: %s", pending, ", ".join(leftovers))
    logger.info("removing the emptied pending folder of the last committed step in %s", pending.parent)
    shutil.rmtree(pending)
    _fsync_dir(pending.parent)
