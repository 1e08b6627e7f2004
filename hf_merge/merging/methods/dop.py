"""DOP: dual orthogonal projections for continual merging without data (Yang et al., NeurIPS 2025).

Follows FusionBench's ``ContinualDOPForCLIP`` (``fusion_bench/method/dop/dop.py``, commit
54c9e8c9 of ``tanganke/fusion_bench``) with the defaults of ``config/method/dop/dop.yaml`` (lines
13-30: what ``method=dop/dop`` and examples/dop/main_vitb32.sh run; the class's own defaults,
dop.py:52-60, differ: ``ema_beta`` 0.99, ``svd_epsilon`` 1.0, ``alpha`` unset); line numbers below
are of those files.

Step 1 (dop.py:109-110): M_1 = θ_1, every tensor.

Step t ≥ 2 merges two models, the previous result M_{t−1} and the new expert θ_t
(dop.py:112-120), walking the *leaf* modules of a fresh copy of θ0 (dop.py:143-145):

- **Weights of ``nn.Linear``** (every one: q/k/v/out projections, fc1, fc2, and
  ``visual_projection`` where the experts have it, which FusionBench's ``CLIPVisionModel`` lacks;
  dop.py:147-165) are optimised. For i ∈ {M_{t−1}, θ_t} with task vector τ_i = W_i − θ0 and its SVD
  U S Vᵀ, keep the k leading triplets, k = ``searchsorted(cumsum(s) / sum(s), svd_epsilon)`` (the
  number of prefixes holding less than ``svd_epsilon`` of the singular-value mass; dop.py:228-239).
  The objective of i is ``‖diag(s_k) U_kᵀ (W − W_i)‖²_F + ‖(W − W_i) V_k diag(s_k)‖²_F``
  (``svd_proj_space`` "uv"; "u" or "v" keep one term; dop.py:327-341). The code weights the
  projections by s, not by s^½ as FusionBench's docs/algorithms/dop.md writes: the code is followed.
  W starts at (M_{t−1} + θ_t) / 2 (dop.py:212-222) and takes ``num_steps`` (200) Adam steps,
  ``lr`` 1e-4, torch's other Adam defaults (no weight decay; dop.py:245; written out here, in
  torch's order of operations, to spare the optimiser's imports). With ``mgda`` (true), every
  Adam step balances the two objectives (dop.py:248-304): each gradient is divided by its loss
  (``gradient_normalizers(..., "loss")``, min_norm_solvers.py:214-216), the min-norm point of the
  two normalised gradients' segment gives weights (γ, 1 − γ) (``MinNormSolver`` with two vectors
  is its closed form, min_norm_solvers.py:28-49 and 135-137, with γ clipped to 0.999 / 0.001 at
  the ends), and with ``ema`` (true) the weights used are an exponential moving average, started at
  (``alpha``, 1 − ``alpha``) = (0.8, 0.2) for every layer and step, ``ema_beta`` 0.999
  (dop.py:242-243, 282-287). Without ``mgda`` the weights are fixed at (``alpha``, 1 − ``alpha``)
  (dop.py:306-323). The seed plays no part: nothing here is random.
- **Biases of ``nn.Linear``** and every other leaf module's tensors (``patch_embedding``,
  ``position_embedding``, the layer norms): (M_{t−1} + θ_t) / 2 (dop.py:175-191, ``simple_average``
  of two models; not a running mean over all experts).
- **Tensors of non-leaf modules** (``class_embedding``, and ``logit_scale`` with ``--scope all``):
  the walk over leaf modules never reaches them, so from step 2 on they are θ0's again (the
  output is the modified copy of θ0, dop.py:193). ``merge_class_embedding`` true averages them
  like the rest instead. A tensor belongs to a leaf module when its name ends in ``.weight`` or
  ``.bias`` (CLIP's layout).

There is no scaling factor (no ``--scaling``), so ``--tune`` has nothing to tune. The order of the
experts is the recipe's (FusionBench's config shuffles it, ``shuffle_order: true``). Arithmetic runs
in ``compute_dtype`` (the reference: the model's dtype, float32). Besides M_{t−1} (the buffer) a
layer's optimisation holds θ0's and θ_t's tensor, the Adam state and the two subspaces.

Two departures, neither changing a result the reference computes:

- Gradients and losses come in closed form (∇ = 2(PΔ + ΔQ), P = U_k s_k² U_kᵀ, Q = V_k s_k² V_kᵀ)
  instead of autograd; P or Q is formed densely where that costs fewer operations per Adam step
  than the factors (its side is shorter than twice the rank), which changes only rounding.
- Where an objective is exactly zero (an expert equal to the merged model in a layer, a zero
  task vector) the reference divides 0 by 0 and the layer becomes NaN; here that normalised
  gradient counts as zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hf_merge.io.checkpoint import Checkpoint
from hf_merge.merging.methods.base import MergeMethod, Parameter, read_scratch

__all__ = ["DOP", "Subspace", "dop_merge_matrix", "min_norm_weight", "principal_subspace"]


@dataclass
class Subspace:
    """One side of an objective: ``dense`` (P = U s² Uᵀ) or ``basis`` with ``weights`` (U, s²)."""

    dense: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def apply_left(self, delta: torch.Tensor) -> torch.Tensor:
        """P Δ."""
        if self.dense is not None:
            return self.dense @ delta
        assert self.basis is not None and self.weights is not None
        return self.basis @ (self.weights[:, None] * (self.basis.T @ delta))

    def apply_right(self, delta: torch.Tensor) -> torch.Tensor:
        """Δ Q."""
        if self.dense is not None:
            return delta @ self.dense
        assert self.basis is not None and self.weights is not None
        return ((delta @ self.basis) * self.weights) @ self.basis.T


def split_rank(s: torch.Tensor, epsilon: float) -> int:
    """How many leading singular values the reference keeps (dop.py:231-233)."""
    total = s.sum()
    if not bool(total > 0):  # the reference's 0/0 ratios; nothing to keep from a zero matrix
        return 0
    return int(torch.searchsorted(s.cumsum(dim=0) / total, min(epsilon, 1.0)).item())


def principal_subspace(tau: torch.Tensor, epsilon: float) -> tuple[Subspace, Subspace, int]:
    """The left and right sides of one objective for task vector ``tau`` (m×n), and the rank kept."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    k = split_rank(s, epsilon)
    u, s2, v = u[:, :k], s[:k].square(), vh[:k].T
    m, n = tau.shape

    # P Δ costs 2m²n dense, 4mnk through the factors: dense wins where m < 2k (same for Q with n)
    left = Subspace(dense=(u * s2) @ u.T) if m < 2 * k else Subspace(basis=u, weights=s2)
    right = Subspace(dense=(v * s2) @ v.T) if n < 2 * k else Subspace(basis=v, weights=s2)
    return left, right, k


def _objective(left: Subspace, right: Subspace, delta: torch.Tensor, space: str) -> tuple[torch.Tensor, float]:
    """The gradient and value of ‖diag(s) Uᵀ Δ‖² + ‖Δ V diag(s)‖² (or one term) at Δ."""
    if space == "u":
        half_grad = left.apply_left(delta)
    elif space == "v":
        half_grad = right.apply_right(delta)
    else:
        half_grad = left.apply_left(delta).add_(right.apply_right(delta))
    loss = float(torch.vdot(delta.reshape(-1), half_grad.reshape(-1)))
    return half_grad.mul_(2), loss


def min_norm_weight(v11: float, v12: float, v22: float) -> float:
    """γ minimising ‖γ x₁ + (1 − γ) x₂‖² from the Gram entries, clipped as the reference's
    ``_min_norm_element_from2`` clips it (min_norm_solvers.py:36-49)."""
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -(v12 - v22) / (v11 + v22 - 2 * v12)


def dop_merge_matrix(
    theta0: torch.Tensor,
    merged: torch.Tensor,
    expert: torch.Tensor,
    *,
    lr: float = 1e-4,
    num_steps: int = 200,
    mgda: bool = True,
    ema: bool = True,
    ema_beta: float = 0.999,
    alpha: float = 0.8,
    svd_epsilon: float = 0.99999,
    svd_proj_space: str = "uv",
) -> tuple[torch.Tensor, dict[str, float]]:
    """One ``nn.Linear`` weight merged as DOP step t ≥ 2 does (dop.py:195-325).

    ``merged`` is M_{t−1}'s weight, ``expert`` θ_t's; all three in the compute dtype and device.
    Returns the new weight and the final weight on the merged model's objective (``stability``)."""
    targets = (merged, expert)
    sides = []
    for target in targets:
        left, right, _ = principal_subspace(target - theta0, svd_epsilon)
        sides.append((left, right))
    weight = (merged + expert) / 2
    optimizer = _Adam(weight, lr)
    mix = (alpha, 1.0 - alpha)
    ema_mix = mix
    with torch.no_grad():
        for _ in range(num_steps):
            grads, losses = [], []
            for (left, right), target in zip(sides, targets, strict=False):
                grad, loss = _objective(left, right, weight - target, svd_proj_space)
                grads.append(grad)
                losses.append(loss)
            if mgda:
                # each gradient divided by its loss (0/0 counts as 0), then the min-norm point
                scale = [1.0 / loss if loss != 0 else 0.0 for loss in losses]
                v11 = float(torch.vdot(grads[0].reshape(-1), grads[0].reshape(-1))) * scale[0] ** 2
                v12 = float(torch.vdot(grads[0].reshape(-1), grads[1].reshape(-1))) * scale[0] * scale[1]
                v22 = float(torch.vdot(grads[1].reshape(-1), grads[1].reshape(-1))) * scale[1] ** 2
                gamma = min_norm_weight(v11, v12, v22)
                mix = (gamma, 1.0 - gamma)
                if ema:
                    ema_mix = (ema_beta * ema_mix[0] + (1 - ema_beta) * mix[0],
                               ema_beta * ema_mix[1] + (1 - ema_beta) * mix[1])
                    mix = ema_mix
            optimizer.step(grads[0].mul_(mix[0]).add_(grads[1], alpha=mix[1]))
    return weight, {"stability": float(mix[0])}


class _Adam:
    """``torch.optim.Adam`` with its defaults (betas 0.9, 0.999, eps 1e-8, no weight decay), the
    same operations in the same order as torch's single-tensor path, on one tensor updated in
    place. Instantiating torch's optimizer imports modules worth 70 MiB of resident memory, as
    much as the merged buffer of a small model."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = 0

    def step(self, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-self.lr / bias_correction1)


def _owned_by_leaf_module(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("weight", "bias")


class DOP(MergeMethod):
    """Dual orthogonal projections with MGDA balancing; see the module docstring."""

    name = "dop"
    display_name = "DOP"
    card_title = "DOP (dual orthogonal projections)"
    description = (
        "DOP optimises each linear layer to stay close to both the merged model and the new expert "
        "inside their task vectors' singular subspaces, balancing the two by multi-gradient descent "
        "([Yang et al., NeurIPS 2025](https://openreview.net/forum?id=zD5cUX67b9))."
    )
    paper = "https://openreview.net/forum?id=zD5cUX67b9"
    summary = ("Per linear layer, Adam on the distances to the merged model and the new expert inside "
               "their task vectors' singular subspaces, balanced by MGDA.")
    parameters = (
        Parameter("lr", 1e-4, "Adam learning rate of each layer's optimisation.", minimum=0.0, exclusive_minimum=True),
        Parameter("num_steps", 200, "Adam steps per linear layer and expert.", type=int, minimum=0),
        Parameter("mgda", True, "Balance the two objectives by MGDA at every Adam step (false: fixed alpha).",
                  type=bool),
        Parameter("ema", True, "Smooth the MGDA weights by an exponential moving average started at alpha.",
                  type=bool),
        Parameter("ema_beta", 0.999, "Decay of that moving average.", minimum=0.0, maximum=1.0),
        Parameter("alpha", 0.8, "Weight of the merged model's objective (MGDA with EMA: its starting value).",
                  minimum=0.0, maximum=1.0, flags=("--alpha",)),
        Parameter("svd_epsilon", 0.99999, "Share of the singular-value mass whose directions each objective keeps.",
                  minimum=0.0, maximum=1.0),
        Parameter("svd_proj_space", "uv", "Project on the left (u), right (v) or both (uv) singular subspaces.",
                  type=str, choices=("uv", "u", "v")),
        Parameter("merge_class_embedding", False,
                  "Average class_embedding (and logit_scale) instead of the reference's θ0 from step 2 on.",
                  type=bool),
    )
    # a step is 200 Adam steps per layer: writing the model after each costs little beside it
    checkpoint_every = 1

    _initial_buffer = MergeMethod._unfilled_buffer

    def __init__(self, **hyperparameters: Any):
        super().__init__(**hyperparameters)
        self.stability: list[float] = []

    def _extra_state(self) -> dict[str, Any]:
        return {"stability": list(self.stability)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.stability = [float(x) for x in state.get("stability", [])]

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        context = self.context
        assert context is not None, "init() comes before step()"
        if self.step_count == 1:
            for name in context.names:
                self._set_from(expert, name)
                self._done(name)
            return {}
        for name in context.names:
            if name in context.linear_names:
                continue
            if _owned_by_leaf_module(name) or self.hyperparameters["merge_class_embedding"]:
                previous = self._math(self.buffer[name])
                self._assign(name, (previous + self._math(read_scratch(expert, name, 0))) / 2)
            else:
                self._set_from(context.base, name)
            self._done(name)

        weights: list[float] = []

        def keep(name: str, merged: torch.Tensor, stats: dict[str, float]) -> None:
            self._assign(name, merged)
            weights.append(stats["stability"])
            self._done(name)

        linear = sorted(context.linear_names)
        context.executor.map(linear, lambda name: self._merge_linear(context.base, name, expert), keep)
        stability = sum(weights) / len(weights) if weights else float("nan")
        self.stability.append(stability)
        return {"stability_weight": stability}

    def _merge_linear(self, base: Checkpoint, name: str, expert: Checkpoint) -> tuple[torch.Tensor, dict[str, float]]:
        hp = self.hyperparameters
        merged, stats = dop_merge_matrix(
            self._math(read_scratch(base, name, 1)),
            self._math(self.buffer[name]),
            self._math(read_scratch(expert, name, 0)),
            lr=float(hp["lr"]), num_steps=int(hp["num_steps"]), mgda=bool(hp["mgda"]), ema=bool(hp["ema"]),
            ema_beta=float(hp["ema_beta"]), alpha=float(hp["alpha"]), svd_epsilon=float(hp["svd_epsilon"]),
            svd_proj_space=str(hp["svd_proj_space"]),
        )
        return merged.cpu(), stats
