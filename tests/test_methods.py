"""Each merge method against a plain in-memory reference written here, on tiny CLIP experts.

The references hold every model in memory and follow the written specification literally (OPCM
with the full-matrix SVD and P = Uᵀ τ V), so they share no code with the streaming engine.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from hf_merge.merging.engine import merge_weights as merge
from hf_merge.merging.methods.base import squared_norm
from hf_merge.merging.methods.opcm import project_task_vector, split_rank
from hf_merge.merging.methods.ties import kth_smallest_magnitude

N_STEPS = 5
LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")


def load(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def vision_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(
        n for n, t in state.items()
        if n.startswith(("vision_model.", "visual_projection.")) and t.is_floating_point()
    )


def is_linear(name: str) -> bool:
    return name.endswith(LINEAR_SUFFIXES) or name == "visual_projection.weight"


def max_diff(folder, reference: dict[str, torch.Tensor]) -> float:
    merged = load(folder)
    return max(float((merged[n].float() - reference[n].float()).abs().max()) for n in reference)


# -- dense references --------------------------------------------------------------------------
def opcm_reference(base, experts, *, alpha=0.5, zero_diagonal=True, svd_dtype=torch.float64):
    names = vision_names(base)
    b = {n: base[n].float() for n in names}
    merged = {n: experts[0][n].float().clone() for n in names}

    def norm(tensors):
        return float(torch.cat([t.reshape(-1) for t in tensors]).double().norm())

    norms = [norm([experts[0][n].float() - b[n] for n in names])]
    prev_lambda, lambdas = 1.0, [1.0]
    for expert in experts[1:]:
        norms.append(norm([expert[n].float() - b[n] for n in names]))
        avg = sum(norms) / len(norms)
        s_all = {}
        for n in names:
            delta = merged[n] - b[n]
            tau = expert[n].float() - b[n]
            if is_linear(n) and delta.any():
                u, s, vh = torch.linalg.svd(delta.to(svd_dtype), full_matrices=True)
                v = vh.T
                crossed = (s.cumsum(0) / s.sum() > alpha).float()
                r = int(crossed.argmax())
                p = u.T @ tau.to(svd_dtype) @ v
                if zero_diagonal:
                    p.diagonal().fill_(0)
                p[:r, :r] = 0
                tau = (u @ p @ v.T).float()
            s_all[n] = prev_lambda * delta + tau
        lam = norm(s_all.values()) / avg
        merged = {n: b[n] + s_all[n] / lam for n in names}
        prev_lambda = lam
        lambdas.append(lam)
    return merged, lambdas, norms


def average_reference(base, experts):
    return {n: torch.stack([e[n].float() for e in experts]).mean(0) for n in vision_names(base)}


def task_arithmetic_reference(base, experts, lam=0.3):
    return {n: base[n].float() + lam * sum(e[n].float() - base[n].float() for e in experts) for n in vision_names(base)}


def magmax_reference(base, experts, scale=0.5):
    out = {}
    for n in vision_names(base):
        best = torch.zeros_like(base[n].float())
        for e in experts:
            tau = e[n].float() - base[n].float()
            best = torch.where(tau.abs() >= best.abs(), tau, best)
        out[n] = base[n].float() + scale * best
    return out


def ties_reference(base, experts, lam=0.3, keep=0.2):
    """FusionBench's continual TIES: whole-model top-k by kthvalue, sign election, disjoint sum."""
    names = vision_names(base)
    b = {n: base[n].float() for n in names}
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in names])  # noqa: E731
    merged = {n: b[n] + lam * (experts[0][n].float() - b[n]) for n in names}
    for expert in experts[1:]:
        checks = torch.vstack([flat({n: merged[n] - b[n] for n in names}), flat({n: expert[n].float() - b[n] for n in names})])
        d = checks.shape[1]
        k = d - int(d * keep)
        kth = checks.abs().kthvalue(k, dim=1, keepdim=True).values
        trimmed = checks * (checks.abs() >= kth)
        sign = torch.sign(trimmed.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        keep_mask = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
        tv = (trimmed * keep_mask).sum(0)
        offset = 0
        for n in names:
            size = merged[n].numel()
            merged[n] = merged[n] + lam * tv[offset : offset + size].reshape(merged[n].shape)
            offset += size
    return merged


@pytest.fixture(scope="module")
def models(tiny_base, tiny_experts):
    return load(tiny_base), [load(e) for e in tiny_experts[:N_STEPS]]


# -- parity --------------------------------------------------------------------------------------
def test_opcm_matches_dense_full_svd_reference(tiny_base, tiny_experts, models, tmp_path):
    result = merge(tiny_base, tiny_experts[:N_STEPS], "opcm", tmp_path / "out", svd_dtype="float64")
    reference, lambdas, _ = opcm_reference(*models)
    assert max_diff(tmp_path / "out", reference) < 1e-5
    assert [s.metrics["lambda"] for s in result.steps] == pytest.approx(lambdas, rel=1e-6)
    assert result.state.method_state["prev_lambda"] == pytest.approx(lambdas[-1], rel=1e-6)


@pytest.mark.parametrize(
    ("method", "reference", "options"),
    [
        ("average", average_reference, {}),
        ("task_arithmetic", task_arithmetic_reference, {}),
        ("task_arithmetic", lambda b, e: task_arithmetic_reference(b, e, lam=0.1), {"scaling_factor": 0.1}),
        ("magmax", magmax_reference, {}),
        ("ties", ties_reference, {}),
        ("ties", lambda b, e: ties_reference(b, e, keep=0.5), {"threshold": 50}),
    ],
)
def test_baselines_match_dense_reference(method, reference, options, tiny_base, tiny_experts, models, tmp_path):
    merge(tiny_base, tiny_experts[:N_STEPS], method, tmp_path / "out", **options)
    assert max_diff(tmp_path / "out", reference(*models)) < 1e-5


def test_untouched_tensors_are_bit_identical_to_base(tiny_base, tiny_experts, models, tmp_path):
    base, _ = models
    for method in ("opcm", "average", "ties", "magmax"):
        merge(tiny_base, tiny_experts[:3], method, tmp_path / method)
        merged = load(tmp_path / method)
        assert set(merged) == set(base)
        for name in base:
            if not name.startswith(("vision_model.", "visual_projection.")):
                assert torch.equal(merged[name], base[name]), (method, name)
        # the tiny experts leave logit_scale and the text tower alone, and change every vision tensor
        assert not torch.equal(merged["visual_projection.weight"], base["visual_projection.weight"])


# -- OPCM invariants ---------------------------------------------------------------------------
def test_opcm_merged_norm_equals_mean_expert_norm_and_lambda_grows_like_sqrt_t(tiny_base, tiny_experts, models):
    base, _ = models
    names = vision_names(base)
    seen_norms: list[float] = []
    checked = []

    def on_step(step, output_dir, state):
        expert = load(tiny_experts[step - 1])
        seen_norms.append(math.sqrt(sum(float(((expert[n].double() - base[n].double()) ** 2).sum()) for n in names)))
        merged = load(output_dir)
        merged_norm = math.sqrt(sum(float(((merged[n].double() - base[n].double()) ** 2).sum()) for n in names))
        assert merged_norm == pytest.approx(sum(seen_norms) / len(seen_norms), rel=1e-5)
        checked.append(step)

    result = merge(tiny_base, tiny_experts, "opcm", on_step=on_step)
    assert checked == list(range(1, len(tiny_experts) + 1))
    lambdas = [s.metrics["lambda"] for s in result.steps]
    assert lambdas == sorted(lambdas)
    for t, lam in enumerate(lambdas, start=1):
        assert lam / math.sqrt(t) == pytest.approx(1.0, abs=0.15), lambdas


def test_opcm_options_change_the_result(tiny_base, tiny_experts, tmp_path):
    experts = tiny_experts[:3]
    default = merge(tiny_base, experts, "opcm", tmp_path / "default").output_dir
    reference = load(default)
    for options in ({"zero_diagonal": False}, {"split_index_base": 1}, {"alpha": 0.6}):
        other = load(merge(tiny_base, experts, "opcm", tmp_path / str(options).replace(" ", ""), **options).output_dir)
        diff = max(float((other[n] - reference[n]).abs().max()) for n in reference)
        assert diff > 1e-4, options
    # the reference's class embedding is never merged: it keeps D, shrunk by 1/λ_t each step
    kept = load(merge(tiny_base, experts, "opcm", tmp_path / "ce", merge_class_embedding=False).output_dir)
    assert not torch.allclose(kept["vision_model.embeddings.class_embedding"], reference["vision_model.embeddings.class_embedding"])


def test_alpha_is_monotonic_in_rank_and_removed_energy(models):
    base, experts = models
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    delta = (experts[0][name] + experts[1][name] - 2 * base[name]).double()
    tau = (experts[2][name] - base[name]).double()
    s = torch.linalg.svdvals(delta)
    alphas = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.95]
    ranks = [split_rank(s, a) for a in alphas]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]
    kept = [float(project_task_vector(delta, tau, alpha=a).norm()) for a in alphas]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(kept, kept[1:], strict=False))
    assert kept[-1] < kept[0] < float(tau.norm())


def test_split_rank_is_zero_based_and_zero_when_nothing_crosses():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative shares 0.4, 0.7, 0.9, 1.0
    assert split_rank(s, 0.5) == 1
    assert split_rank(s, 0.5, index_base=1) == 2
    assert split_rank(s, 0.3) == 0
    assert split_rank(s, 1.0) == 0


def test_reduced_svd_formula_equals_full_matrix_projection():
    g = torch.Generator().manual_seed(0)
    for shape in ((24, 24), (16, 40), (40, 16)):
        delta = torch.randn(*shape, generator=g, dtype=torch.float64)
        tau = torch.randn(*shape, generator=g, dtype=torch.float64)
        for zero_diagonal in (True, False):
            reduced = project_task_vector(delta, tau, zero_diagonal=zero_diagonal)
            full = project_task_vector(delta, tau, zero_diagonal=zero_diagonal, reduced_svd=False)
            assert float((reduced - full).abs().max()) < 1e-12
        # the projection removes exactly the diagonal and the leading block of P = Uᵀ τ V
        u, _, vh = torch.linalg.svd(delta, full_matrices=True)
        p = u.T @ project_task_vector(delta, tau) @ vh.T
        r = split_rank(torch.linalg.svdvals(delta), 0.5)
        assert float(p.diagonal().abs().max()) < 1e-12
        assert float(p[:r, :r].abs().max()) < 1e-12


def test_in_place_projection_equals_the_copying_one_and_zero_delta_passes_tau_through():
    g = torch.Generator().manual_seed(1)
    delta, tau = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    original = tau.clone()
    copied = project_task_vector(delta, tau)
    assert torch.equal(tau, original)  # the default leaves its input alone
    in_place = project_task_vector(delta, tau, inplace=True)
    assert in_place.data_ptr() == tau.data_ptr() and torch.equal(in_place, copied)
    for alpha, zero_diagonal in ((0.0, False), (1.0, False)):  # r = 0 or r = k without the diagonal
        kept = project_task_vector(delta, original, alpha=alpha, zero_diagonal=zero_diagonal)
        assert float(kept.norm()) <= float(original.norm()) + 1e-6
    zero = torch.zeros(30, 20)
    assert torch.equal(project_task_vector(zero, original, project_zero_delta=False), original)
    assert not torch.equal(project_task_vector(zero, original, project_zero_delta=True), original)


def test_squared_norm_is_float64_accurate_for_every_shape_and_magnitude():
    g = torch.Generator().manual_seed(2)
    for shape in ((3_000_000,), (3072, 768), (768, 3, 32, 32), (1,)):
        x = torch.randn(*shape, generator=g)
        exact = float((x.double() ** 2).sum())
        assert abs(squared_norm(x) - exact) <= 1e-8 * exact  # a float32 dot product: ~1e-5
    assert squared_norm(torch.empty(0, 4)) == 0.0
    huge = torch.full((10, 10), 1e30)  # squares beyond float32, finite in float64
    assert squared_norm(huge) == pytest.approx(float((huge.double() ** 2).sum()), rel=1e-12)
    assert math.isnan(squared_norm(torch.tensor([1.0, float("nan")])))
    assert squared_norm(torch.tensor([1.0, 2.0], dtype=torch.float16)) == pytest.approx(5.0, rel=1e-7)


def test_kth_smallest_magnitude_matches_kthvalue():
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(n, generator=g) * scale for n, scale in ((1000, 1.0), (37, 1e-3), (500, 10.0))]
    chunks.append(torch.tensor([0.0, -0.0, 0.5, -0.5, 0.5]))  # zeros and exact ties
    everything = torch.cat(chunks).abs()
    for k in (1, 2, 5, 800, 1000, everything.numel()):
        assert kth_smallest_magnitude(lambda: iter(chunks), k) == float(everything.kthvalue(k).values)


@pytest.mark.parametrize("decomposition", ["svd", "gram_mixed", "gram64", "gram32"])
def test_opcm_decompositions_against_the_float64_dense_reference(decomposition, tiny_base, tiny_experts, models, tmp_path):
    reference, lambdas, _ = opcm_reference(*models)
    exact = merge(tiny_base, tiny_experts[:N_STEPS], "opcm", tmp_path / "f64", svd_dtype="float64", decomposition=decomposition)
    assert max_diff(tmp_path / "f64", reference) < 1e-5
    assert [s.metrics["lambda"] for s in exact.steps] == pytest.approx(lambdas, rel=1e-6)
    for options in ({"zero_diagonal": False}, {"alpha": 0.3}):
        out = tmp_path / str(sorted(options.items()))
        merge(tiny_base, tiny_experts[:3], "opcm", out, decomposition=decomposition, svd_dtype="float64", **options)
        expected, _, _ = opcm_reference(models[0], models[1][:3], **options)
        assert max_diff(out, expected) < 1e-5, options
    # float32: the SVD's distance to float64 is the tolerance every path must keep (OPCM.md: ~2.5e-4,
    # ill-conditioned singular vectors in the bulk of the spectrum; real mistakes move weights ≥ 3e-2)
    merge(tiny_base, tiny_experts[:N_STEPS], "opcm", tmp_path / "f32", decomposition=decomposition)
    # gram32 squares D's condition number in float32 and is the one path allowed more
    assert max_diff(tmp_path / "f32", reference) < (3e-3 if decomposition == "gram32" else 1e-3)
