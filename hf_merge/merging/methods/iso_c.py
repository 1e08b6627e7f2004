"""Iso-C (isotropic merging in the common subspace), continual: the state is Σ τ_i.

*No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces*
(Marczak et al. 2025, arXiv 2502.04959). The merge follows FusionBench's code
(``fusion_bench/method/isotropic_merging/iso_utils.py``, ``iso_c``, lines 10-46, and ``iso.py``
lines 46-58, commit 54c9e8c):

- every 2-D tensor (``len(shape) == 2``, line 30: the transformer's projections and MLP weights,
  ``position_embedding.weight`` and ``visual_projection.weight`` alike): ``M = Σ τ_i``,
  ``U S Vᵀ = svd(M)`` (reduced), result ``mean(S) · U Vᵀ``: every singular value replaced by
  their mean (lines 32-42);
- every other tensor (``class_embedding``, the 4-D patch embedding, biases, layer norms): the
  mean of the task vectors, ``Σ τ_i / T`` (line 27);
- merged ``θ0 + scaling_factor · result`` (``iso.py`` lines 52-58).

The reference's ``exclude_keys`` is empty by default (``config/method/isotropic_merging/iso_c.yaml``)
and is not offered here. Its default scale is 1.0 (same file, line 2), the default here too;
FusionBench's published ViT-B/32 8-task figure (82.8 %) used 1.5 (``docs/modelpool/clip_vit.md``
line 858). FusionBench calls it ``scaling_factor`` as hf-merge does, so ``--scaling`` / ``--lambda``
set it.

Everything above depends on the experts only through ``Σ τ_i`` and their number, so the continual
form keeps the running sum (float, one model's size, saved next to the merge state) and the result
after step t equals the all-at-once result on the first t experts, in any order. The reference
computes ``(Σ τ_i / T) · T`` before the SVD (lines 27 and 32); :meth:`IsoC.output` does the same, so
both decompose the same rounded matrix. In float32 compute the decomposition is the Gram matrix's
eigendecomposition rather than an SVD (:func:`~hf_merge.merging.methods.spectral.isotropic`).
"""

from __future__ import annotations

import torch

from hf_merge.io.checkpoint import Checkpoint
from hf_merge.merging.methods.base import (
    MergeContext,
    read_scratch,
)
from hf_merge.merging.methods.scaled_output import ScaledOutputMethod, scaling_parameter
from hf_merge.merging.methods.spectral import isotropic


class IsoC(ScaledOutputMethod):
    """Iso-C: Σ τ_i with its singular values flattened to their mean, scaled by ``scaling_factor``."""

    name = "iso_c"
    display_name = "Iso-C"
    paper = "https://arxiv.org/abs/2502.04959"
    summary = "Sums the task vectors and sets every singular value of each matrix to their mean (isotropic spectrum)."
    card_title = "Iso-C"
    description = (
        "Iso-C sums the task vectors and, in every weight matrix, replaces each singular value of "
        "the sum by their mean, an isotropic spectrum; kept as a running sum, so each step equals "
        "merging all experts at once ([Marczak et al., 2025, "
        "arXiv:2502.04959](https://arxiv.org/abs/2502.04959))."
    )
    parameters = (scaling_parameter("λ, the scale of the isotropic merged task vector."),)
    context: MergeContext  # set by init() before any other call
    # a step is one read and one addition; the SVDs happen when a step is written (output), so
    # writing every step would cost one decomposition of every matrix per expert
    checkpoint_every = 8

    def _initial_buffer(self, name: str) -> torch.Tensor:
        return torch.zeros(self.context.base.shape(name), dtype=self.context.compute_dtype)

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        base = self.context.base
        for name in self.context.names:
            tau = self._math(read_scratch(expert, name, 0)).sub_(self._math(read_scratch(base, name, 1)))
            self._assign(name, self._math(self.buffer[name]).add_(tau))
            self._done(name)
        return {}

    def merged_task_vector(self, name: str) -> torch.Tensor:
        """The unscaled result for ``name`` (compute device and precision)."""
        total = self._math(self.buffer[name])
        mean = total / self.step_count
        if total.dim() != 2:
            return mean
        return isotropic(mean * self.step_count, self.linalg)

