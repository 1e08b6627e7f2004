"""OPCM's decompositions (``svd``, ``gram_mixed``, ``gram64``, ``gram32``) against a dense float64 projection
written here from the specification: full-matrix SVD, P = Uᵀ τ V, zero the block and diagonal."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_merge.merging.methods.linalg_backend import Linalg
from hf_merge.merging.methods.opcm_linalg import DECOMPOSITIONS
from hf_merge.merging.methods.opcm_linalg import project_task_vector as project_on

SHAPES = ((40, 40), (64, 24), (24, 64))


@pytest.fixture(params=["torch", "openblas"], autouse=True)
def linalg(request):
    """Every test runs on both backends: they must agree with the float64 reference alike."""
    return Linalg(request.param)


@pytest.fixture
def project_task_vector(linalg):
    return lambda *args, **kwargs: project_on(*args, linalg=linalg, **kwargs)


def dense_reference(delta, tau, *, alpha=0.5, zero_diagonal=True, split_index_base=0, rank=None):
    """τ̃ in float64 from the full-matrix SVD. ``rank``: only D's first ``rank`` pairs count as its
    singular pairs (the rest span its null space, where the Gram paths project nothing)."""
    d, t = delta.double(), tau.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=True)
    crossed = s.cumsum(0) / s.sum() > alpha
    r = int(crossed.float().argmax()) if bool(crossed.any()) else 0
    r = min(r + split_index_base, s.numel())
    p = u.T @ t @ vh.T
    keep = p.clone()
    if zero_diagonal:
        k = s.numel() if rank is None else rank
        idx = torch.arange(k)
        p[idx, idx] = 0
    p[:r, :r] = 0
    if rank is not None:  # null-space pairs of D: leave τ's components there as they are
        k = s.numel()
        idx = torch.arange(rank, k)
        p[idx, idx] = keep[idx, idx]
    return u @ p @ vh


def sample(shape, seed, *, rank=None, dtype=torch.float32):
    """A D like a merged task vector (a strong low-rank part plus dense noise, distinct singular
    values) and a τ; with ``rank``, D has exactly that rank."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    if rank is None:
        delta = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64)
        delta = delta / delta.norm() + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64) / (m * n) ** 0.5
    else:  # zero columns beyond ``rank``: exactly rank-deficient in float32 too
        delta = torch.zeros(m, n, dtype=torch.float64)
        delta[:, :rank] = torch.randn(m, rank, generator=g, dtype=torch.float64)
    tau = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.01
    return delta.to(dtype), tau.to(dtype)


def err(out, ref) -> float:
    return float((out.double() - ref).abs().max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("alpha", "zero_diagonal", "split_index_base"),
    list(itertools.product((0.0, 0.5, 0.9), (True, False), (0, 1))),
)
def test_every_decomposition_matches_the_float64_dense_projection(
    shape, alpha, zero_diagonal, split_index_base, project_task_vector
):
    options = {"alpha": alpha, "zero_diagonal": zero_diagonal, "split_index_base": split_index_base}
    delta, tau = sample(shape, seed=sum(shape))
    ref = dense_reference(delta, tau, **options)
    scale = float(tau.abs().max())
    for decomposition in DECOMPOSITIONS:
        # float64 inputs (svd_dtype float64): every path agrees with the reference to rounding
        out64 = project_task_vector(delta.double(), tau.double(), decomposition=decomposition, **options)
        assert err(out64, ref) < 1e-12 * max(shape), decomposition
        out32 = project_task_vector(delta, tau, decomposition=decomposition, **options)
        assert out32.dtype == torch.float32
        # gram32 squares D's condition number in float32: small pairs lose digits (see module docs)
        bound = 1e-3 if decomposition == "gram32" else 1e-4
        assert err(out32, ref) < bound * scale, decomposition


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decomposition", ["gram_mixed", "gram64"])
def test_float64_gram_paths_are_as_close_to_float64_as_the_float32_svd(shape, decomposition, project_task_vector):
    delta, tau = sample(shape, seed=7)
    ref = dense_reference(delta, tau)
    svd32 = err(project_task_vector(delta, tau, decomposition="svd"), ref)
    gram = err(project_task_vector(delta, tau, decomposition=decomposition), ref)
    # both are float32 rounding of τ's entries (~1e-2 here), far below OPCM's real-mistake scale
    assert gram < 1e-6 and svd32 < 1e-6
    assert gram <= 4 * svd32 + 1e-8


def test_gram_mixed_keeps_float32_svd_accuracy_on_a_graded_spectrum(project_task_vector):
    """Singular values over four decades, as in a merged task vector's tail: U = D V in float32 loses
    digits of u_i in proportion to s_max/s_i, no more than the float32 SVD loses to small gaps."""
    g = torch.Generator().manual_seed(11)
    m, n = 96, 64
    q1, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -4, n, dtype=torch.float64)
    delta = (q1 * s) @ q2.T
    tau = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.01
    delta, tau = delta.float(), tau.float()
    ref = dense_reference(delta, tau)
    svd32 = err(project_task_vector(delta, tau, decomposition="svd"), ref)
    mixed = err(project_task_vector(delta, tau, decomposition="gram_mixed"), ref)
    gram32 = err(project_task_vector(delta, tau, decomposition="gram32"), ref)
    assert mixed <= 2 * svd32 + 1e-8
    assert gram32 > 10 * mixed  # the float32 Gram matrix is what loses the small pairs


def test_left_vectors_forms_unresolved_columns_again_in_float64(linalg):
    """A pair too small for a float32 D V (here s = 1e-9 · s_max) gets its u from a float64 product."""
    from hf_merge.merging.methods.opcm_linalg import gram_pairs, left_vectors

    g = torch.Generator().manual_seed(12)
    q1, _ = torch.linalg.qr(torch.randn(50, 20, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    s = torch.ones(20, dtype=torch.float64)
    s[-1] = 1e-9
    delta = ((q1 * s) @ q2.T).float()
    values, v = gram_pairs(delta, torch.float64, linalg)
    u32, norms32 = left_vectors(delta, v, float(values[0]), torch.float32, linalg)
    u64, norms64 = left_vectors(delta, v, float(values[0]), torch.float64, linalg)
    assert norms32.dtype == torch.float64
    assert torch.allclose(norms32, norms64, rtol=1e-5, atol=0)
    assert torch.allclose(u32[:, -1].double(), u64[:, -1], rtol=1e-5, atol=1e-15)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zero_diagonal", [True, False])
@pytest.mark.parametrize("decomposition", ["gram_mixed", "gram64", "gram32"])
def test_rank_deficient_delta_projects_only_along_its_singular_pairs(
    shape, zero_diagonal, decomposition, project_task_vector
):
    delta, tau = sample(shape, seed=3, rank=5)
    ref = dense_reference(delta, tau, zero_diagonal=zero_diagonal, rank=5)
    out = project_task_vector(delta, tau, decomposition=decomposition, zero_diagonal=zero_diagonal)
    assert err(out, ref) < 1e-4 * float(tau.abs().max())
    # what is removed lies in D's row and column spaces: U_5ᵀ (τ − τ̃) V_5 carries all of it
    u, _, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    removed = tau.double() - out.double()
    inside = u[:, :5] @ (u[:, :5].T @ removed @ vh[:5].T) @ vh[:5]
    assert float((removed - inside).abs().max()) < 1e-6


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
def test_zero_delta(decomposition, project_task_vector):
    tau = sample((30, 20), seed=4)[1]
    zero = torch.zeros(30, 20)
    assert torch.equal(project_task_vector(zero, tau, project_zero_delta=False, decomposition=decomposition), tau)
    # project_zero_delta=True reproduces the reference: the SVD's (arbitrary) basis, whatever the path
    projected = project_task_vector(zero, tau, project_zero_delta=True, decomposition=decomposition)
    assert torch.equal(projected, project_task_vector(zero, tau, project_zero_delta=True, decomposition="svd"))
    assert not torch.equal(projected, tau)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decomposition", ["gram_mixed", "gram64", "gram32"])
def test_in_place_and_full_matrix_options(shape, decomposition, project_task_vector):
    delta, tau = sample(shape, seed=5)
    original = tau.clone()
    copied = project_task_vector(delta, tau, decomposition=decomposition)
    assert torch.equal(tau, original)
    in_place = project_task_vector(delta, tau, decomposition=decomposition, inplace=True)
    assert in_place.data_ptr() == tau.data_ptr() and torch.equal(in_place, copied)
    # reduced_svd=False is the reference's full-matrix SVD whatever the decomposition
    full = project_task_vector(delta, original, decomposition=decomposition, reduced_svd=False)
    assert torch.equal(full, project_task_vector(delta, original, decomposition="svd", reduced_svd=False))


def test_unknown_decomposition_is_refused(project_task_vector):
    delta, tau = sample((8, 8), seed=6)
    with pytest.raises(ValueError, match="decomposition must be one of svd, gram_mixed, gram64, gram32"):
        project_task_vector(delta, tau, decomposition="qr")


@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_tall_delta_removes_the_same_through_delta_as_through_u(zero_diagonal, linalg):
    """For a tall D, U = D V S⁻¹ is never formed; what τ loses is the same as with U formed."""
    from hf_merge.merging.methods.opcm_linalg import (
        gram_pairs,
        remove_pairs,
        remove_pairs_through_delta,
        split_rank,
    )

    delta, tau = sample((96, 24), seed=13, dtype=torch.float64)
    s, v = gram_pairs(delta, torch.float64, linalg)
    r = split_rank(s, 0.5)
    rows = 24 if zero_diagonal else r
    u = delta @ v / s
    through_u = remove_pairs(tau.clone(), u, v.T, r, zero_diagonal, linalg)
    through_delta = remove_pairs_through_delta(tau.clone(), delta, v[:, :rows], s[:rows], r, linalg)
    assert err(through_delta, through_u) < 1e-14
    assert err(through_delta, dense_reference(delta, tau, zero_diagonal=zero_diagonal)) < 1e-12
