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
from collections.abc import Iterable
from pathlib import Path

from hf_merge.errors import MergeStateError
from hf_merge.io.durable_file import is_sole_link
from hf_merge.io.merge_folder import FORMAT_VERSION, STATE_FILENAME, MergeState, fsync_dir
from hf_merge.log import get_logger

logger = get_logger(__name__)

STATE_NAME = STATE_FILENAME  # the name earlier versions exported
STATE_TENSORS_NAME = "merge_state.safetensors"
_STAGING = ".hf-merge-staging"
_PENDING = ".hf-merge-pending"
_SPARE = ".hf-merge-spare"
_MANIFEST = ".manifest.json"

__all__ = ["FORMAT_VERSION", "STATE_NAME", "STATE_TENSORS_NAME", "MergeState", "OutputTransaction", "discard_spare",
           "is_sole_link", "recover", "recyclable"]


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
        fsync_dir(self.staging)
        os.replace(self.staging, self.output_dir / _PENDING)  # the commit point
        fsync_dir(self.output_dir)
        _roll_forward(self.output_dir)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


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
    fsync_dir(output)
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
    fsync_dir(pending.parent)
