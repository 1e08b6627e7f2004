"""Iso-C's and TSV-M's Gram-path decompositions against float64 and float32 SVDs, and the fallback.

Accuracy is measured against ``torch.linalg.svd`` in float64 of the same float32 matrix, next to
the error of the reference's own float32 SVD on it: the Gram path must be at least as close,
within 2× (``err_gram ≤ 2 · err_svd32``), or within the float32 rounding of the result itself
(``ROUNDING · max|exact|``), whichever is larger. Where the fallback must run, the result is the
float32 SVD formula's, bit for bit, and ``torch.linalg.svd`` is seen to be called.
"""

from __future__ import annotations

import pytest
import torch

from hf_merge.merging.methods import spectral
from hf_merge.merging.methods.linalg_backend import Linalg
from hf_merge.merging.methods.spectral import isotropic, leading_triplets, polar, polar_product

SHAPES = ((48, 48), (40, 96), (96, 40))
# a float32 result cannot be closer than its own rounding: half an ulp of the largest entry, twice
ROUNDING = torch.finfo(torch.float32).eps


@pytest.fixture(params=["torch", "openblas"])
def linalg(request):
    """Both backends must agree with the float64 reference alike."""
    return Linalg(request.param)


@pytest.fixture
def svd_calls(monkeypatch):
    """The shapes the helpers' SVD (``torch.linalg.svd``) is called on while the test runs."""
    calls: list[tuple[int, ...]] = []
    real = spectral.svd

    def counting(matrix):
        calls.append(tuple(matrix.shape))
        return real(matrix)

    monkeypatch.setattr(spectral, "svd", counting)
    return calls


def with_spectrum(shape, s, seed):
    """A float32 matrix with singular values ``s`` (float64) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return ((u * s) @ v.T).float()


def resolved_cases(shape, seed=0):
    """Matrices the Gram path takes: ``(name, float32 matrix)``."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    yield "gaussian", torch.randn(m, n, generator=g)
    low = torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)
    yield "rank 4 plus 1e-3 noise", low / low.norm() + 1e-3 * torch.randn(m, n, generator=g) / (m * n) ** 0.5
    yield "power law", with_spectrum(shape, torch.arange(1, r + 1, dtype=torch.float64) ** -1.0, seed)
    yield "geometric to 1e-5", with_spectrum(shape, torch.logspace(0, -5, r, dtype=torch.float64), seed)


def reference(matrix, flat=False):
    """The reference's formula: ``u vh`` (``mean(S) · u vh`` with ``flat``) of ``matrix``'s SVD."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u * s.mean()) if flat else u) @ vh


def errors(got, matrix, flat):
    """(error of ``got``, error of the float32 SVD formula, allowed): max abs against float64."""
    exact = reference(matrix.double(), flat)
    svd32 = float((reference(matrix, flat).double() - exact).abs().max())
    err = float((got.double() - exact).abs().max())
    return err, svd32, max(2 * svd32, ROUNDING * float(exact.abs().max()))


# -- isotropic and polar: as close to a float64 SVD as a float32 SVD is ------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flat", [False, True], ids=["polar", "isotropic"])
def test_gram_path_is_as_accurate_as_a_float32_svd(shape, flat, linalg, svd_calls):
    for name, matrix in resolved_cases(shape):
        got = (isotropic if flat else polar)(matrix, linalg)
        assert got.dtype == torch.float32 and got.shape == matrix.shape and got.is_contiguous()
        err, svd32, allowed = errors(got, matrix, flat)
        assert err <= allowed, (name, err, svd32)
    assert svd_calls == []  # every one of them took the Gram path


def test_isotropic_mean_counts_every_singular_value():
    """mean(S) over all min(m, n) values: with half of them near zero the scale halves."""
    s = torch.cat([torch.ones(20, dtype=torch.float64), torch.full((20,), 1e-3, dtype=torch.float64)])
    matrix = with_spectrum((40, 96), s, 1)
    got = isotropic(matrix)
    assert torch.allclose(torch.linalg.svdvals(got.double()), torch.full((40,), 0.5005, dtype=torch.float64), atol=1e-6)


def rank_deficient(shape):
    """Matrices whose singular values are not all resolved: ``(name, float32 matrix)``."""
    m, n = shape
    g = torch.Generator().manual_seed(3)
    padded = torch.randn(m, n, generator=g)
    padded[:, -3:] = 0  # zero columns, as TSV-M's padding (and rows: a wide matrix keeps its rank)
    padded[-3:] = 0
    yield "zero rows and columns", padded
    yield "zero", torch.zeros(m, n)
    yield "rank 4 (rounded to float32)", (torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g))
    duplicated = torch.randn(m, n, generator=g)
    duplicated[:, 1] = duplicated[:, 0]
    duplicated[1] = duplicated[0]
    yield "duplicated row and column", duplicated


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flat", [False, True], ids=["polar", "isotropic"])
def test_rank_deficient_matrices_fall_back_to_the_references_svd(shape, flat, linalg, svd_calls):
    for name, matrix in rank_deficient(shape):
        svd_calls.clear()
        got = (isotropic if flat else polar)(matrix, linalg)
        assert svd_calls == [shape], name
        assert torch.equal(got, reference(matrix, flat)), name


def test_a_lone_tiny_singular_value_of_a_square_matrix_falls_back(svd_calls):
    """A square matrix's polar factor barely depends on one small value alone, so its float32 SVD
    loses eps32 · s_max / s_second there, while the Gram path would lose eps64 · (s_max/s_min)²:
    rule 2 sends it to the SVD. A rectangular one, whose SVD loses eps32 · s_max / s_min, stays."""
    s = torch.ones(48, dtype=torch.float64)
    s[-1] = 1e-5
    square = with_spectrum((48, 48), s, 2)
    assert torch.equal(polar(square), reference(square))
    assert svd_calls == [(48, 48)]
    svd_calls.clear()
    wide = with_spectrum((48, 96), s, 2)
    err, svd32, allowed = errors(polar(wide), wide, False)
    assert svd_calls == [] and err <= allowed, (err, svd32)


def test_float64_keeps_the_exact_svd(svd_calls):
    matrix = torch.randn(40, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(isotropic(matrix), reference(matrix, True))
    assert torch.equal(polar(matrix), reference(matrix))
    assert svd_calls == [(40, 96), (40, 96)]


# -- leading triplets -------------------------------------------------------------------------------
def reference_triplets(tau, k):
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return u[:, :k], s[:k], vh[:k].T


def unstack(block, m):
    return block[:m], block[m], block[m + 1:]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 6, 20])
def test_leading_triplets_match_the_svd_up_to_sign(shape, k, linalg, svd_calls):
    m, n = shape
    for name, tau in resolved_cases(shape, seed=5):
        block = leading_triplets(tau, k, linalg)
        assert block.shape == (m + 1 + n, k) and block.dtype == torch.float32
        u, s, v = unstack(block, m)
        eu, es, ev = reference_triplets(tau.double(), k)
        fu, fs, fv = (t.double() for t in reference_triplets(tau, k))
        assert bool((s[:-1] >= s[1:]).all()), name  # descending, as the reference's blocks
        signs = torch.sign((u.double() * eu).sum(0))
        fsigns = torch.sign((fu * eu).sum(0))
        for got, exact, svd32 in ((u.double() * signs, eu, fu * fsigns), (s.double(), es, fs),
                                  (v.double() * signs, ev, fv * fsigns)):
            err, err32 = float((got - exact).abs().max()), float((svd32 - exact).abs().max())
            assert err <= max(2 * err32, ROUNDING * float(exact.abs().max())), (name, err, err32)
    assert svd_calls == []


@pytest.mark.parametrize("shape", SHAPES)
def test_leading_triplets_fall_back_where_the_kth_value_is_not_resolved(shape, svd_calls):
    m, n = shape
    g = torch.Generator().manual_seed(6)
    low = torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)
    for name, tau, k in (("rank 3, k = 5", low, 5), ("zero", torch.zeros(m, n), 5)):
        svd_calls.clear()
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        assert torch.equal(leading_triplets(tau, k), torch.cat([u[:, :k], s[None, :k], vh[:k].T])), name
        assert svd_calls == [shape], name
    svd_calls.clear()
    leading_triplets(low, 3)  # its 3 values are resolved: the Gram path
    assert svd_calls == []
    assert leading_triplets(low, 0).shape == (m + 1 + n, 0)


# -- TSV-M's product of polar factors ---------------------------------------------------------------
def factors(shape, experts, seed=7, taus=None):
    """U_cat, S_cat, V_cat as TSV-M keeps them for ``experts`` task vectors (float32 SVDs),
    zero-padded where ``experts · k < r``."""
    m, n = shape
    r = min(m, n)
    k = int(r * (1 / experts))
    g = torch.Generator().manual_seed(seed)
    taus = taus or [torch.randn(m, n, generator=g) for _ in range(experts)]
    u_cat, s_cat, v_cat = torch.zeros(m, r), torch.zeros(r), torch.zeros(n, r)
    for i, tau in enumerate(taus):
        u, s, v = reference_triplets(tau, k)
        u_cat[:, i * k:(i + 1) * k], s_cat[i * k:(i + 1) * k], v_cat[:, i * k:(i + 1) * k] = u, s, v
    return u_cat, s_cat, v_cat


def reference_product(u_cat, s_cat, v_cat):
    return (reference(u_cat) * s_cat) @ reference(v_cat.T)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("experts", [1, 3, 5, 7])  # r = 40 or 48: 3, 5 and 7 leave zero padding
def test_polar_product_leaves_the_padding_out_and_matches_the_reference(shape, experts, linalg, svd_calls):
    u_cat, s_cat, v_cat = factors(shape, experts)
    got = polar_product(u_cat, s_cat, v_cat, linalg)
    assert svd_calls == []
    exact = reference_product(u_cat.double(), s_cat.double(), v_cat.double())
    err32 = float((reference_product(u_cat, s_cat, v_cat).double() - exact).abs().max())
    err = float((got.double() - exact).abs().max())
    assert err <= max(2 * err32, ROUNDING * float(exact.abs().max())), (err, err32)


def test_polar_product_is_sign_invariant():
    u_cat, s_cat, v_cat = factors((40, 96), 3)
    flip = torch.ones(40)
    flip[::3] = -1
    assert torch.allclose(polar_product(u_cat * flip, s_cat, v_cat * flip), polar_product(u_cat, s_cat, v_cat),
                          rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_product_of_rank_deficient_factors_is_the_references(shape, svd_calls):
    """A duplicated expert repeats its block: U_cat is rank-deficient and its SVD's arbitrary
    null-space basis counts, so only the reference's SVDs give the reference's result."""
    m, n = shape
    tau = torch.randn(m, n, generator=torch.Generator().manual_seed(8))
    u_cat, s_cat, v_cat = factors(shape, 3, taus=[tau, tau.clone(), tau * 0.5])
    r = min(m, n)
    assert torch.equal(polar_product(u_cat, s_cat, v_cat), reference_product(u_cat, s_cat, v_cat))
    assert svd_calls == [(m, r), (r, n)]  # the reference's SVDs of the padded factors


def test_polar_product_of_float64_factors_is_the_references(svd_calls):
    u_cat, s_cat, v_cat = (t.double() for t in factors((40, 96), 3))
    assert torch.equal(polar_product(u_cat, s_cat, v_cat), reference_product(u_cat, s_cat, v_cat))
    assert svd_calls == [(40, 40), (40, 96)]
