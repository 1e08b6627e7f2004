"""Writing a merge's steps into its output folder: one atomic transaction per written step.

A step due to be written is written while it is merged (:meth:`StepWriter.start`): a background
thread writes the tensors outside the merge, then each merged tensor once the method says it is
final, and the step is committed when it ends. Every step writes the same weight files (the base's
tensors in one layout) and only the merged tensors differ from the base, so a step that overwrites
a spare file this run wrote before writes the merged tensors' bytes alone
(:mod:`hf_merge.io.weights_writer`): from the third written step of a run on, as the first two have no
spare of the run's own yet. The merged tensors of a CLIP vision tower are 60 % of the model.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from hf_merge.io.checkpoint import Checkpoint, TensorSpec
from hf_merge.io.merge_folder import RESULTS_FILENAME
from hf_merge.io.weights_writer import CheckpointWriter, WrittenFiles, save_tensors
from hf_merge.merging.state import STATE_NAME, MergeState, OutputTransaction, discard_spare

# Files of the base that make the output loadable with from_pretrained (config, processor, tokenizer).
_NOT_COPIED = {"model.safetensors.index.json", STATE_NAME, RESULTS_FILENAME}


class StepWriter:
    """Writes the steps of one run of a merge into ``output_dir``.

    Args:
        output_dir: The merge's output folder (created by the first write if need be).
        base: θ0, whose tensors fill every weight file but the merged ones.
        base_folder: The base's folder, whose config, processor and tokenizer files are copied.
        max_shard_size: Largest weight file written.
        writes: Whether this process writes (one process of a distributed merge does); the others'
            writers do nothing.
    """

    def __init__(self, output_dir: Path, base: Checkpoint, base_folder: Path, max_shard_size: int | str, *,
                 writes: bool = True):
        self.output_dir = output_dir
        self.base = base
        self.base_folder = base_folder
        self.max_shard_size = max_shard_size
        self.specs = [TensorSpec(n, base.shape(n), base.dtype(n)) for n in base.names()]
        self.written = WrittenFiles()
        self.writes = writes

    def start(self, merged: list[str], output: Callable[[str], torch.Tensor]) -> PendingWrite:
        """Begin writing a step: its weight files in a background thread, the tensors outside the
        merge first, each merged one (``output(name)``) as soon as :meth:`PendingWrite.ready` says it
        is final, so the disk works while the step computes; :meth:`PendingWrite.finish` writes the
        rest and commits the step as one transaction."""
        return PendingWrite(self, merged, output)

    def close(self) -> None:
        """Delete the spare weight files: the run is over."""
        if self.writes:
            discard_spare(self.output_dir)


class _Cancelled(Exception):
    pass


class PendingWrite:
    """A step's weight files being written by a background thread (see :meth:`StepWriter.start`).

    The merged tensors are written in file order, each once :meth:`ready` names it (or once
    :meth:`finish` is called); :meth:`finish` completes and commits the step, :meth:`cancel` drops it.
    """

    def __init__(self, writer: StepWriter, merged: list[str], output: Callable[[str], torch.Tensor]):
        self._writer = writer
        self._output = output
        self._condition = threading.Condition()
        self._ready: set[str] = set()
        self._released = self._cancelled = False
        self._error: BaseException | None = None
        self._weight_files: list[str] = []
        self.transaction = OutputTransaction(writer.output_dir)
        copied = frozenset(writer.base.names()) - set(merged)
        self._thread = threading.Thread(target=self._write, args=(copied,), name="hf-merge-write-step", daemon=True)
        self._thread.start()

    def ready(self, name: str) -> None:
        """Merged tensor ``name`` is final for this step: it may be written now."""
        with self._condition:
            self._ready.add(name)
            self._condition.notify_all()

    def finish(self, state: MergeState, state_tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the rest (every merged tensor is final now), ``state_tensors``, the base's config
        files and ``state``, and commit the step."""
        self._stop(cancel=False)
        writer, staging = self._writer, self.transaction.staging
        try:
            if self._error is not None:
                raise self._error
            if state_tensors is not None:
                if state.state_tensors is None:
                    raise ValueError("state tensors given, but the merge state names no file for them")
                save_tensors(staging / state.state_tensors, state_tensors)
            for item in writer.base_folder.iterdir():
                if item.is_file() and item.suffix in {".json", ".txt", ".model"} and item.name not in _NOT_COPIED:
                    shutil.copy2(item, staging / item.name)
            state.save(staging)
            self.transaction.commit(self._weight_files, [state.state_tensors] if state.state_tensors else [])
        except BaseException:
            self.transaction.abort()
            raise

    def cancel(self) -> None:
        """Stop writing and discard what was written (the step failed)."""
        self._stop(cancel=True)
        self.transaction.abort()

    def _stop(self, *, cancel: bool) -> None:
        with self._condition:
            self._released = True
            self._cancelled = cancel
            self._condition.notify_all()
        self._thread.join()

    def _write(self, copied: frozenset[str]) -> None:
        writer = self._writer
        try:
            self._weight_files = CheckpointWriter(self.transaction.staging, writer.max_shard_size).save(
                writer.specs, self._when_ready, source=writer.base, copied=copied, written=writer.written)
        except BaseException as err:  # noqa: BLE001 - raised by finish()
            self._error = err

    def _when_ready(self, name: str) -> torch.Tensor:
        with self._condition:
            self._condition.wait_for(lambda: self._released or name in self._ready)
            if self._cancelled:
                raise _Cancelled(name)
        return self._output(name)
