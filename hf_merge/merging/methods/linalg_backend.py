"""Where OPCM's matrix products and symmetric eigendecompositions run: torch, or numpy's OpenBLAS.

torch's CPU wheels do their BLAS and LAPACK through MKL, which takes slower code paths on CPUs that
are not Intel's: on an AMD EPYC, a 768×768 float64 ``eigh`` took 0.084 s through MKL and 0.053-0.072 s
through the OpenBLAS that numpy's wheels carry, whose ``syrk`` also builds a Gram matrix in half the
products (23 ms against 41 ms for 3072×768 in float64); plain matrix products were 10-15 % faster
(see the README's benchmark). Both compute the same thing to rounding, so the choice is one of speed
only:

- ``"torch"``: torch's own operations, on any device.
- ``"openblas"``: numpy's bundled OpenBLAS, for CPU tensors (others fall back to torch). Each call
  runs on as many threads as torch's intra-op pool has at that moment, set for the calling thread
  only (``openblas_set_num_threads_local``), so the merge's single-threaded workers stay single
  threaded and do not oversubscribe the cores.
- ``"auto"`` (default): ``"openblas"`` where torch's BLAS is MKL, the CPU is not an Intel one and
  numpy carries an OpenBLAS with per-thread control; ``"torch"`` everywhere else.

``HF_MERGE_LINALG`` chooses for the whole process; the choice never changes merged weights beyond
float rounding and is not part of a merge's recipe.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from hf_merge.errors import UsageError

BACKENDS = ("auto", "torch", "openblas")
ENV_VAR = "HF_MERGE_LINALG"
_GRAM_BLOCKS = 4


@dataclass(frozen=True)
class Linalg:
    """The operations OPCM's projection spends its time in, on one backend.

    Attributes:
        name: ``"torch"`` or ``"openblas"``.
    """

    name: str = "torch"

    def _on_openblas(self, *tensors: torch.Tensor) -> bool:
        return self.name == "openblas" and all(t.device.type == "cpu" for t in tensors)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` for 2-D tensors of one dtype."""
        if not self._on_openblas(a, b):
            return a @ b
        with _threads_for_this_call():
            return torch.from_numpy(numpy.matmul(a.numpy(), b.numpy()))

    def sub_mm_(self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``c -= a @ b`` in place; returns ``c``."""
        if not self._on_openblas(a, b, c):
            return c.addmm_(a, b, alpha=-1)
        return c.sub_(self.mm(a, b))

    def lower_gram(self, d: torch.Tensor) -> torch.Tensor:
        """DᵀD with at least its lower triangle filled (what :meth:`eigh_lower` reads).

        OpenBLAS gets ``dᵀ @ d`` whole, which numpy hands to ``syrk`` (half the products); torch
        has no such call, so it builds the lower triangle one block column at a time (5/8)."""
        if self._on_openblas(d):
            return self.mm(d.T, d)
        n = d.shape[1]
        gram = torch.zeros(n, n, dtype=d.dtype, device=d.device)
        edges = [n * i // _GRAM_BLOCKS for i in range(_GRAM_BLOCKS + 1)]
        for lo, hi in zip(edges, edges[1:], strict=False):
            if hi > lo:
                gram[lo:, lo:hi] = d[:, lo:].T @ d[:, lo:hi]
        return gram

    def eigh_lower(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors of a symmetric matrix given by its lower
        triangle (the upper one is not read)."""
        if not self._on_openblas(gram):
            return torch.linalg.eigh(gram, UPLO="L")
        with _threads_for_this_call():
            values, vectors = numpy.linalg.eigh(gram.numpy(), UPLO="L")
        return torch.from_numpy(values), torch.from_numpy(vectors)


def resolve(choice: str | None = None) -> Linalg:
    """The backend for ``choice`` (default: ``HF_MERGE_LINALG``, else ``"auto"``)."""
    choice = (choice or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice not in BACKENDS:
        raise UsageError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "openblas" and numpy_openblas() is None:
        raise UsageError(
            f"{ENV_VAR}=openblas, but numpy here does not carry an OpenBLAS with per-thread control "
            "(numpy >= 2 wheels do); unset it to let hf-merge choose"
        )
    if choice == "auto":
        choice = "openblas" if numpy_openblas() is not None and torch_blas_is_mkl() and not intel_cpu() else "torch"
    return Linalg(choice)


@functools.cache
def torch_blas_is_mkl() -> bool:
    """Whether torch's CPU matrix products go through MKL."""
    return "BLAS_INFO=mkl" in torch.__config__.show()


@functools.cache
def intel_cpu() -> bool:
    """Whether this CPU is an Intel one (MKL's fast paths are for those)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return "GenuineIntel" in line
    except OSError:
        pass
    return "intel" in platform.processor().lower()


@functools.cache
def numpy_openblas() -> ctypes.CDLL | None:
    """numpy's bundled OpenBLAS, if it has ``openblas_set_num_threads_local`` (OpenBLAS 0.3.27+)."""
    try:
        config = numpy.show_config(mode="dicts")
    except Exception:  # numpy before 1.26 has no such mode, and carries no per-thread control either
        return None
    blas = config.get("Build Dependencies", {}).get("blas", {})
    if "openblas" not in str(blas.get("name", "")).lower():
        return None
    package = Path(numpy.__file__).resolve().parent
    # where numpy's wheels put the library they bundle: numpy.libs (Linux, Windows), .dylibs (macOS)
    found = [lib for folder in (package.parent / "numpy.libs", package / ".dylibs") if folder.is_dir()
             for lib in sorted(folder.glob("*openblas*"))]
    for candidate in found:
        try:
            lib = ctypes.CDLL(str(candidate))
            setter = lib.openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return lib
    return None


class _threads_for_this_call:
    """OpenBLAS on the calling thread at torch's current thread count, restored after."""

    def __enter__(self) -> None:
        lib = numpy_openblas()
        if lib is None:  # only used once numpy's OpenBLAS was found
            raise RuntimeError("numpy's OpenBLAS is not available")
        self._lib = lib
        self._before = self._lib.openblas_set_num_threads_local(max(torch.get_num_threads(), 1))

    def __exit__(self, *exc: object) -> None:
        self._lib.openblas_set_num_threads_local(self._before)
