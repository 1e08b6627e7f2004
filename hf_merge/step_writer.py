"""Writing a merge's steps into its output folder: one atomic transaction per written step.

Every step writes the same weight files (the base's tensors in one layout) and only the merged
tensors differ from the base, so a step that overwrites a spare file this run wrote before writes
the merged tensors' bytes alone (:mod:`hf_merge.weights_writer`): from the third written step of a
run on, as the first two have no spare of the run's own yet. The merged tensors of a CLIP vision
tower are 60 % of the model.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorSpec
from .state import STATE_NAME, MergeState, OutputTransaction, discard_spare
from .weights_writer import CheckpointWriter, WrittenFiles, save_tensors

# Files of the base that make the output loadable with from_pretrained (config, processor, tokenizer).
_NOT_COPIED = {"model.safetensors.index.json", STATE_NAME, "eval_results.json"}


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

    def save(self, state: MergeState, merged: list[str], output: Callable[[str], torch.Tensor],
             state_tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the merged model (``output(name)`` for each of ``merged``), ``state_tensors`` if the
        method keeps any, the base's config files and ``state``, and commit them as one step."""
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

    def close(self) -> None:
        """Delete the spare weight files: the run is over."""
        if self.writes:
            discard_spare(self.output_dir)
