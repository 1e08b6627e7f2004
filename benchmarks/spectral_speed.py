"""Iso-C's and TSV-M's decompositions: ``torch.linalg.svd`` against the Gram path (spectral.py).

In one process on one thread (``torch.set_num_threads(1)``, as each of the merge's workers runs),
at ViT-B/32's sizes (768×768 attention projections, 3072×768 ``fc1``, 768×3072 ``fc2``, float32):
the reference's SVD formula and :mod:`hf_merge.merging.methods.spectral` for Iso-C's ``isotropic``,
the polar factor, TSV-M's leading triplets (k = 96: 8 experts, k = 384: 2) and TSV-M's product of
two polar factors (8 experts' triplets, as written at a step); OPCM's projection (``svd`` and its
default ``gram_mixed``) is timed alongside, for the per-step comparison. Each time is the fastest of
3 (``--repeat``); the Gram path is checked to have been taken (no SVD call).

Accuracy, on the same matrices: the largest absolute difference to a float64 SVD of the same
float32 matrix, for the Gram path and for the reference's float32 SVD (for the triplets: of
``U_k S_k V_kᵀ``, which is sign-free). The matrices are task-vector-like: a rank-8 part plus dense
noise, every singular value resolved. Two more rows time and measure the variant spectral.py does
not take: ``G^{-1/2}`` and its product with the matrix formed in float32.

Results: a table on stdout and ``benchmarks/results/spectral_speed.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from merge_speed import cpu_model  # beside this script: the parent imports only the standard library

from hf_merge.merging.methods import linalg_backend, spectral
from hf_merge.merging.methods.opcm_linalg import project_task_vector

HERE = Path(__file__).resolve().parent
SHAPES = ((768, 768), (3072, 768), (768, 3072))
LAYER = {(768, 768): 4, (3072, 768): 1, (768, 3072): 1}  # matrices of each shape in a ViT-B/32 layer
EXPERTS = 8  # TSV-M's product: k = 768 / 8 = 96 triplets per expert


def task_vector(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A rank-8 part plus dense noise at 1/10 of its norm (float32)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    low = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)
    return low / low.norm() + 0.1 * torch.randn(m, n, generator=g) / (m * n) ** 0.5


def fastest(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def svd_polar(matrix: torch.Tensor, flat: bool = False) -> torch.Tensor:
    """The reference's formula: ``u vh`` (``mean(S) · u vh``) of ``torch.linalg.svd``."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u * s.mean()) if flat else u) @ vh


def polar_float32_products(matrix: torch.Tensor, linalg: linalg_backend.Linalg, flat: bool = False) -> torch.Tensor:
    """The variant spectral.py does not take: Gram and eigh in float64 as there, ``G^{-1/2}`` and
    its product with the matrix in float32 (as OPCM's ``gram_mixed`` forms U)."""
    wide = matrix.shape[0] <= matrix.shape[1]
    exact = matrix.double()
    squares, vectors = spectral.gram_eigh(exact if wide else exact.T, linalg)
    s = squares.sqrt()
    scale = s.mean() if flat else s.new_ones(())
    root = linalg.mm(vectors * (scale / s), vectors.T).float()
    return linalg.mm(root, matrix) if wide else linalg.mm(matrix, root)


def svd_triplets(tau: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return torch.cat([u[:, :k], s[None, :k], vh[:k].T])


def low_rank(block: torch.Tensor, m: int) -> torch.Tensor:
    """``U_k S_k V_kᵀ`` of a stacked triplet block (sign-free), in float64."""
    b = block.double()
    return (b[:m] * b[m]) @ b[m + 1:].T


def tsv_factors(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_cat, S_cat, V_cat of EXPERTS task vectors' leading triplets (their float32 SVDs)."""
    m, n = shape
    r = min(shape)
    k = r // EXPERTS
    blocks = [svd_triplets(task_vector(shape, 100 + i), k) for i in range(EXPERTS)]
    stacked = torch.cat(blocks, dim=1)
    return stacked[:m].contiguous(), stacked[m].contiguous(), stacked[m + 1:].contiguous()


def measure(shape: tuple[int, int], linalg: linalg_backend.Linalg, repeat: int) -> list[dict]:
    """Rows ``{op, svd, gram, err_gram, err_svd32}`` for one shape."""
    m, _ = shape
    tau = task_vector(shape, 1)
    delta = task_vector(shape, 2)
    u_cat, s_cat, v_cat = tsv_factors(shape)
    exact_tau = tau.double()
    ops: list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor],
                    torch.Tensor]] = [
        ("isotropic (Iso-C)", lambda: svd_polar(tau, True), lambda: spectral.isotropic(tau, linalg),
         lambda x: x.double(), svd_polar(exact_tau, True)),
        ("polar factor", lambda: svd_polar(tau), lambda: spectral.polar(tau, linalg),
         lambda x: x.double(), svd_polar(exact_tau)),
        ("isotropic, float32 products (not taken)", lambda: svd_polar(tau, True),
         lambda: polar_float32_products(tau, linalg, True), lambda x: x.double(), svd_polar(exact_tau, True)),
        ("polar factor, float32 products (not taken)", lambda: svd_polar(tau),
         lambda: polar_float32_products(tau, linalg), lambda x: x.double(), svd_polar(exact_tau)),
    ]
    for k in (96, 384):
        ops.append((f"leading triplets k={k} (TSV-M)", lambda k=k: svd_triplets(tau, k),
                    lambda k=k: spectral.leading_triplets(tau, k, linalg), lambda x: low_rank(x, m),
                    low_rank(svd_triplets(exact_tau, k), m)))
    ops.append((f"polar(U_cat)·S·polar(V_catᵀ), {EXPERTS} experts (TSV-M)",
                lambda: (svd_polar(u_cat) * s_cat) @ svd_polar(v_cat.T),
                lambda: spectral.polar_product(u_cat, s_cat, v_cat, linalg), lambda x: x.double(),
                (svd_polar(u_cat.double()) * s_cat.double()) @ svd_polar(v_cat.T.double())))
    rows = []
    real_svd = spectral.svd

    def refuse(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise AssertionError(f"the Gram path fell back to the SVD on {tuple(matrix.shape)}")

    for op, by_svd, by_gram, compare, exact in ops:
        spectral.svd = refuse  # the timed Gram path must not fall back
        try:
            gram_time = fastest(by_gram, repeat)
            gram_result = by_gram()
        finally:
            spectral.svd = real_svd
        svd_time = fastest(by_svd, repeat)
        rows.append({"shape": shape, "op": op, "svd": svd_time, "gram": gram_time,
                     "err_gram": float((compare(gram_result) - exact).abs().max()),
                     "err_svd32": float((compare(by_svd()) - exact).abs().max())})
    projections = {d: fastest(lambda d=d: project_task_vector(delta, tau, decomposition=d, linalg=linalg), repeat)
                   for d in ("svd", "gram_mixed")}
    rows.append({"shape": shape, "op": "OPCM projection (svd / gram_mixed)", "svd": projections["svd"],
                 "gram": projections["gram_mixed"], "err_gram": None, "err_svd32": None})
    return rows


def per_step(rows: list[dict]) -> list[str]:
    """One ViT-B/32 layer's decompositions per step, by method, from the rows' times."""
    def total(op: str, column: str) -> float:
        return sum(LAYER[r["shape"]] * r[column] for r in rows if r["op"] == op)

    opcm = total("OPCM projection (svd / gram_mixed)", "gram")
    tsv_product = f"polar(U_cat)·S·polar(V_catᵀ), {EXPERTS} experts (TSV-M)"
    lines = ["| per ViT-B/32 layer (4 × 768², fc1, fc2) | SVD s | Gram s | SVD / Gram | Gram / OPCM gram_mixed |",
             "|---|---|---|---|---|"]
    for label, parts in (
        ("Iso-C, a written step (isotropic)", ["isotropic (Iso-C)"]),
        ("TSV-M, a step: leading triplets k=96", ["leading triplets k=96 (TSV-M)"]),
        ("TSV-M, a written step: triplets k=96 + polar product", ["leading triplets k=96 (TSV-M)", tsv_product]),
        ("OPCM, a step (its projection)", ["OPCM projection (svd / gram_mixed)"]),
    ):
        svd_s, gram_s = sum(total(p, "svd") for p in parts), sum(total(p, "gram") for p in parts)
        lines.append(f"| {label} | {svd_s:.3f} | {gram_s:.3f} | {svd_s / gram_s:.2f} | {gram_s / opcm:.2f} |")
    return lines


def render(rows: list[dict], linalg: linalg_backend.Linalg, repeat: int) -> str:
    lines = [
        "# Iso-C / TSV-M decompositions: SVD against the Gram path",
        "",
        f"Machine: {platform.machine()} ({cpu_model()}), {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"(1 thread, BLAS {'MKL' if linalg_backend.torch_blas_is_mkl() else 'not MKL'}); the Gram path's "
        f"products and eigh on `{linalg.name}`. One process, fastest of {repeat}; float32 inputs. "
        "Produced by `benchmarks/spectral_speed.py`.",
        "",
        "err = max |result − float64 SVD result| on the same float32 matrix (triplets: of U_k S_k V_kᵀ). "
        "The OPCM rows time `project_task_vector` with `decomposition=svd` (SVD column) and its "
        "default `gram_mixed` (Gram column).",
        "",
        "| shape | operation | SVD s | Gram s | SVD / Gram | err Gram | err float32 SVD |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errs = ("-", "-") if r["err_gram"] is None else (f"{r['err_gram']:.1e}", f"{r['err_svd32']:.1e}")
        lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['op']} | {r['svd']:.3f} | {r['gram']:.3f} | "
                     f"{r['svd'] / r['gram']:.2f} | {errs[0]} | {errs[1]} |")
    lines += ["", *per_step(rows), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="time each operation this many times, keep the fastest")
    parser.add_argument("--linalg", default=None, help="torch, openblas or auto (default: HF_MERGE_LINALG, else auto)")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "spectral_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    linalg = linalg_backend.resolve(args.linalg)
    rows = [row for shape in SHAPES for row in measure(shape, linalg, max(args.repeat, 1))]
    text = render(rows, linalg, max(args.repeat, 1))
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
