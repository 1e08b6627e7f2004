"""Continual task arithmetic: M_t = M_{t−1} + λ·τ_t with M_0 = θ0.

The sum of scaled task vectors does not depend on their order or on when they arrive, so this is
also all-at-once task arithmetic (θ0 + λ Σ τ_i). The paper uses λ = 0.3 for 8 tasks and 0.1 for
14 or 20.

A λ that changes between steps (``--tune`` chooses it at every step, or a resumed merge is given
another) rescales what is merged so far, M ← θ0 + (λ_new / λ_old)·(M − θ0), before τ_t is added, so
the merged model is always θ0 + λ Σ τ_i with the current λ: the all-at-once task arithmetic of the
experts so far, never a mix of λs that depends on when each expert came. (Without the rescale,
choosing λ greedily at step 1, on task 1 alone, favours λ = 1 and the first experts keep that weight
for good: on the offline zoo that tuned merge scored 40.4 % against 45.4 % for a fixed λ.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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

    def __init__(self, **hyperparameters: Any):
        super().__init__(**hyperparameters)
        self.applied: float | None = None  # the λ the merged task vector carries (None: the current one)

    def _extra_state(self) -> dict[str, Any]:
        return {} if self.applied is None else {"scaling_applied": self.applied}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        applied = state.get("scaling_applied")  # absent in merges saved before λ could change
        self.applied = None if applied is None else float(applied)

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        lam = float(self.hyperparameters["scaling_factor"])
        previous = lam if self.applied is None else self.applied
        # θ0 + (λ/λ_old)(M − θ0): M − θ0 = λ_old Σ τ (λ_old = 0 left nothing to rescale)
        ratio = lam / previous if self.step_count > 1 and previous not in (0.0, lam) else None
        base = self.context.base
        for name in self.context.names:
            theta = read_scratch(expert, name, 0)
            # before step 1 the buffer is θ0 itself (init read it): no second read
            theta0 = self.buffer[name] if self.step_count == 1 else read_scratch(base, name, 1)
            if ratio is not None:
                merged = self._math(self.buffer[name])
                self._assign(name, merged.sub_(self._math(theta0)).mul_(ratio).add_(self._math(theta0)))
            # an untouched tensor stays a bit-exact copy; torch.equal stops at the first difference,
            # where a float tensor's .any() costs more than the arithmetic itself
            if not torch.equal(theta, theta0):
                tau = self._math(theta).sub_(self._math(theta0))
                self._assign(name, self._math(self.buffer[name]).add_(tau, alpha=lam))
            self._done(name)
        self.applied = lam
        return {}
