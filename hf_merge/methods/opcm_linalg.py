"""OPCM's projection τ → τ̃ and the decompositions of D it can be built from.

With D = U diag(s) Vᵀ (m × n, k = min(m, n) pairs) and P = Uᵀ τ V, OPCM zeroes the block P[:r, :r]
and (``zero_diagonal``) P's diagonal, then maps back: τ̃ = τ − U E Vᵀ, where E holds the removed
entries. Only products with U and V are needed, so any factorisation giving D's singular pairs will
do:

- ``"svd"``: ``torch.linalg.svd`` of D, as the reference does (reduced, or full matrices with
  ``reduced_svd=False``). The exact path; the slowest on CPU.
- ``"gram64"``: the eigendecomposition of the small Gram matrix, DᵀD = V diag(s²) Vᵀ (or DDᵀ when
  D is wide), built and decomposed in float64, and U = D V / s in float64 too; the projection's
  products then run in τ's precision. The Gram matrix squares D's condition number, which float64
  absorbs (s down to ~1e-7·s_max stays resolved), so it is as close to a float64 SVD as a float32
  SVD is.
- ``"gram32"``: the same with the Gram matrix and its eigendecomposition in float32. Faster still,
  but singular values below ~3e-4·s_max drown in rounding (measured in benchmarks/results).

U is never orthogonalised: u_i = D v_i / ‖D v_i‖ uses the norm of the computed column rather than
√eigenvalue, because ‖D v_i‖ is accurate to the products' rounding while the eigenvalue of a small
pair is not. Pairs with ‖D v_i‖ ≤ s_max · max(m, n) · eps (the usual numerical-rank cut, eps of the
Gram matrix's precision) are not
singular pairs of D at all: D has no direction there, an SVD fills that null space with an
arbitrary orthonormal basis, and zeroing τ along arbitrary directions is not defined by the method,
so the Gram paths leave τ alone there. For a full-rank D (every real merge) this changes nothing.
"""

from __future__ import annotations

import torch

DECOMPOSITIONS = ("svd", "gram64", "gram32")


def split_rank(singular_values: torch.Tensor, alpha: float, index_base: int = 0) -> int:
    """Number of leading directions whose cross terms are removed: the first index where the
    cumulative share of singular-value mass exceeds ``alpha`` (0 if none does), plus ``index_base``."""
    share = singular_values.cumsum(0) / singular_values.sum()
    crossed = share > alpha
    r = int(crossed.float().argmax()) if bool(crossed.any()) else 0
    return min(r + index_base, singular_values.numel())


def remove_pairs(tau: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, r: int, zero_diagonal: bool) -> torch.Tensor:
    """τ −= U E Vᵀ in place, for E = the block (Uᵀ τ V)[:r, :r] and, with ``zero_diagonal``, the
    diagonal entries u_iᵀ τ v_i beyond it. ``u`` (m × q) and ``vh`` (q × n) hold q ≥ r pairs.

    Everything removed is U·C for a coefficient matrix C (q × n), so τ loses it in one in-place
    matrix product; C's rows come from W = Uᵀτ, one more product. Two products of τ's size with
    the singular vectors is the least zeroing the diagonal can cost."""
    rows = u.shape[1] if zero_diagonal else r
    if rows == 0:
        return tau
    u, vh = u[:, :rows], vh[:rows]
    w = u.T @ tau
    coeff = torch.empty_like(w)
    if r > 0:
        coeff[:r] = (w[:r] @ vh[:r].T) @ vh[:r]  # the r × r block Uᵣᵀ τ Vᵣ, mapped back to rows of Vᵀ
    if rows > r:
        coeff[r:] = (w[r:] * vh[r:]).sum(dim=1, keepdim=True) * vh[r:]  # u_iᵀ τ v_i · v_iᵀ, i ≥ r
    return tau.addmm_(u, coeff, alpha=-1)


def project_svd(
    delta: torch.Tensor,
    tau: torch.Tensor,
    *,
    alpha: float,
    zero_diagonal: bool,
    split_index_base: int,
    reduced_svd: bool,
    project_zero_delta: bool,
) -> torch.Tensor:
    """τ̃ from an SVD of D (``tau`` is overwritten in the reduced form)."""
    driver = "gesvd" if delta.is_cuda else None  # the reference's driver; gesvdj is less accurate
    u, s, vh = torch.linalg.svd(delta, full_matrices=not reduced_svd, driver=driver)
    if not project_zero_delta and not bool(s[:1].any()):  # D = 0 exactly: its basis is arbitrary
        return tau
    r = split_rank(s, alpha, split_index_base)
    if not reduced_svd:
        p = u.T @ tau @ vh.T
        if zero_diagonal:
            p.diagonal().zero_()
        p[:r, :r] = 0
        return u @ p @ vh
    return remove_pairs(tau, u, vh, r, zero_diagonal)


def gram_pairs(delta: torch.Tensor, gram_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular values (descending), right singular vectors (columns of V, n × n) and D itself,
    all in ``gram_dtype``, of a tall ``delta`` (m ≥ n), from the eigendecomposition of DᵀD."""
    d = delta.to(gram_dtype)
    evals, evecs = torch.linalg.eigh(d.T @ d)
    return evals.flip(0).clamp_min_(0).sqrt_(), evecs.flip(1), d


def project_gram(
    delta: torch.Tensor,
    tau: torch.Tensor,
    *,
    alpha: float,
    zero_diagonal: bool,
    split_index_base: int,
    gram_dtype: torch.dtype,
) -> torch.Tensor:
    """τ̃ from the eigendecomposition of D's Gram matrix (``tau`` is overwritten).

    A wide D is handled through its transpose: Dᵀ = V S Uᵀ has the same pairs and P becomes Pᵀ,
    whose diagonal and leading block are the same entries."""
    if delta.shape[0] < delta.shape[1]:
        project_gram(delta.T, tau.T, alpha=alpha, zero_diagonal=zero_diagonal,
                     split_index_base=split_index_base, gram_dtype=gram_dtype)
        return tau
    m, n = delta.shape
    s, v, d = gram_pairs(delta, gram_dtype)
    if not bool(s[:1].any()):  # D = 0: no singular pairs, nothing to remove
        return tau
    r = split_rank(s, alpha, split_index_base)
    rows = n if zero_diagonal else r  # without the diagonal only the leading r pairs are needed
    if rows == 0:
        return tau
    v = v[:, :rows]
    # U·S, column by column, in the Gram matrix's precision: a float32 product would carry an
    # error of eps·s_max into columns of norm s_i, i.e. lose log10(s_max/s_i) digits of u_i
    u = d @ v
    del d
    norms = torch.linalg.vector_norm(u, dim=0)
    # the numerical-rank cut of the precision the pairs were found in: a float64 SVD of the same
    # float32 D resolves pairs down there too, and the reference is that SVD
    cut = float(s[0]) * max(m, n) * torch.finfo(gram_dtype).eps
    kept = norms > cut
    u = u.div_(norms.clamp_min_(torch.finfo(u.dtype).tiny)).to(delta.dtype)
    vh = v.T.to(delta.dtype)
    if not bool(kept.all()):  # D is rank-deficient: drop the pairs it does not have
        r = int(kept[:r].sum())
        u, vh = u[:, kept], vh[kept]
    return remove_pairs(tau, u, vh, r, zero_diagonal)


def project_task_vector(
    delta: torch.Tensor,
    tau: torch.Tensor,
    *,
    alpha: float = 0.5,
    zero_diagonal: bool = True,
    split_index_base: int = 0,
    reduced_svd: bool = True,
    inplace: bool = False,
    project_zero_delta: bool = True,
    decomposition: str = "svd",
) -> torch.Tensor:
    """τ̃: τ without its components in the dominant subspace of ``delta`` (see the module docstring).

    With ``inplace=True`` (reduced form), ``tau`` itself becomes τ̃, saving a copy. With
    ``project_zero_delta=False``, τ comes back unchanged where ``delta`` is all zeros; with True,
    a zero ``delta`` is projected on the SVD's arbitrary basis as the reference does, whatever the
    decomposition. ``reduced_svd=False`` is the reference's full-matrix SVD, whatever the
    decomposition.
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {', '.join(DECOMPOSITIONS)}, got {decomposition!r}")
    if not inplace:
        tau = tau.clone()
    options = {"alpha": alpha, "zero_diagonal": zero_diagonal, "split_index_base": split_index_base}
    if decomposition == "svd" or not reduced_svd or (project_zero_delta and not bool(delta.any())):
        return project_svd(delta, tau, reduced_svd=reduced_svd, project_zero_delta=project_zero_delta, **options)
    # float64 inputs (svd_dtype float64) keep a float64 Gram matrix whatever was asked
    gram_dtype = torch.float64 if decomposition == "gram64" or delta.dtype == torch.float64 else torch.float32
    return project_gram(delta, tau, gram_dtype=gram_dtype, **options)
