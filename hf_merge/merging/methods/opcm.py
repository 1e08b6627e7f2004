"""OPCM: orthogonal projection-based continual merging (Tang et al., 2025, arXiv 2501.09522).

Step t ≥ 2, per tensor: D = M_{t−1} − θ0, τ = θ_t − θ0. For ``nn.Linear`` weights τ loses its
components in the dominant singular subspace of D (and, by default, along every singular pair of
D) before S = λ_{t−1}·D + τ̃; other tensors use S = λ_{t−1}·D + τ. Then λ_t = ‖S‖ / mean‖τ_i‖ over
the whole model and M_t = θ0 + S / λ_t. The whole-model norm needs every S before any can be
rescaled, so a step is two passes over names: pass 1 stores S in the buffer (M_{t−1} is no longer
needed once its S exists) and sums ‖S‖²; pass 2 rescales. Pass 1 (the SVDs) is split across
processes.

Every place where the reference implementation departs from the paper's text is a
hyperparameter whose default reproduces the reference:

- ``alpha`` (0.5): split point of D's spectrum, by cumulative singular-value mass.
- ``zero_diagonal`` (True): drop τ's component along each singular pair (u_i, v_i) of D.
- ``split_index_base`` (0): r is the 0-based index of the first cumsum(s)/sum(s) > alpha; 1 zeroes
  one more direction, as the paper's text reads.
- ``merge_class_embedding`` (True): ``class_embedding`` is merged like any tensor; False keeps the
  reference's behaviour, where it is never merged (S = D, so it decays toward θ0).
- ``svd_dtype`` ("float32"): "float64" makes SVDs reproducible across machines and precisions.
- ``reduced_svd`` (True): the economical formula; False builds full U, V as the reference does
  (always with an SVD, whatever ``decomposition`` says).
- ``decomposition`` ("gram_mixed"): how D's singular pairs are found: "svd" (``torch.linalg.svd``,
  the reference's), "gram_mixed" (eigendecomposition of DᵀD in float64, U = D V and the projection
  in float32: the fastest path as close to a float64 SVD as a float32 SVD is), "gram64" (U in
  float64 too: far closer, a little slower), "gram32" (everything in float32; faster, less
  accurate). See :mod:`hf_merge.merging.methods.opcm_linalg` and the README's benchmark.
- ``project_zero_delta`` (False): where D is exactly zero its singular basis is arbitrary, so by
  default τ passes unprojected.

Where the Gram paths' products and ``eigh`` run (torch, or numpy's OpenBLAS where torch's MKL is slow)
changes only rounding, so it is no hyperparameter: ``HF_MERGE_LINALG``, see
:mod:`hf_merge.merging.methods.linalg_backend`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from hf_merge.io.checkpoint import Checkpoint
from hf_merge.merging.methods.base import MergeMethod, Parameter, read_scratch, squared_norm
from hf_merge.merging.methods.linalg_backend import resolve as resolve_linalg
from hf_merge.merging.methods.opcm_linalg import DECOMPOSITIONS, project_task_vector, split_rank

__all__ = ["OPCM", "project_task_vector", "split_rank"]

_SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class OPCM(MergeMethod):
    """Orthogonal projection-based continual merging; see the module docstring for options."""

    name = "opcm"
    display_name = "OPCM"
    paper = "https://arxiv.org/abs/2501.09522"
    summary = "Projects each new task vector off the merged one's dominant singular subspace, then rescales."
    card_title = "OPCM (orthogonal projection-based continual merging)"
    description = (
        "OPCM projects each new task vector onto the directions the merged model does not use yet, "
        "so later experts interfere less with earlier ones, and rescales the sum to keep its norm "
        "constant ([Tang et al., 2025, arXiv:2501.09522](https://arxiv.org/abs/2501.09522))."
    )
    parameters = (
        Parameter("alpha", 0.5, "Share of the merged task vector's spectrum that is protected.",
                  minimum=0.0, maximum=1.0, flags=("--alpha",), tune_grid=(0.3, 0.5, 0.7, 0.9)),
        Parameter("zero_diagonal", True, "Also drop the new task vector's component along each singular pair.",
                  type=bool, flags=("--zero-diagonal",)),
        Parameter("split_index_base", 0, "0: the reference's split index; 1: one more direction, as the paper reads.",
                  type=int, choices=(0, 1)),
        Parameter("merge_class_embedding", True, "Merge class_embedding like any tensor (False: the reference's decay).",
                  type=bool),
        Parameter("svd_dtype", "float32", "Precision of the SVDs.", type=str, choices=tuple(_SVD_DTYPES)),
        Parameter("reduced_svd", True, "The economical formula (False: full U, V as the reference builds).", type=bool),
        Parameter("project_zero_delta", False, "Project even where the merged task vector is exactly zero.", type=bool),
        Parameter("decomposition", "gram_mixed", "How the singular pairs are found.", type=str, choices=DECOMPOSITIONS),
    )

    def __init__(self, **hyperparameters: Any):
        super().__init__(**hyperparameters)
        self.prev_lambda = 1.0
        self.norms: list[float] = []
        self.linalg = resolve_linalg()  # how, not what: HF_MERGE_LINALG, never part of the recipe

    def _extra_state(self) -> dict[str, Any]:
        return {"prev_lambda": self.prev_lambda, "norms": list(self.norms)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.prev_lambda = float(state["prev_lambda"])
        self.norms = [float(n) for n in state["norms"]]

    _initial_buffer = MergeMethod._unfilled_buffer

    def svd_names(self) -> list[str]:
        """The tensors whose update needs an SVD."""
        return sorted(self.context.linear_names)

    def _step(self, expert: Checkpoint) -> dict[str, float]:
        base = self.context.base
        if self.step_count == 1:
            tau_sq = 0.0
            for name in self.context.names:
                theta = read_scratch(expert, name, 0)
                self._assign(name, theta)
                tau_sq += squared_norm(self._math(theta).sub_(self._math(read_scratch(base, name, 1))))
            self.norms = [math.sqrt(tau_sq)]
            self.prev_lambda = 1.0
            return {"lambda": 1.0, "task_vector_norm": self.norms[0], "merged_norm": self.norms[0]}

        totals = {"tau_sq": 0.0, "s_sq": 0.0}
        collected: dict[str, dict[str, float]] = {}

        def keep(name: str, s: torch.Tensor, stats: dict[str, float]) -> None:
            self._assign(name, s)  # S replaces M_{t−1}, which is not needed any more
            collected[name] = stats

        svd_names = self.svd_names()
        plain = [n for n in self.context.names if n not in self.context.linear_names]
        for name in plain:  # cheap: every process computes them, which keeps them identical
            keep(name, *self._partial_sum(name, expert, project=False))
        self.context.executor.map(svd_names, lambda name: self._partial_sum(name, expert, project=True), keep)
        for name in self.context.names:  # one fixed order: the same sums on every process
            totals["tau_sq"] += collected[name]["tau_sq"]
            totals["s_sq"] += collected[name]["s_sq"]

        self.norms.append(math.sqrt(totals["tau_sq"]))
        average_norm = sum(self.norms) / len(self.norms)
        lam = math.sqrt(totals["s_sq"]) / average_norm
        for name in self.context.names:
            s = self._math(self.buffer[name])
            self._assign(name, s.div_(lam).add_(self._math(read_scratch(base, name, 1))))
            self._done(name)
        self.prev_lambda = lam
        return {"lambda": lam, "task_vector_norm": self.norms[-1], "merged_norm": average_norm}

    def _partial_sum(self, name: str, expert: Checkpoint, *, project: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """S for one tensor, with its share of ‖τ‖² and ‖S‖².

        The arithmetic is in place: τ is read into scratch memory, and the buffer's M_{t−1} becomes
        D and then S (pass 1 replaces it with S anyway; a failed step restores the buffer from disk)."""
        hp = self.hyperparameters
        theta0 = self._math(read_scratch(self.context.base, name, 1))
        tau = self._math(read_scratch(expert, name, 0)).sub_(theta0)
        delta = self._math(self.buffer[name]).sub_(theta0)
        del theta0
        tau_sq = squared_norm(tau)
        if name.endswith("class_embedding") and not hp["merge_class_embedding"]:
            s = delta  # the reference never merges it; its rescale alone applies
        else:
            if project and tau_sq > 0:
                svd_dtype = _SVD_DTYPES[hp["svd_dtype"]]
                tau = project_task_vector(
                    delta.to(svd_dtype),
                    tau.to(svd_dtype),
                    alpha=float(hp["alpha"]),
                    zero_diagonal=bool(hp["zero_diagonal"]),
                    split_index_base=int(hp["split_index_base"]),
                    reduced_svd=bool(hp["reduced_svd"]),
                    inplace=True,
                    project_zero_delta=bool(hp["project_zero_delta"]),
                    decomposition=str(hp["decomposition"]),
                    linalg=self.linalg,
                ).to(delta.dtype)
            s = delta.mul_(self.prev_lambda).add_(tau)
        return s.cpu(), {"tau_sq": tau_sq, "s_sq": squared_norm(s)}
