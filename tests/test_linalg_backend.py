"""The linear-algebra backends OPCM's Gram paths run on: the same results from torch and numpy's
OpenBLAS, the per-call thread count, and how ``auto`` and ``HF_MERGE_LINALG`` choose."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_merge.errors import UsageError
from hf_merge.merging.engine import merge_weights as merge
from hf_merge.merging.methods import linalg_backend
from hf_merge.merging.methods.linalg_backend import Linalg, resolve
from hf_merge.merging.methods.opcm import OPCM

TORCH, OPENBLAS = Linalg("torch"), Linalg("openblas")


def operands(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(96, 40, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(40, 72, generator=g, dtype=torch.float64).to(dtype)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_agree_with_torch_on_views_and_in_place(dtype):
    a, b = operands(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    # plain, transposed and sliced operands: the strides numpy must hand to BLAS, or copy
    for left, right in [(a, b), (b.T, a.T), (a[10:50, 5:30], b[5:30, ::2]), (a.T[:, :40], a[:40])]:
        out = OPENBLAS.mm(left, right)
        assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (left.shape[0], right.shape[1])
        assert torch.allclose(out, left @ right, rtol=tol, atol=tol)
    c = torch.ones(96, 72, dtype=dtype)
    expected = c - a @ b
    result = OPENBLAS.sub_mm_(c, a, b)
    assert result.data_ptr() == c.data_ptr()
    assert torch.allclose(c, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(96, 40), (40, 40), (200, 9)])
def test_lower_gram_and_eigh_agree_with_torch(shape):
    d = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = d.T @ d
    for linalg in (TORCH, OPENBLAS):
        gram = linalg.lower_gram(d)
        lower = torch.tril(torch.ones(shape[1], shape[1], dtype=torch.bool))
        assert torch.allclose(gram[lower], exact[lower], rtol=1e-12, atol=1e-12), linalg.name
        values, vectors = linalg.eigh_lower(gram)
        assert torch.allclose(values, torch.linalg.eigvalsh(exact), rtol=1e-10, atol=1e-10), linalg.name
        assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, exact, atol=1e-9), linalg.name
        assert torch.allclose(vectors.T @ vectors, torch.eye(shape[1], dtype=torch.float64), atol=1e-12)
    # eigh reads the lower triangle only: garbage above it changes nothing
    gram = OPENBLAS.lower_gram(d)
    gram[torch.triu(torch.ones_like(gram, dtype=torch.bool), diagonal=1)] = 1e6
    assert torch.allclose(OPENBLAS.eigh_lower(gram)[0], torch.linalg.eigvalsh(exact), rtol=1e-10, atol=1e-10)


def _local_threads() -> int:
    """OpenBLAS's thread count for the calling thread (setting it returns the previous value)."""
    lib = linalg_backend.numpy_openblas()
    current = lib.openblas_set_num_threads_local(1)
    lib.openblas_set_num_threads_local(current)
    return current


def test_each_call_runs_on_torchs_thread_count_for_its_own_thread_only():
    seen = {}
    real = np.matmul

    def spy(*args, **kwargs):
        seen[threading.current_thread().name] = _local_threads()
        return real(*args, **kwargs)

    before = torch.get_num_threads()
    outside = _local_threads()
    a, b = operands(torch.float32)
    try:
        np.matmul = spy  # the backend looks numpy's matmul up at each call
        torch.set_num_threads(1)
        OPENBLAS.mm(a, b)  # a merge worker: single-threaded
        torch.set_num_threads(2)
        worker = threading.Thread(target=lambda: OPENBLAS.mm(a, b), name="other")
        worker.start()
        worker.join()
    finally:
        np.matmul = real
        torch.set_num_threads(before)
    assert seen == {threading.current_thread().name: 1, "other": 2}
    assert _local_threads() == outside  # restored afterwards


def test_environment_variable_and_auto_choose_the_backend(monkeypatch):
    monkeypatch.setenv("HF_MERGE_LINALG", "torch")
    assert resolve() == TORCH
    monkeypatch.setenv("HF_MERGE_LINALG", " OpenBLAS ")
    assert resolve() == OPENBLAS
    assert resolve("torch") == TORCH  # an explicit choice wins over the environment
    monkeypatch.setenv("HF_MERGE_LINALG", "mkl")
    with pytest.raises(UsageError, match="HF_MERGE_LINALG must be one of auto, torch, openblas, got 'mkl'"):
        resolve()
    monkeypatch.delenv("HF_MERGE_LINALG")
    for mkl, intel, expected in [(True, False, OPENBLAS), (True, True, TORCH), (False, False, TORCH)]:
        monkeypatch.setattr(linalg_backend, "torch_blas_is_mkl", lambda mkl=mkl: mkl)
        monkeypatch.setattr(linalg_backend, "intel_cpu", lambda intel=intel: intel)
        assert resolve() == expected, (mkl, intel)


def test_openblas_without_per_thread_control_is_refused_or_avoided(monkeypatch):
    monkeypatch.setattr(linalg_backend, "numpy_openblas", lambda: None)
    monkeypatch.setattr(linalg_backend, "torch_blas_is_mkl", lambda: True)
    monkeypatch.setattr(linalg_backend, "intel_cpu", lambda: False)
    monkeypatch.delenv("HF_MERGE_LINALG", raising=False)
    assert resolve() == TORCH
    with pytest.raises(UsageError, match="unset it to let hf-merge choose"):
        resolve("openblas")


def test_numpys_openblas_is_found_here():
    """The wheels this project installs carry it; without it ``auto`` would quietly fall back."""
    assert linalg_backend.numpy_openblas() is not None


def test_a_merge_gives_the_same_weights_on_both_backends(tiny_base, tiny_experts, tmp_path, monkeypatch):
    merged = {}
    for name in ("torch", "openblas"):
        monkeypatch.setenv("HF_MERGE_LINALG", name)
        assert OPCM().linalg.name == name
        for dtype in ("float64", "float32"):
            out = tmp_path / f"{name}-{dtype}"
            merge(tiny_base, tiny_experts[:4], "opcm", out, svd_dtype=dtype)
            merged[name, dtype] = load_file(str(out / "model.safetensors"))
    for dtype, tol in (("float64", 1e-6), ("float32", 1e-4)):
        a, b = merged["torch", dtype], merged["openblas", dtype]
        assert a.keys() == b.keys()
        worst = max(float((a[n].double() - b[n].double()).abs().max()) for n in a)
        assert worst < tol, (dtype, worst)
    # the merge did move the vision weights, so agreeing is not agreeing on the base
    base = load_file(str(tiny_base / "model.safetensors"))
    name = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert float((merged["openblas", "float32"][name] - base[name]).abs().max()) > 1e-3
