"""Continual task arithmetic: M_t = M_{t−1} + λ·τ_t with M_0 = θ0.

The sum of scaled task vectors does not depend on their order or on when they arrive, so this is
also all-at-once task arithmetic (θ0 + λ Σ τ_i). The paper uses λ = 0.3 for 8 tasks and 0.1 for
14 or 20.
"""

from __future__ import annotations

import torch

from hf_merge.io.checkpoint import Checkpoint
from hf_merge.merging.methods.base import MergeMethod, Parameter, read_scratch


class TaskArithmetic(MergeMethod):
    """Add each expert's task vector, scaled by ``scaling_factor`` (λ)."""

    name = "task_arithmetic"
    # a step (one read, one in-place update) costs a fraction of writing the model; writing every
    # 8th is the least that brought 2, 4 and 8 experts to the naive all-in-memory merge's speed
    # (within 2 %, fastest of 5) or better (benchmarks/results/merge_speed.md)
    checkpoint_every = 8
    display_name = "Task Arithmetic"
    paper = "https://arxiv.org/abs/2212.04089"
    summary = "Adds every task vector, scaled by λ."
    card_title = "continual task arithmetic"
    description = (
        "Task arithmetic adds each expert's task vector (its difference from the base), scaled by "
        "λ, to the merged model ([Ilharco et al., 2023, "
        "arXiv:2212.04089](https://arxiv.org/abs/2212.04089))."
    )
    parameters = (
        Parameter("scaling_factor", 0.3, "λ, the scale of the summed task vectors.",
                  flags=("--scaling", "--lambda"), tune_grid=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0)),
    )

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        lam = float(self.hyperparameters["scaling_factor"])
        base = self.context.base
        for name in self.context.names:
            theta = read_scratch(expert, name, 0)
            # before step 1 the buffer is θ0 itself (init read it): no second read
            theta0 = self.buffer[name] if self.step_count == 1 else read_scratch(base, name, 1)
            # an untouched tensor stays a bit-exact copy; torch.equal stops at the first difference,
            # where a float tensor's .any() costs more than the arithmetic itself
            if not torch.equal(theta, theta0):
                tau = self._math(theta).sub_(self._math(theta0))
                self._assign(name, self._math(self.buffer[name]).add_(tau, alpha=lam))
            self._done(name)
        return {}
