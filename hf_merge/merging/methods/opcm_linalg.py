"""OPCM's projection τ → τ̃ and the decompositions of D it can be built from.

With D = U diag(s) Vᵀ (m × n, k = min(m, n) pairs) and P = Uᵀ τ V, OPCM zeroes the block P[:r, :r]
and (``zero_diagonal``) P's diagonal, then maps back: τ̃ = τ − U E Vᵀ, where E holds the removed
entries. Only products with U and V are needed, so any factorisation giving D's singular pairs will
do:

- ``"svd"``: ``torch.linalg.svd`` of D, as the reference does (reduced, or full matrices with
  ``reduced_svd=False``). The exact path; the slowest on CPU.
- ``"gram_mixed"``: the eigendecomposition of the small Gram matrix, DᵀD = V diag(s²) Vᵀ (or DDᵀ
  when D is wide), built and decomposed in float64; U = D V / s and the projection's products run in
  D's precision. The Gram matrix squares D's condition number, which float64 absorbs (s down to
  ~1e-7·s_max stays resolved). A float32 D V carries an error of eps·s_max into a column of norm
  s_i, so u_i is good to eps·s_max/s_i; a float32 SVD does no better (its u_i is good to
  eps·s_max/gap_i, and gaps in the bulk of the spectrum are smaller than the values), so this path
  is as close to a float64 SVD as the reference's float32 SVD is (measured in benchmarks/results).
- ``"gram64"``: the same with U = D V / s formed in float64: closer to a float64 SVD than the
  float32 SVD by orders of magnitude, for one more float64 product per matrix.
- ``"gram32"``: the Gram matrix and its eigendecomposition in float32. Faster still, but singular
  values below ~3e-4·s_max drown in rounding (measured in benchmarks/results).

Of the Gram matrix only what ``eigh`` reads is computed, its lower triangle: in blocks on torch (5/8
of the products of the whole DᵀD), one ``syrk`` on OpenBLAS (half); see
:meth:`~hf_merge.merging.methods.linalg_backend.Linalg.lower_gram`.

U is never orthogonalised: u_i = D v_i / ‖D v_i‖ uses the norm of the computed column rather than
√eigenvalue, because ‖D v_i‖ is accurate to the products' rounding while the eigenvalue of a small
pair is not (a column too small for the products' precision is formed again in the Gram matrix's,
see :func:`left_vectors`). Pairs with ‖D v_i‖ ≤ s_max · max(m, n) · eps (the usual numerical-rank
cut, eps of the Gram matrix's precision) are not singular pairs of D at all: D has no direction
there, an SVD fills that null space with an arbitrary orthonormal basis, and zeroing τ along
arbitrary directions is not defined by the method, so the Gram paths leave τ alone there. For a
full-rank D (every real merge) this changes nothing. A tall D (fc1, fc2) whose pairs are all
resolved skips U altogether (:func:`remove_pairs_through_delta`).
"""

from __future__ import annotations

import torch

from hf_merge.merging.methods.linalg_backend import Linalg

DECOMPOSITIONS = ("svd", "gram_mixed", "gram64", "gram32")
_TORCH = Linalg("torch")


def split_rank(singular_values: torch.Tensor, alpha: float, index_base: int = 0) -> int:
    """Number of leading directions whose cross terms are removed: the first index where the
    cumulative share of singular-value mass exceeds ``alpha`` (0 if none does), plus ``index_base``."""
    share = singular_values.cumsum(0) / singular_values.sum()
    crossed = share > alpha
    r = int(crossed.float().argmax()) if bool(crossed.any()) else 0
    return min(r + index_base, singular_values.numel())


def remove_pairs(
    tau: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, r: int, zero_diagonal: bool, linalg: Linalg = _TORCH
) -> torch.Tensor:
    """τ −= U E Vᵀ in place, for E = the block (Uᵀ τ V)[:r, :r] and, with ``zero_diagonal``, the
    diagonal entries u_iᵀ τ v_i beyond it. ``u`` (m × q) and ``vh`` (q × n) hold q ≥ r pairs.

    Everything removed is U·C for a coefficient matrix C (q × n), so τ loses it in one in-place
    matrix product; C's rows come from W = Uᵀτ, one more product. Two products of τ's size with
    the singular vectors is the least zeroing the diagonal can cost."""
    rows = u.shape[1] if zero_diagonal else r
    if rows == 0:
        return tau
    u, vh = u[:, :rows], vh[:rows]
    return linalg.sub_mm_(tau, u, removed_coefficients(linalg.mm(u.T, tau), vh, r, linalg))


def removed_coefficients(w: torch.Tensor, vh: torch.Tensor, r: int, linalg: Linalg = _TORCH) -> torch.Tensor:
    """C with U·C = what τ loses, from W = Uᵀτ (q × n) and the q rows of Vᵀ that count."""
    coeff = torch.empty_like(w)
    if r > 0:
        # the r × r block Uᵣᵀ τ Vᵣ, mapped back to rows of Vᵀ
        coeff[:r] = linalg.mm(linalg.mm(w[:r], vh[:r].T), vh[:r])
    if w.shape[0] > r:
        coeff[r:] = (w[r:] * vh[r:]).sum(dim=1, keepdim=True) * vh[r:]  # u_iᵀ τ v_i · v_iᵀ, i ≥ r
    return coeff


def remove_pairs_through_delta(
    tau: torch.Tensor, delta: torch.Tensor, v: torch.Tensor, s: torch.Tensor, r: int, linalg: Linalg = _TORCH
) -> torch.Tensor:
    """:func:`remove_pairs` with U = D V S⁻¹ never formed, for a tall D (m > 2n): Uᵀτ = S⁻¹ Vᵀ (Dᵀτ)
    and U·C = D (V S⁻¹ C), so the three products of τ's size (D V, Uᵀτ, U·C) become two (Dᵀτ, D·K)
    and two n × n ones. ``v`` (n × q) and ``s`` hold the q pairs that count, all resolved in τ's
    precision (the caller checks), so dividing by s loses no more than forming D V / s would."""
    inverse = s.reciprocal().to(tau.dtype).unsqueeze(1)
    vh = v.T.to(tau.dtype)
    w = linalg.mm(vh, linalg.mm(delta.T, tau)).mul_(inverse)
    coeff = removed_coefficients(w, vh, r, linalg).mul_(inverse)
    return linalg.sub_mm_(tau, delta, linalg.mm(vh.T, coeff))


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


def gram_pairs(
    delta: torch.Tensor, gram_dtype: torch.dtype, linalg: Linalg = _TORCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors (columns of V, n × n) of a tall
    ``delta`` (m ≥ n), in ``gram_dtype``, from the eigendecomposition of DᵀD."""
    evals, evecs = linalg.eigh_lower(linalg.lower_gram(delta.to(gram_dtype)))
    return evals.flip(0).clamp_min_(0).sqrt_(), evecs.flip(1)


def left_vectors(
    delta: torch.Tensor, v: torch.Tensor, s_max: float, vectors_dtype: torch.dtype, linalg: Linalg = _TORCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """U·S = D V, column by column, and its column norms (float64 where it was formed in float64).

    Formed in ``vectors_dtype``; a column whose norm is within that precision's rounding of D V
    (‖D v_i‖ ≤ s_max · max(m, n) · eps) says nothing about u_i, so where ``v`` is more precise
    those few columns are formed again in its precision. Only a (nearly) rank-deficient D has any."""
    m, n = delta.shape
    u = linalg.mm(delta.to(vectors_dtype), v.to(vectors_dtype))
    # a column reduction of squares: vector_norm(dim=0) walks the columns with a stride, 10x slower
    norms = u.square().sum(dim=0).sqrt_().to(v.dtype)
    if vectors_dtype != v.dtype:
        unresolved = norms <= s_max * max(m, n) * torch.finfo(vectors_dtype).eps
        if bool(unresolved.any()):
            exact = linalg.mm(delta.to(v.dtype), v[:, unresolved])
            norms[unresolved] = exact.square().sum(dim=0).sqrt_()
            u[:, unresolved] = exact.to(vectors_dtype)
    return u, norms


def project_gram(
    delta: torch.Tensor,
    tau: torch.Tensor,
    *,
    alpha: float,
    zero_diagonal: bool,
    split_index_base: int,
    gram_dtype: torch.dtype,
    vectors_dtype: torch.dtype,
    linalg: Linalg = _TORCH,
) -> torch.Tensor:
    """τ̃ from the eigendecomposition of D's Gram matrix (``tau`` is overwritten); U = D V is
    formed in ``vectors_dtype``.

    A wide D is handled through its transpose: Dᵀ = V S Uᵀ has the same pairs and P becomes Pᵀ,
    whose diagonal and leading block are the same entries."""
    if delta.shape[0] < delta.shape[1]:
        project_gram(delta.T, tau.T, alpha=alpha, zero_diagonal=zero_diagonal, split_index_base=split_index_base,
                     gram_dtype=gram_dtype, vectors_dtype=vectors_dtype, linalg=linalg)
        return tau
    m, n = delta.shape
    s, v = gram_pairs(delta, gram_dtype, linalg)
    if not bool(s[:1].any()):  # D = 0: no singular pairs, nothing to remove
        return tau
    r = split_rank(s, alpha, split_index_base)
    rows = n if zero_diagonal else r  # without the diagonal only the leading r pairs are needed
    if rows == 0:
        return tau
    resolved = float(s[rows - 1]) > float(s[0]) * max(m, n) * torch.finfo(vectors_dtype).eps
    # s from a float64 Gram matrix is as good as ‖D v_i‖ to divide by; from a float32 one it is not
    if m > 2 * n and gram_dtype == torch.float64 and vectors_dtype == delta.dtype and resolved:
        return remove_pairs_through_delta(tau, delta, v[:, :rows], s[:rows], r, linalg)
    u, norms = left_vectors(delta, v[:, :rows], float(s[0]), vectors_dtype, linalg)
    # the numerical-rank cut of the precision the pairs were found in: a float64 SVD of the same
    # float32 D resolves pairs down there too, and the reference is that SVD
    kept = norms > float(s[0]) * max(m, n) * torch.finfo(gram_dtype).eps
    u = u.div_(norms.to(u.dtype).clamp_min_(torch.finfo(u.dtype).tiny)).to(delta.dtype)
    vh = v[:, :rows].T.to(delta.dtype)
    if not bool(kept.all()):  # D is rank-deficient: drop the pairs it does not have
        r = int(kept[:r].sum())
        u, vh = u[:, kept], vh[kept]
    return remove_pairs(tau, u, vh, r, zero_diagonal, linalg)


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
    linalg: Linalg = _TORCH,
) -> torch.Tensor:
    """τ̃: τ without its components in the dominant subspace of ``delta`` (see the module docstring).

    With ``inplace=True`` (reduced form), ``tau`` itself becomes τ̃, saving a copy. With
    ``project_zero_delta=False``, τ comes back unchanged where ``delta`` is all zeros; with True,
    a zero ``delta`` is projected on the SVD's arbitrary basis as the reference does, whatever the
    decomposition. ``reduced_svd=False`` is the reference's full-matrix SVD, whatever the
    decomposition. ``linalg`` runs the Gram paths' products and eigendecompositions (the SVD path
    is torch's, as the reference's).
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {', '.join(DECOMPOSITIONS)}, got {decomposition!r}")
    if not inplace:
        tau = tau.clone()
    if decomposition == "svd" or not reduced_svd or (project_zero_delta and not bool(delta.any())):
        return project_svd(delta, tau, reduced_svd=reduced_svd, project_zero_delta=project_zero_delta, alpha=alpha,
                           zero_diagonal=zero_diagonal, split_index_base=split_index_base)
    # float64 inputs (svd_dtype float64) keep float64 throughout whatever was asked
    gram_dtype = torch.float32 if decomposition == "gram32" and delta.dtype != torch.float64 else torch.float64
    vectors_dtype = torch.float64 if decomposition == "gram64" else delta.dtype
    return project_gram(delta, tau, gram_dtype=gram_dtype, vectors_dtype=vectors_dtype, linalg=linalg, alpha=alpha,
                        zero_diagonal=zero_diagonal, split_index_base=split_index_base)
