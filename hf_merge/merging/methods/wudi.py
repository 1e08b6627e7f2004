"""WUDI merging: "Whoever Started the Interference Should End It" (Cheng et al., 2025,
arXiv:2503.08099).

Follows FusionBench's ``fusion_bench/method/wudi/wudi.py: wudi_merging`` (lines 17-60) and
``WUDIMerging.run`` (lines 80-105):

- A tensor is a matrix when it is 2-D (line 39) and nothing is excluded (``exclude_keys: null`` in
  ``config/method/wudi/wudi.yaml``): in a CLIP vision tower every attention and MLP weight,
  ``position_embedding.weight`` and ``visual_projection.weight`` when merged. Every other tensor
  (``class_embedding``, the 4-D ``patch_embedding.weight``, biases, layer norms) becomes the mean of
  the task vectors (line 56).
- A matrix M starts at Σ τ_i (line 37, the sum, not the mean) and is optimised by
  ``torch.optim.Adam`` with lr 1e-5, weight decay 0 and torch's defaults otherwise (betas 0.9 and
  0.999, eps 1e-8; line 40) for ``iter_num`` steps on the loss
  Σ_i ‖(M − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F (lines 41-54: squared entries of each product divided by the
  task vector's squared Frobenius norm, summed, no mean).
- Merged model: θ0 + result, with no scaling (line 102).
- ``iter_num`` defaults to 400, the value of FusionBench's ``config/method/wudi/wudi.yaml`` (line 6)
  and of its documented API example, which the command behind its published ViT-B/32 figure (84.5 %)
  uses; ``wudi_merging``'s own keyword default is 300 (line 20).

The loss is never formed as the reference does (a T×m×m product per step). Its gradient is
2 Σ_i (M − τ_i) G_i / c_i with G_i = τ_iᵀτ_i (n×n) and c_i = ‖τ_i‖²_F, that is 2 (M·A − B) with
A = Σ_i G_i / c_i and B = Σ_i τ_i G_i / c_i, both fixed: they are computed once per matrix and
each Adam step costs one m×n by n×n product (m·n² multiply-adds, independent of the number of
experts; the reference's forward and backward products cost 2·T·m²·n). The gradient is handed to the same Adam, so the
iterates are the reference's up to rounding. Where A would be large (n > 2·T·m, a wide matrix),
A·x is applied as Sᵀ(S x) with S the stacked rows τ_i / √c_i, at 2·T·m²·n per step.

A task vector that is zero in a matrix (an expert that did not train it) makes the reference
divide 0 by 0 and return NaN for the whole matrix; here its term, zero for every M, is left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_merge.merging.methods.base import AllAtOnceMethod, Parameter, total

LEARNING_RATE = 1e-5  # wudi.py line 40


def wudi_gradient_terms(task_vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(A, B, S)`` of the loss gradient 2 (M·A − B): A = Σ τ_iᵀτ_i / ‖τ_i‖² (``None`` for a wide
    matrix, where S, the rows τ_i / ‖τ_i‖ stacked, stands for it: A = SᵀS)."""
    nonzero = [tau for tau in task_vectors if bool(tau.any())]
    m, n = task_vectors[0].shape
    wide = n > 2 * len(nonzero) * m
    gram = None if wide else torch.zeros(n, n, dtype=task_vectors[0].dtype, device=task_vectors[0].device)
    target = torch.zeros_like(task_vectors[0])
    rows = []
    for tau in nonzero:
        scaled = tau / torch.linalg.matrix_norm(tau)  # τ_i / ‖τ_i‖: its Gram matrix is G_i / c_i
        if gram is not None:
            g = scaled.T @ scaled
            gram += g
            target += tau @ g
        else:
            rows.append(scaled)
            target += (tau @ scaled.T) @ scaled
    return gram, target, torch.cat(rows) if wide and rows else None


def wudi_matrix(task_vectors: Sequence[torch.Tensor], iterations: int, lr: float = LEARNING_RATE) -> torch.Tensor:
    """The WUDI merged task vector of one matrix: Σ τ_i refined by ``iterations`` Adam steps."""
    gram, target, rows = wudi_gradient_terms(task_vectors)
    merged = torch.nn.Parameter(total(task_vectors))
    if gram is None and rows is None:  # every task vector is zero: so is every gradient
        return merged.detach()
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    with torch.no_grad():
        for _ in range(iterations):
            if gram is not None:
                applied = merged @ gram
            else:
                assert rows is not None
                applied = (merged @ rows.T) @ rows
            merged.grad = applied.sub_(target).mul_(2)
            optimizer.step()
    return merged.detach()


class WUDI(AllAtOnceMethod):
    """WUDI: each matrix is Σ τ_i refined by Adam to interfere least with every task's inputs;
    needs every expert at once."""

    name = "wudi"
    display_name = "WUDI"
    paper = "https://arxiv.org/abs/2503.08099"
    summary = ("Per matrix, Adam on Σ_i ‖(M − τ_i) τ_iᵀ‖² / ‖τ_i‖² from M = Σ τ_i; "
               "other tensors: mean (all experts at once).")
    card_title = "WUDI merging"
    description = (
        "WUDI starts each weight matrix from the sum of the task vectors and refines it by gradient "
        "descent so that it interferes least with each task's own directions, without data ([Cheng "
        "et al., 2025, arXiv:2503.08099](https://arxiv.org/abs/2503.08099))."
    )
    parameters = (
        Parameter("iter_num", 400, "Adam steps per matrix (FusionBench's config; its function default is 300).",
                  type=int, minimum=0),
    )

    def merge_tensor(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
        task_vectors = [expert.sub_(base) for expert in experts]  # in place: no second copy per expert
        if base.dim() == 2:
            return base + wudi_matrix(task_vectors, int(self.hyperparameters["iter_num"]))
        return base + total(task_vectors) / len(task_vectors)
