"""Continual average (model soup / SWA): M_t = ((t − 1)·M_{t−1} + θ_t) / t, M_1 = θ_1.

Averaging all experts at once gives the same weights, so this also serves as the all-at-once
simple average.
"""

from __future__ import annotations

import torch

from hf_merge.io.checkpoint import Checkpoint
from hf_merge.merging.methods.base import MergeMethod, read_scratch


class ContinualAverage(MergeMethod):
    """The running mean of every expert merged so far."""

    name = "average"
    # a step (one read, one in-place update) costs a fraction of writing the model; writing every
    # 8th is the least that brought 2, 4 and 8 experts to the naive all-in-memory merge's speed
    # (within 2 %, fastest of 5) or better (benchmarks/results/merge_speed.md)
    checkpoint_every = 8
    display_name = "Average"
    paper = "https://arxiv.org/abs/2203.05482"
    summary = "The running mean of every expert merged so far."
    card_title = "continual averaging"
    description = (
        "Continual averaging keeps the running mean of the experts' weights, a model soup built one "
        "model at a time ([Wortsman et al., 2022, "
        "arXiv:2203.05482](https://arxiv.org/abs/2203.05482))."
    )

    _initial_buffer = MergeMethod._unfilled_buffer

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        t = self.step_count
        for name in self.context.names:
            if t == 1:
                self._set_from(expert, name)
            else:
                theta = read_scratch(expert, name, 0)
                previous = self.buffer[name]
                if not torch.equal(previous, theta):  # equal tensors stay bit-exact copies
                    mean = self._math(previous)
                    # ((t − 1)·M + θ) / t in two passes over M, not three
                    self._assign(name, torch.add(self._math(theta), mean, alpha=t - 1, out=mean).div_(t))
            self._done(name)
        return {}
