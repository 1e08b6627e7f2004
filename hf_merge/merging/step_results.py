"""What the engine reports of a run: one :class:`StepResult` per merged expert, one :class:`EngineResult`.

(:class:`hf_merge.api.MergeResult` is what a whole recipe run reports: card, push and Space included.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_merge.hub.sources import ModelSource
from hf_merge.merging.state import MergeState


@dataclass
class StepResult:
    """One merged expert.

    Attributes:
        step: 1-based position of the expert in the merge.
        expert: Where it came from.
        merge_seconds / save_seconds: Time spent merging and writing the output.
        metrics: What the method reports (OPCM: ``lambda``, ``task_vector_norm``, ``merged_norm``).
    """

    step: int
    expert: ModelSource
    merge_seconds: float
    save_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EngineResult:
    """The outcome of :func:`~hf_merge.merging.engine.merge_weights`: the output folder, its merge state and where the time went."""

    output_dir: Path
    state: MergeState
    steps: list[StepResult]
    timings: dict[str, float]


def call_on_step(on_step: Callable[..., Any], output_dir: Path, state: MergeState,
                 weights: Callable[[], Mapping[str, torch.Tensor]]) -> None:
    """Call the engine's ``on_step(step, output_dir, state)``; a callback with a true
    ``receives_weights`` attribute also gets ``weights=``: the merged tensors by name, as the engine
    holds them (not copies: read them, never write them), so an evaluator can update a resident model."""
    if getattr(on_step, "receives_weights", False):
        on_step(state.step, output_dir, state, weights=weights())
    else:
        on_step(state.step, output_dir, state)
