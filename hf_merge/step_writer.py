"""Writing a merge's steps into its output folder: one atomic transaction per written step.

Every step writes the same weight files (the base's tensors in one layout) and only the merged
tensors differ from the base, so a step overwrites a spare file this run wrote before, in place,
with the merged tensors' bytes alone (:mod:`hf_merge.weights_writer`). The first written step has
no such file yet; a background thread prepares one (the output's layout, the base's bytes outside
the merge's scope) while the first experts are merged, and again after the first write, whose
replaced files are not spares yet. Overwriting blocks a file already has took half the time of writing a new file on the
benchmark machine, and the merged tensors of a CLIP vision tower are 60 % of the model.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorSpec
from .log import get_logger
from .state import STATE_NAME, MergeState, OutputTransaction, discard_spare, spare_folder
from .weights_writer import CheckpointWriter, WriteStopped, WrittenFiles, save_tensors, write_safetensors

logger = get_logger(__name__)

# Files of the base that make the output loadable with from_pretrained (config, processor, tokenizer).
_NOT_COPIED = {"model.safetensors.index.json", STATE_NAME, "eval_results.json"}


class StepWriter:
    """Writes the steps of one run of a merge into ``output_dir``.

    Args:
        output_dir: The merge's output folder (created by the first write if need be).
        base: θ0, whose tensors fill every weight file but the merged ones.
        base_folder: The base's folder, whose config, processor and tokenizer files are copied.
        max_shard_size: Largest weight file written.
        mergeable: The tensors a step may merge (the scope's): a prepared spare holds the base's
            bytes for all others and zeros in their place.
        writes: Whether this process writes (one process of a distributed merge does); the others'
            writers do nothing.
    """

    def __init__(self, output_dir: Path, base: Checkpoint, base_folder: Path, max_shard_size: int | str, *,
                 mergeable: frozenset[str] = frozenset(), writes: bool = True):
        self.output_dir = output_dir
        self.base = base
        self.base_folder = base_folder
        self.max_shard_size = max_shard_size
        self.specs = [TensorSpec(n, base.shape(n), base.dtype(n)) for n in base.names()]
        self.mergeable = mergeable
        self.written = WrittenFiles()
        self._created_folder = not output_dir.exists()
        self._cancel = threading.Event()
        self._preparing: threading.Thread | None = None
        self.writes = writes
        if writes:
            self._start_preparing()

    def save(self, state: MergeState, merged: list[str], output: Callable[[str], torch.Tensor],
             state_tensors: Mapping[str, torch.Tensor] | None = None, *, last: bool = False) -> None:
        """Write the merged model (``output(name)`` for each of ``merged``), ``state_tensors`` if the
        method keeps any, the base's config files and ``state``, and commit them as one step.

        ``last``: no step of this run follows, so no spare is prepared for one."""
        self._finish_preparing()
        transaction = OutputTransaction(self.output_dir)
        try:
            copied = frozenset(self.base.names()) - set(merged)
            weight_files = CheckpointWriter(transaction.staging, self.max_shard_size).save(
                self.specs, output, source=self.base, copied=copied, written=self.written)
            if state_tensors is not None:
                save_tensors(transaction.staging / state.state_tensors, state_tensors)
            for item in self.base_folder.iterdir():
                if item.is_file() and item.suffix in {".json", ".txt", ".model"} and item.name not in _NOT_COPIED:
                    shutil.copy2(item, transaction.staging / item.name)
            state.save(transaction.staging)
            transaction.commit(weight_files, [state.state_tensors] if state.state_tensors else [])
        except BaseException:
            transaction.abort()
            raise
        if not last:  # the files it replaced (if any) are the next step's spares; others are prepared
            self._start_preparing()

    def close(self) -> None:
        """Stop preparing and delete the spare files (the run is over); remove the output folder
        if this run created it and wrote nothing into it."""
        if not self.writes:
            return
        self._cancel.set()
        self._finish_preparing()
        discard_spare(self.output_dir)
        if self._created_folder:
            try:
                self.output_dir.rmdir()  # only if empty
            except OSError:
                pass

    # -- the spare prepared in the background --------------------------------------------------
    def _start_preparing(self) -> None:
        self._cancel.clear()
        self._preparing = threading.Thread(target=self._prepare, name="hf-merge-prepare", daemon=True)
        self._preparing.start()

    def _finish_preparing(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None

    def _prepare(self) -> None:
        """Write the next step's spare files where there are none: the output's layout, with the
        base's bytes for every tensor not merged and zeros for the others, which the step overwrites
        (blocks a file has are overwritten faster than new ones are written). A missing spare only
        costs the next write its speed, so a failure is logged, not raised."""
        spare = spare_folder(self.output_dir)
        kept = frozenset(self.base.names()) - self.mergeable
        path = None
        try:
            spare.mkdir(parents=True, exist_ok=True)
            for filename, shard in CheckpointWriter(spare, self.max_shard_size).shards(self.specs):
                path = spare / filename
                if not path.exists():
                    write_safetensors(path, shard, None, source=self.base, copied=kept, written=self.written,
                                      stop=self._cancel)
        except Exception as err:  # noqa: BLE001 - see the docstring
            if path is not None:
                path.unlink(missing_ok=True)
            if not isinstance(err, WriteStopped):
                logger.debug("could not prepare a spare weight file in %s: %s", spare, err)
