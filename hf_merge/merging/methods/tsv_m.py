"""TSV-M (Task Singular Vectors: merge), continual: each expert's leading singular triplets.

*Task Singular Vectors: Reducing Task Interference in Model Merging* (Gargiulo et al. 2025,
arXiv 2412.00081). The merge follows FusionBench's code, which ``TaskSingularVectorMerging.run``
calls by default (``fusion_bench/method/task_singular_vector/TSVM.py`` lines 253-269;
``utils/TSVM_utils.py``, ``compute_and_sum_svd_mem_reduction``, lines 314-428, commit 54c9e8c):

- every 2-D tensor (``len(shape) == 2``, line 350: projections, MLP weights,
  ``position_embedding.weight``, ``visual_projection.weight``), with ``r = min(shape)`` and T experts:
  ``k = int(r * (1 / T))`` (lines 339 and 365, Python's float product then truncation);
  ``U_i S_i V_iᵀ = svd(τ_i)`` (reduced); expert i's first k columns of ``U_i``, values of
  ``S_i`` and rows of ``V_iᵀ`` go to block ``[i·k, (i+1)·k)`` of ``U_cat`` (m×r), ``S_cat`` (r) and
  ``V_catᵀ`` (r×n), zero elsewhere (lines 360-377); the result is
  ``polar(U_cat) · diag(S_cat) · polar(V_catᵀ)`` with ``polar(A) = u vh`` of ``svd(A)``
  (lines 386-397, the zero-padded blocks included);
- every other tensor (``class_embedding``, the 4-D patch embedding, biases, layer norms): the mean
  of the task vectors, updated as ``mean += (τ_i − mean) / i`` (lines 378-383);
- merged ``θ0 + alpha · result`` (``TSVM.py`` lines 267-287); FusionBench's default ``alpha`` is 1
  (``config/method/task_singular_vector/TaskSingularVectorMerging.yaml`` line 7). hf-merge calls
  it ``scaling_factor``, so ``--scaling`` / ``--lambda`` set it as for every method. FusionBench's
  list form of ``alpha`` (one weight per expert, before the SVD) and its ``exclude_keys`` (empty by
  default) are not offered.

FusionBench's own description (``docs/algorithms/task_singular_vector.md``) agrees with this code;
the code, not the paper's prose, is what is followed: ``floor(r · (1/T))`` in float arithmetic,
the zero padding when ``T · k < r``, and the polar factors of the padded matrices.

Continual form: ``int(r / t)`` never grows with t, so the k triplets kept of expert i at step t are
the leading ones of what was kept at step t−1. The buffer of a 2-D tensor holds ``U_cat``,
``S_cat`` and ``V_cat`` stacked as one ``(m + 1 + n) × r`` matrix (rows of U, the row of singular
values, rows of V); each step moves every kept block to its new, shorter slot, adds the new
expert's block and zeroes the rest, so after step t the result equals the all-at-once result on the
first t experts. The factors take ``(m + n + 1) · r`` numbers against the matrix's ``m · n``: 2× for
a square matrix, 1.25× for ViT-B/32's 768 × 3072 MLP weights (about 1.5× the vision tower's
matrices in all); other tensors keep their running mean, their own size.

In float32 compute the triplets and polar factors come from Gram eigendecompositions rather than
SVDs, the zero padding left out of the polar factors where that gives the same product
(:mod:`hf_merge.merging.methods.spectral`).
"""

from __future__ import annotations

import torch

from hf_merge.io.checkpoint import Checkpoint
from hf_merge.merging.methods.base import (
    MergeContext,
    read_scratch,
)
from hf_merge.merging.methods.scaled_output import ScaledOutputMethod, scaling_parameter
from hf_merge.merging.methods.spectral import leading_triplets, polar_product


def kept_rank(rank: int, experts: int) -> int:
    """Triplets kept per expert among ``experts``: the reference's ``int(rank * (1 / experts))``."""
    return int(rank * (1 / experts))


def add_block(factors: torch.Tensor, block: torch.Tensor, t: int) -> None:
    """Step t in place on the stacked factors: shrink the t−1 kept blocks of ``int(r / (t−1))``
    columns to their first ``k = int(r / t)``, each moved to ``[i·k, (i+1)·k)``, put ``block``
    (the new expert's k triplets) at ``[(t−1)·k, t·k)`` and zero the rest."""
    rank = factors.shape[1]
    k = kept_rank(rank, t)
    if t > 1:
        previous = kept_rank(rank, t - 1)
        for i in range(1, t - 1):  # block 0 stays where it is; the later ones move left
            factors[:, i * k:(i + 1) * k] = factors[:, i * previous:i * previous + k].clone()
    factors[:, (t - 1) * k:t * k] = block
    factors[:, t * k:] = 0


def split_factors(factors: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_cat, S_cat, V_cat)`` views of a stacked ``(rows + 1 + columns) × r`` factor matrix."""
    return factors[:rows], factors[rows], factors[rows + 1:]


class TSVM(ScaledOutputMethod):
    """TSV-M: each expert's leading 1/T singular triplets, orthogonalised together, scaled by
    ``scaling_factor`` (FusionBench's ``alpha``)."""

    name = "tsv_m"
    display_name = "TSV-M"
    paper = "https://arxiv.org/abs/2412.00081"
    summary = ("Keeps each task vector's leading 1/T singular triplets per matrix and merges them "
               "with orthogonalised singular vectors.")
    card_title = "TSV-M"
    description = (
        "TSV-M keeps each expert's leading 1/T singular vectors per weight matrix and merges them "
        "with orthogonalised singular vectors; the kept triplets are truncated at each step, so "
        "each step equals merging all experts at once ([Gargiulo et al., 2025, "
        "arXiv:2412.00081](https://arxiv.org/abs/2412.00081))."
    )
    parameters = (scaling_parameter("α, the scale of the merged task vector."),)
    context: MergeContext  # set by init() before any other call
    # the polar factors are computed only when a step is written (output): a written step costs
    # 2.7x an OPCM step at ViT-B/32 width, an unwritten one 0.7x (benchmarks/results/spectral_speed.md)
    checkpoint_every = 8

    def _is_matrix(self, name: str) -> bool:
        return len(self.context.base.shape(name)) == 2

    def _initial_buffer(self, name: str) -> torch.Tensor:
        shape = self.context.base.shape(name)
        if len(shape) == 2:
            rows, columns = shape
            shape = (rows + 1 + columns, min(rows, columns))
        return torch.zeros(shape, dtype=self.context.compute_dtype)

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        base = self.context.base
        t = self.step_count
        matrices = [name for name in self.context.names if self._is_matrix(name)]
        for name in self.context.names:
            if name in matrices:
                continue
            tau = self._math(read_scratch(expert, name, 0)).sub_(self._math(read_scratch(base, name, 1)))
            mean = self._math(self.buffer[name])
            self._assign(name, mean.add_(tau.sub_(mean).div_(t)))  # divided by t, as the reference rounds
            self._done(name)

        def leading(name: str) -> tuple[torch.Tensor, dict[str, float]]:
            tau = self._math(read_scratch(expert, name, 0)).sub_(self._math(read_scratch(base, name, 1)))
            return leading_triplets(tau, kept_rank(min(tau.shape), t), self.linalg), {}

        def keep(name: str, block: torch.Tensor, _: dict[str, float]) -> None:
            factors = self._math(self.buffer[name])
            add_block(factors, block, t)
            self._assign(name, factors)
            self._done(name)

        # the SVDs, one per matrix, spread over threads (and processes) as OPCM's are
        self.context.executor.map(matrices, leading, keep)
        return {}

    def merged_task_vector(self, name: str) -> torch.Tensor:
        """The unscaled result for ``name`` (compute device and precision)."""
        state = self._math(self.buffer[name])
        if not self._is_matrix(name):
            return state
        rows = self.context.base.shape(name)[0]
        u_cat, s_cat, v_cat = split_factors(state, rows)
        if not s_cat.any():  # no triplet kept (more experts than the rank): nothing to add
            return torch.zeros(self.context.base.shape(name), dtype=state.dtype, device=state.device)
        return polar_product(u_cat, s_cat, v_cat, self.linalg)

