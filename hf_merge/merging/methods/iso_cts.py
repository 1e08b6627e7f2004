"""Iso-CTS: isotropic merging in common and task-specific subspaces (Marczak et al., 2025,
"No Task Left Behind", arXiv:2502.04959).

Follows FusionBench's ``fusion_bench/method/isotropic_merging/iso_utils.py: iso_cts`` (lines 49-162)
and the class that calls it, ``iso.py: IsotropicMergingInCommonAndTaskSubspace`` (lines 63-110):

- A tensor is a matrix when it is 2-D (``len(shape) == 2``, iso_utils.py line 63) and nothing is
  excluded (``exclude_keys: null`` in ``config/method/isotropic_merging/iso_cts.yaml``). In a CLIP
  vision tower that is every attention and MLP weight, ``position_embedding.weight`` (50×768 at
  ViT-B/32) and ``visual_projection.weight`` when merged. Every other tensor (``class_embedding``,
  the 4-D ``patch_embedding.weight``, biases, layer norms) becomes the mean of the task vectors
  (lines 64-77: a running mean, equal to the mean).
- For an m×n matrix with T experts and r = min(m, n) (lines 87-92): k_c = int(r · fraction); the
  task-specific total is ``round((r − k_c) / T) · T`` (Python's round, ties to even) and k_c becomes
  r minus that total; each task keeps ``(r − k_c) / T`` directions (line 101).
- The common subspace is the top k_c singular triplets of Σ τ_i (lines 80-97). Each task vector
  loses its projection on the common left singular vectors only (``τ_i − U_c U_cᵀ τ_i``, line 106,
  no right-side projection), and its top triplets of what is left are kept (lines 107-122).
- The factors are concatenated task-specific first (task 1, ..., task T), then the common ones
  (lines 125-138); U and Vᵀ are replaced by their polar factors (``u @ vh`` of their own SVDs, lines
  141-148); every singular value becomes the mean of all r kept ones, common and task-specific
  (line 151); the result is U · diag(mean) · Vᵀ.
- Merged model: θ0 + scaling_factor · result (iso.py lines 102-108), ``scaling_factor`` 1.0 and
  ``common_space_fraction`` 0.8 by default (iso_cts.yaml). FusionBench's published ViT-B/32 8-task
  figure for Iso-CTS (82.7 %) used scaling factor 1.5 (``docs/modelpool/clip_vit.md``).

Where the reference would fail: with a small ``common_space_fraction`` and many experts the rounding
can ask for more task-specific directions than r (k_c < 0, a shape error in the reference); this is
refused in one line before any tensor is merged. ``scaling_factor`` is FusionBench's name; it is
also set by ``--scaling``, as for every method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_merge.errors import UsageError
from hf_merge.merging.methods.base import AllAtOnceMethod, Parameter, total


def subspace_sizes(shape: tuple[int, ...], count: int, fraction: float) -> tuple[int, int]:
    """``(k_c, per_task)``: common directions and directions per task of an m×n matrix merged from
    ``count`` experts, rounded as the reference does (k_c < 0 where the reference would fail)."""
    rank = min(shape)
    common = int(rank * fraction)
    common = rank - round((rank - common) / count) * count
    return common, int((rank - common) / count)


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD; where LAPACK's float32 divide and conquer does not converge, in float64.

    The concatenated factors that :func:`polar` orthogonalises have every singular value near 1,
    and float32 ``gesdd`` gave up on one such 768×768 matrix (a CUDA run of the reference uses
    another driver); float64 converges, and the result is cast back."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``u @ vh`` of ``matrix`` (its closest matrix with orthonormal
    columns, or rows)."""
    u, _, vh = svd(matrix)
    return u @ vh


def iso_cts_matrix(task_vectors: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """The Iso-CTS merged task vector of one matrix (unscaled)."""
    count = len(task_vectors)
    common, per_task = subspace_sizes(tuple(task_vectors[0].shape), count, fraction)
    u, s, vh = svd(total(task_vectors))
    u_common, s_common, vh_common = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    if per_task:
        for tau in task_vectors:
            specific = tau - u_common @ (u_common.T @ tau)
            u_t, s_t, vh_t = svd(specific)
            us.append(u_t[:, :per_task])
            ss.append(s_t[:per_task])
            vhs.append(vh_t[:per_task])
    u_all = polar(torch.cat([*us, u_common], dim=1))
    vh_all = polar(torch.cat([*vhs, vh_common], dim=0))
    mean = torch.cat([*ss, s_common]).mean()
    return (u_all * mean) @ vh_all


class IsoCTS(AllAtOnceMethod):
    """Iso-CTS: a common subspace from the summed task vectors plus each task's own directions,
    all singular values equalised; needs every expert at once."""

    name = "iso_cts"
    display_name = "Iso-CTS"
    paper = "https://arxiv.org/abs/2502.04959"
    summary = ("Common subspace of Σ τ plus each task's top directions outside it, "
               "singular values set to their mean (all experts at once).")
    card_title = "Iso-CTS (isotropic merging in common and task-specific subspaces)"
    description = (
        "Iso-CTS keeps, per weight matrix, the common subspace of the summed task vectors and each "
        "task's own top directions outside it, and gives every direction the same singular value "
        "([Marczak et al., 2025, arXiv:2502.04959](https://arxiv.org/abs/2502.04959))."
    )
    parameters = (
        Parameter("scaling_factor", 1.0, "λ, the scale of the merged task vector.",
                  minimum=0.0, flags=("--scaling", "--lambda"), tune_grid=(0.8, 1.0, 1.2, 1.5, 1.8, 2.0)),
        Parameter("common_space_fraction", 0.8, "Share of each matrix's rank given to the common subspace, in [0, 1].",
                  minimum=0.0, maximum=1.0),
    )

    def check_expert_count(self, count: int) -> None:
        fraction = float(self.hyperparameters["common_space_fraction"])
        assert self.context is not None  # set by init()
        base = self.context.base
        for name in self.context.names:
            shape = base.shape(name)
            if len(shape) == 2 and subspace_sizes(shape, count, fraction)[0] < 0:
                raise UsageError(
                    f"method 'iso_cts': common_space_fraction {fraction:g} with {count} experts leaves no common "
                    f"subspace for '{name}' ({shape[0]}x{shape[1]}); raise common_space_fraction"
                )

    def merge_tensor(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
        task_vectors = [expert.sub_(base) for expert in experts]  # in place: no second copy per expert
        if base.dim() == 2:
            merged = iso_cts_matrix(task_vectors, float(self.hyperparameters["common_space_fraction"]))
        else:
            merged = total(task_vectors) / len(task_vectors)
        return base + float(self.hyperparameters["scaling_factor"]) * merged
