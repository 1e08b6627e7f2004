"""Iso-C's and TSV-M's decompositions: polar factors, the isotropic matrix, leading singular triplets.

The references take them from ``torch.linalg.svd``. In float32 compute these helpers take them from
the eigendecomposition of the Gram matrix of the matrix's smaller side instead, built and decomposed
in float64, as OPCM's ``gram_mixed`` does (:mod:`hf_merge.merging.methods.opcm_linalg`); float64
compute (the exactness tests) keeps the SVD, unchanged. The algebra, for an r × N matrix A with
r ≤ N (a tall one is handled through its transpose) and ``A = U S Vᵀ`` (reduced):

- ``G = A Aᵀ = U S² Uᵀ``: ``eigh(G)`` gives U and s = √eigenvalues, every one of the r singular
  values, zeros included, so ``mean(S)`` is the reference's;
- the polar factor ``U Vᵀ = U S⁻¹ Uᵀ A = G^{-1/2} A`` (for a tall A, ``A (AᵀA)^{-1/2}``);
- Iso-C's ``mean(S) · U Vᵀ = (mean(S) · G^{-1/2}) A``;
- TSV-M's leading triplets: the first k columns of U and ``V_k = Aᵀ U_k / ‖Aᵀ U_k‖`` (column norms,
  which are also the singular values: ``‖Aᵀ u_i‖ = s_i``), or the same from the other side.

Sign and order: ``eigh`` returns ascending eigenvalues, flipped here to the SVD's descending order
(TSV-M's blocks are the leading triplets in that order). A singular pair's sign (or a rotation
within equal singular values) is arbitrary in both, and no consumer sees it: ``G^{-1/2}`` is a
function of A alone, and TSV-M uses its triplets only through ``polar(U_cat) · S · polar(V_catᵀ)``.
Flipping ``u_i`` and ``v_i`` together turns U_cat into ``U_cat R`` and V_catᵀ into ``R V_catᵀ``
for a diagonal R of ±1; ``polar(U_cat R) = polar(U_cat) R`` and ``polar(R V_catᵀ) = R polar(V_catᵀ)``,
and ``R S R = S``, so the product is unchanged (likewise for an orthogonal R mixing equal values).

Precision: float32 inputs are exact in float64 (products of two float32 numbers are exact in
float64), so G carries only float64 rounding; ``G^{-1/2}`` and its product with A are formed in
float64 and rounded once to float32 at the end. Measured (benchmarks/results/spectral_speed.md):
float32 products would save nothing on a 768×768 matrix and 0.04 s of 0.19 s on 768×3072 (``eigh``
dominates), but lose 7-8× more than the reference's float32 SVD on 768×768 (polar factor 8.7e-5
against 1.1e-5), while float64 ones stay 5-1400× closer to a float64 SVD than the float32 SVD is.

When the SVD is used instead (float32 too), so that results match the reference's where the Gram
path could not: an error ``E`` of G (|E| ≈ eps64 · s_max²) moves the polar factor by
``E_ij / (s_j (s_i + s_j))``, at worst ``eps64 · (s_max / s_min)² / 2``; a float32 SVD (backward
error eps32 · s_max) moves it by ``eps32 · s_max / s_min``, or ``2 eps32 · s_max / (s_min + s_min')``
with s_min' the second smallest value for a square matrix (whose polar factor is insensitive to
one small value alone). The Gram path is taken where:

1. G's smallest eigenvalue is above its numerical-rank cut, ``s_min² > s_max² · max(m, n) · eps64``
   (s_min/s_max above 4e-7 to 8e-7 at ViT-B/32's sizes): below it an eigenvalue is rounding, the
   matrix is (numerically) rank-deficient, and its SVD fills the null space with an arbitrary
   basis that only the reference's SVD reproduces. An all-zero matrix, zero-padded factors and
   duplicated rows or columns (of the smaller side) land here, and so does a low-rank product
   rounded to float32, whose rounding tail sits near s_max · 1e-8 (measured at 48 to 3072 wide); and
2. the Gram bound is no larger than the float32 SVD's: ``eps64 · (s_max/s_min)² ≤ eps32 · s_max /
   s_min'`` (s_min' = s_min unless square). Off a square matrix this is s_min/s_max ≥ 2e-9, which
   rule 1 implies; on a square one it turns away a lone tiny singular value (s_min ≪ s_min').

For leading triplets only the k kept values matter: rule 1 on ``s_k``. (Where s_k = s_{k+1} the
kept subspace is not defined, for the SVD either.) Otherwise, ``torch.linalg.svd``, as the
reference.
"""

from __future__ import annotations

import torch

from hf_merge.merging.methods.linalg_backend import Linalg

_TORCH = Linalg("torch")
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's decomposition, ``torch.linalg.svd`` (reduced): float64, and the fallback."""
    return torch.linalg.svd(matrix, full_matrices=False)


def uses_gram(matrix: torch.Tensor) -> bool:
    """Whether ``matrix``'s precision takes the Gram path: float32 (float64 keeps the exact SVD)."""
    return matrix.dtype == torch.float32


def gram_eigh(short: torch.Tensor, linalg: Linalg = _TORCH) -> tuple[torch.Tensor, torch.Tensor]:
    """``short shortᵀ`` for an r × N float64 ``short``: its eigenvalues (descending, clipped at 0,
    the squared singular values) and eigenvectors (columns, the left singular vectors)."""
    values, vectors = linalg.eigh_lower(linalg.lower_gram(short.T))
    return values.flip(0).clamp_min_(0), vectors.flip(1)


def resolved(squares: torch.Tensor, shape: tuple[int, ...], square: bool) -> bool:
    """Rules 1 and 2 of the module docstring for singular values ``squares`` (their squares, descending)."""
    top, low = float(squares[0]), float(squares[-1])
    if not low > top * max(shape) * EPS64:  # also catches the zero matrix (top = low = 0)
        return False
    second = float(squares[-2]) if square and squares.numel() > 1 else low
    # eps64 · top / low ≤ eps32 · √top / √second, squared on both sides
    return (EPS64 * top / low) ** 2 <= EPS32**2 * top / second


def _gram_polar(matrix: torch.Tensor, flat: bool, linalg: Linalg) -> torch.Tensor | None:
    """``U Vᵀ`` (``mean(S) · U Vᵀ`` with ``flat``) through the Gram matrix; None where not resolved."""
    wide = matrix.shape[0] <= matrix.shape[1]
    exact = matrix.to(torch.float64)
    squares, vectors = gram_eigh(exact if wide else exact.T, linalg)
    if not resolved(squares, tuple(matrix.shape), matrix.shape[0] == matrix.shape[1]):
        return None
    s = squares.sqrt()
    scale = s.mean() if flat else s.new_ones(())
    root = linalg.mm(vectors * (scale / s), vectors.T)  # scale · G^{-1/2}, symmetric
    # G^{-1/2} A for a wide A; A (AᵀA)^{-1/2} for a tall one, both contiguous
    product = linalg.mm(root, exact) if wide else linalg.mm(exact, root)
    return product.to(matrix.dtype)


def _svd_polar(matrix: torch.Tensor, flat: bool) -> torch.Tensor:
    """The reference's computation, from ``torch.linalg.svd``."""
    u, s, vh = svd(matrix)
    return ((u * s.mean()) if flat else u) @ vh


def isotropic(matrix: torch.Tensor, linalg: Linalg = _TORCH) -> torch.Tensor:
    """``mean(S) · U Vᵀ`` for ``U S Vᵀ = svd(matrix)`` (reduced): the matrix with a flat spectrum.

    Float32: ``(mean(S) · G^{-1/2}) M`` from the float64 Gram matrix G of the smaller side, ``mean``
    over all min(m, n) singular values as the reference's; the SVD where the module docstring's
    rules send it (and always in float64)."""
    if uses_gram(matrix):
        result = _gram_polar(matrix, True, linalg)
        if result is not None:
            return result
    return _svd_polar(matrix, True)


def polar(matrix: torch.Tensor, linalg: Linalg = _TORCH) -> torch.Tensor:
    """The orthogonal polar factor ``u vh`` of ``svd(matrix)`` (reduced).

    Float32: ``G^{-1/2} A`` (``A (AᵀA)^{-1/2}`` for a tall A) from the float64 Gram matrix, else
    the SVD, as :func:`isotropic`."""
    if uses_gram(matrix):
        result = _gram_polar(matrix, False, linalg)
        if result is not None:
            return result
    return _svd_polar(matrix, False)


def polar_product(u_cat: torch.Tensor, s_cat: torch.Tensor, v_cat: torch.Tensor,
                  linalg: Linalg = _TORCH) -> torch.Tensor:
    """TSV-M's ``polar(U_cat) · diag(S_cat) · polar(V_catᵀ)`` (``v_cat`` holds the rows of V_catᵀ
    as columns).

    Float32: the Gram path drops the columns that are zero in U_cat, S_cat and V_cat alike (the
    zero padding when T·k < r) and orthogonalises the rest. The result is the reference's: for
    ``U_cat = [A, 0]`` with A of full column rank, ``svd(U_cat)``'s null right singular vectors
    span exactly the padded coordinates, so ``polar(U_cat) = [polar(A), N]`` with N arbitrary, and
    ``diag(S_cat)`` zeroes N's columns (likewise the padded rows of ``polar(V_catᵀ)``). Where A or
    the V side is not resolved (rank-deficient: a duplicated expert, say) the reference's SVDs of
    the padded matrices, whose arbitrary null-space bases then do count, run instead."""
    used = u_cat.any(dim=0) | v_cat.any(dim=0) | (s_cat != 0)
    if uses_gram(u_cat) and bool(used.any()):
        left = _gram_polar(u_cat[:, used], False, linalg)
        right = None if left is None else _gram_polar(v_cat[:, used].T, False, linalg)
        if left is not None and right is not None:
            return (left * s_cat[used]) @ right
    return (_svd_polar(u_cat, False) * s_cat) @ _svd_polar(v_cat.T, False)


def stacked(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Triplets as one ``(m + 1 + n) × k`` block: the columns of U, the singular values, the
    columns of V (the rows of Vᵀ)."""
    return torch.cat([u, s[None], v])


def _gram_triplets(tau: torch.Tensor, k: int, linalg: Linalg) -> torch.Tensor | None:
    """:func:`leading_triplets` through the Gram matrix; None where ``s_k`` is not resolved."""
    m, n = tau.shape
    wide = m <= n
    exact = tau.to(torch.float64)
    short = exact if wide else exact.T  # r × N
    squares, vectors = gram_eigh(short, linalg)
    if not float(squares[k - 1]) > float(squares[0]) * max(m, n) * EPS64:  # rule 1 on s_k (and τ = 0)
        return None
    near = vectors[:, :k]  # U_k of a wide τ, V_k of a tall one
    far = linalg.mm(short.T, near)  # N × k, columns s_i times the other side's vectors
    # ‖Aᵀu_i‖ = s_i, more accurate than √eigenvalue for the smaller values
    s = far.square().sum(dim=0).sqrt_()
    far.div_(s)
    u, v = (near, far) if wide else (far, near)
    return stacked(u, s, v).to(tau.dtype)


def leading_triplets(tau: torch.Tensor, k: int, linalg: Linalg = _TORCH) -> torch.Tensor:
    """``tau``'s k leading singular triplets stacked as one ``(m + 1 + n) × k`` block (see
    :func:`stacked`), in descending order of singular value.

    Float32: U_k from ``eigh(τ τᵀ)`` and ``V_k = τᵀ U_k / s`` (or V_k from ``eigh(τᵀ τ)`` and U_k
    from τ V_k for a tall τ), everything in float64 and rounded at the end; the SVD where ``s_k``
    is not resolved (rule 1 of the module docstring: a τ of rank below k, τ = 0)."""
    if not k:
        return tau.new_zeros(sum(tau.shape) + 1, 0)
    if uses_gram(tau):
        result = _gram_triplets(tau, k, linalg)
        if result is not None:
            return result
    u, s, vh = svd(tau)
    return stacked(u[:, :k], s[:k], vh[:k].T)
