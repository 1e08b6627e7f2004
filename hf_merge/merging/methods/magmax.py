"""MagMax (independent): keep, element-wise, the task-vector entry of largest magnitude seen so far
(ties go to the later expert); M = θ0 + scaling·τ_max.

The weights cannot give τ_max back exactly, so the buffer holds τ_max itself (float32) and is
saved next to the merge state; :meth:`output` derives the weights.
"""

from __future__ import annotations

import torch

from hf_merge.io.checkpoint import Checkpoint
from hf_merge.merging.methods.base import MergeMethod, Parameter


class MagMax(MergeMethod):
    """Element-wise maximum-magnitude task vector, scaled by ``scaling_factor`` (0.5)."""

    name = "magmax"
    display_name = "MagMax"
    paper = "https://arxiv.org/abs/2407.06322"
    summary = "Keeps, per entry, the task-vector value of largest magnitude seen so far, scaled by λ."
    card_title = "MagMax"
    description = (
        "MagMax keeps, for every weight, the task-vector entry of largest magnitude seen so far "
        "([Marczak et al., 2024, arXiv:2407.06322](https://arxiv.org/abs/2407.06322))."
    )
    parameters = (
        Parameter("scaling_factor", 0.5, "λ, the scale of the maximum-magnitude task vector.",
                  flags=("--scaling", "--lambda"), tune_grid=(0.3, 0.5, 0.7, 1.0)),
    )
    buffer_is_output = False

    def _initial_buffer(self, name: str) -> torch.Tensor:
        return torch.zeros(self.context.base.shape(name), dtype=self.context.compute_dtype)

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        base = self.context.base
        for name in self.context.names:
            tau = self._math(expert.get(name)).sub_(self._math(base.get(name)))
            best = self._math(self.buffer[name])
            self._assign(name, torch.where(tau.abs() >= best.abs(), tau, best))
            self._done(name)
        return {}

    def output(self, name: str) -> torch.Tensor:
        tau_max = self._math(self.buffer[name])
        if not tau_max.any():
            return self.context.base.get(name)
        scaled = self._math(self.context.base.get(name)) + float(self.hyperparameters["scaling_factor"]) * tau_max
        return self._stored(name, scaled)
