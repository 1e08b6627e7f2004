"""DOP against a plain autograd transcription of FusionBench's ``ContinualDOPForCLIP``.

The reference below holds every model in memory and follows the reference code literally: full
SVDs, ``searchsorted`` on the cumulative singular-value ratio, the losses through ``diag(s) Uᵀ Δ``
and ``Δ V diag(s)`` with autograd, each gradient divided by its loss, the two-vector min-norm
solution with its 0.999 / 0.001 clipping, the EMA of the weights, ``torch.optim.Adam``; biases and
other leaf-module tensors averaged over (M_{t−1}, θ_t); ``class_embedding`` left at θ0 from step 2.
It shares no code with the streaming method. Adam steps are few (``STEPS``) and the learning rate
larger than the default so that the optimisation moves the weights far beyond the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hf_merge.errors import UsageError
from hf_merge.merging.engine import ContinualMerger
from hf_merge.merging.engine import merge_weights as merge
from hf_merge.merging.methods import get_method
from hf_merge.merging.methods.dop import dop_merge_matrix, min_norm_weight

STEPS = 12  # Adam steps per layer and expert in these tests (the method's default is 200)
LR = 1e-3
FAST = {"num_steps": STEPS, "lr": LR}
N_EXPERTS = 4
LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")
# float64 arithmetic on both sides; the engine stores each step's result in the checkpoints' float32,
# which the reference does too, so what is left is float32 rounding of the final weights
TOLERANCE = 1e-6


def reference_linear(w0, prev, new, *, lr=1e-4, num_steps=200, mgda=True, ema=True, ema_beta=0.999, alpha=0.8,
                     svd_epsilon=0.99999, svd_proj_space="uv"):
    finetuned = [prev, new]
    projections = []
    for weight in finetuned:
        u, s, vh = torch.linalg.svd(weight - w0, full_matrices=True)
        k = torch.searchsorted(s.cumsum(dim=0) / s.sum(), min(svd_epsilon, 1.0)).item()
        projections.append((u[:, :k], s[:k], vh.T[:, :k]))
    merged = torch.nn.Parameter(torch.stack(finetuned).mean(dim=0))
    optimizer = torch.optim.Adam([merged], lr=lr)

    def loss_of(i):
        u, s, v = projections[i]
        delta = merged - finetuned[i]
        loss_u = torch.linalg.matrix_norm(torch.diag(s) @ u.T @ delta, ord="fro") ** 2
        loss_v = torch.linalg.matrix_norm(delta @ v @ torch.diag(s), ord="fro") ** 2
        return {"uv": loss_u + loss_v, "u": loss_u, "v": loss_v}[svd_proj_space]

    ema_sol = [alpha, 1 - alpha]
    for _ in range(num_steps):
        if mgda:
            grads = []
            for i in range(2):
                loss = loss_of(i)
                optimizer.zero_grad()
                loss.backward()
                grads.append(merged.grad.detach().clone() / float(loss.detach()))
            v11, v12, v22 = ((grads[a] * grads[b]).sum() for a, b in ((0, 0), (0, 1), (1, 1)))
            if v12 >= v11:
                gamma = 0.999
            elif v12 >= v22:
                gamma = 0.001
            else:
                gamma = float(-1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12)))
            sol = [gamma, 1 - gamma]
            if ema:
                ema_sol = [ema_beta * ema_sol[i] + (1 - ema_beta) * sol[i] for i in range(2)]
                sol = ema_sol
        else:
            sol = [alpha, 1 - alpha]
        total = sol[0] * loss_of(0) + sol[1] * loss_of(1)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return merged.detach()


def dop_reference(base, experts, **options):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits (20x slower on a busy machine)
    try:
        return _dop_reference(base, experts, **options)
    finally:
        torch.set_num_threads(threads)


def _dop_reference(base, experts, **options):
    names = sorted(n for n, t in base.items() if n.startswith(("vision_model.", "visual_projection.")) and t.is_floating_point())
    merged = {n: experts[0][n].double() for n in names}
    for expert in experts[1:]:
        step = {}
        for n in names:
            b, prev, new = base[n].double(), merged[n], expert[n].double()
            if n.endswith(LINEAR_SUFFIXES) or n == "visual_projection.weight":
                step[n] = reference_linear(b, prev, new, **options)
            elif n.endswith((".weight", ".bias")):
                step[n] = torch.stack([prev, new]).mean(dim=0)
            else:  # class_embedding: a parameter of a non-leaf module, never visited
                step[n] = b
        merged = {n: t.float().double() for n, t in step.items()}
    return merged


def load(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def models(tiny_base, tiny_experts):
    return load(tiny_base), [load(e) for e in tiny_experts[:N_EXPERTS]]


def max_diff(merged, reference):
    return max(float((merged[n].double() - reference[n]).abs().max()) for n in reference)


@pytest.mark.parametrize("options", [
    {},
    {"mgda": False, "alpha": 0.6},
    {"ema": False},
    {"svd_proj_space": "u", "svd_epsilon": 0.9},
    {"svd_proj_space": "v", "ema_beta": 0.9},
])
def test_dop_matches_autograd_reference(options, tiny_base, tiny_experts, models, tmp_path):
    result = merge(tiny_base, tiny_experts[:N_EXPERTS], "dop", tmp_path / "out", compute_dtype="float64",
                   **FAST, **options)
    merged = load(result.output_dir)
    reference = dop_reference(*models, lr=LR, num_steps=STEPS, **options)
    assert max_diff(merged, reference) < TOLERANCE
    # the optimisation moved the linear weights far beyond the tolerance from no optimisation at all
    unoptimised = dop_reference(*models, lr=LR, num_steps=0, **options)
    assert max_diff(merged, unoptimised) > 1e3 * TOLERANCE


def test_dop_float32_within_measured_bound_of_float64(tiny_base, tiny_experts, models, tmp_path):
    merged = load(merge(tiny_base, tiny_experts[:N_EXPERTS], "dop", tmp_path / "f32", **FAST).output_dir)
    # measured: 1.5e-5 (Adam steps by ~lr where a gradient is near zero)
    assert max_diff(merged, dop_reference(*models, lr=LR, num_steps=STEPS)) < 5e-5


def test_dop_first_step_is_the_expert_then_leaf_tensors_average_and_class_embedding_is_base(
        tiny_base, tiny_experts, models, tmp_path):
    base, experts = models
    one = load(merge(tiny_base, tiny_experts[:1], "dop", tmp_path / "one", **FAST).output_dir)
    for name in ("vision_model.embeddings.class_embedding", "vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert torch.equal(one[name], experts[0][name])
    two = load(merge(tiny_base, tiny_experts[:2], "dop", tmp_path / "two", **FAST).output_dir)
    assert torch.equal(two["vision_model.embeddings.class_embedding"], base["vision_model.embeddings.class_embedding"])
    for name in ("vision_model.post_layernorm.weight", "vision_model.encoder.layers.1.mlp.fc2.bias",
                 "vision_model.embeddings.position_embedding.weight"):
        assert torch.allclose(two[name], (experts[0][name] + experts[1][name]) / 2, atol=1e-7, rtol=0)
    kept = load(merge(tiny_base, tiny_experts[:2], "dop", tmp_path / "ce", merge_class_embedding=True, **FAST).output_dir)
    name = "vision_model.embeddings.class_embedding"
    assert torch.allclose(kept[name], (experts[0][name] + experts[1][name]) / 2, atol=1e-7, rtol=0)


def test_dop_resumed_after_step_two_equals_one_run(tiny_base, tiny_experts, tmp_path):
    whole = merge(tiny_base, tiny_experts[:N_EXPERTS], "dop", tmp_path / "whole", **FAST).output_dir
    out = tmp_path / "resumed"
    merge(tiny_base, tiny_experts[:2], "dop", out, **FAST)
    merger = ContinualMerger.resume(out)
    assert merger.step == 2 and merger.method.hyperparameters["num_steps"] == STEPS
    with merger:
        merger.add_all(tiny_experts[2:N_EXPERTS])
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def random_pair(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    prev = w0 + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
    new = w0 + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return w0, prev, new


@pytest.mark.parametrize("shape", [(6, 6), (24, 10), (10, 24), (3, 40)])
def test_one_matrix_matches_reference_on_dense_and_factored_sides(shape):
    """Full-rank task vectors: the short side (length < 2 · rank) is formed densely, the long one
    through the factors; both must give the autograd reference's weights."""
    w0, prev, new = random_pair(*shape, seed=sum(shape))
    for options in ({}, {"svd_epsilon": 0.7, "ema": False}):
        got, stats = dop_merge_matrix(w0, prev, new, lr=1e-2, num_steps=30, **options)
        expected = reference_linear(w0, prev, new, lr=1e-2, num_steps=30, **options)
        assert float((got - expected).abs().max()) < 1e-12
        assert float((expected - (prev + new) / 2).abs().max()) > 1e-2
        assert 0.0 < stats["stability"] < 1.0


def test_identical_models_keep_the_average_instead_of_nan():
    w0, prev, _ = random_pair(8, 5, seed=1)
    got, _ = dop_merge_matrix(w0, prev, prev.clone(), lr=1e-2, num_steps=5)
    assert torch.equal(got, prev)


def test_min_norm_weight_is_the_minimiser_inside_and_clipped_at_the_ends():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x1, x2 = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
        v11, v12, v22 = float(x1 @ x1), float(x1 @ x2), float(x2 @ x2)
        grid = torch.linspace(0.001, 0.999, 99_801, dtype=torch.float64)
        norms = ((grid[:, None] * x1 + (1 - grid[:, None]) * x2) ** 2).sum(1)
        assert abs(min_norm_weight(v11, v12, v22) - float(grid[norms.argmin()])) < 2e-5
    assert min_norm_weight(1.0, 1.0, 4.0) == 0.999 and min_norm_weight(4.0, 1.0, 1.0) == 0.001


def test_dop_declares_its_reference_defaults_and_rejects_bad_values():
    dop = get_method("dop")
    assert dop.continual and not dop.reads_data
    assert dop.defaults == {"lr": 1e-4, "num_steps": 200, "mgda": True, "ema": True, "ema_beta": 0.999, "alpha": 0.8,
                            "svd_epsilon": 0.99999, "svd_proj_space": "uv", "merge_class_embedding": False}
    for bad, match in (({"svd_proj_space": "w"}, "svd_proj_space"), ({"num_steps": -1}, "num_steps"),
                       ({"alpha": 1.5}, r"alpha.*\[0, 1\]"), ({"lr": 0}, "lr"), ({"scaling_factor": 0.3}, "no parameter")):
        with pytest.raises(UsageError, match=match) as info:
            dop.check_parameters(bad)
        assert "dop" in str(info.value) and "\n" not in str(info.value)
