"""Iso-C and TSV-M, continual, against all-at-once dense references written here.

The references follow FusionBench's code (``isotropic_merging/iso_utils.py: iso_c`` and
``task_singular_vector/utils/TSVM_utils.py: compute_and_sum_svd_mem_reduction``) literally, on
whole state dicts in float64: every task vector in memory, the zero-padded concatenation, the polar
factors by SVD. They share no code with the methods. After every step t the continual method's
result must equal the reference on the first t experts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hf_merge.merging.engine import ContinualMerger
from hf_merge.merging.engine import merge_weights as merge
from hf_merge.merging.state import MergeState
from hf_merge.testing.processes import sigkill_when

STEPS = 4
# float64 compute: the largest absolute difference of the continual merged task vector (before it
# is stored) to the float64 reference; measured 0 for Iso-C and 1.4e-17 for TSV-M over the 4 steps.
EXACT = 1e-10
# float32 compute: the largest absolute difference of the written weights to the float64 reference,
# measured over the 4 steps: Iso-C 6.0e-8 (the float32 rounding of the output itself), TSV-M 4.1e-7
# (its float32 SVDs); the bound leaves about 5x.
FLOAT32 = 2e-6


def load(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def merged_names(base: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, t in base.items()
                  if n.startswith(("vision_model.", "visual_projection.")) and t.is_floating_point())


def task_vectors(base, experts) -> list[dict[str, torch.Tensor]]:
    names = merged_names(base)
    return [{n: e[n].double() - base[n].double() for n in names} for e in experts]


# -- dense references (all experts at once) ------------------------------------------------------
def iso_c_reference(tvs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``iso_c``: mean of the τ_i; for 2-D tensors the sum's SVD with every value set to the mean."""
    out = {}
    for key in tvs[0]:
        total = sum(tv[key] for tv in tvs) / len(tvs)
        if total.dim() == 2:
            u, s, vh = torch.linalg.svd(total * len(tvs), full_matrices=False)
            total = u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh
        out[key] = total
    return out


def tsv_m_reference(tvs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``compute_and_sum_svd_mem_reduction``: each τ_i's first int(r·(1/T)) triplets in zero-padded
    blocks, U and Vᵀ replaced by their polar factors; the mean of τ_i for other tensors."""
    out = {}
    count = len(tvs)
    for key in tvs[0]:
        if tvs[0][key].dim() != 2:
            out[key] = sum(tv[key] for tv in tvs) / count
            continue
        m, n = tvs[0][key].shape
        r = min(m, n)
        k = int(r * (1 / count))
        u_cat, s_cat, vh_cat = torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64), torch.zeros(r, n, dtype=torch.float64)
        for i, tv in enumerate(tvs):
            u, s, vh = torch.linalg.svd(tv[key], full_matrices=False)
            u_cat[:, i * k:(i + 1) * k] = u[:, :k]
            s_cat[i * k:(i + 1) * k] = s[:k]
            vh_cat[i * k:(i + 1) * k, :] = vh[:k, :]
        uu, _, uvh = torch.linalg.svd(u_cat, full_matrices=False)
        vu, _, vvh = torch.linalg.svd(vh_cat, full_matrices=False)
        out[key] = uu @ uvh @ torch.diag(s_cat) @ vu @ vvh
    return out


REFERENCES = {"iso_c": iso_c_reference, "tsv_m": tsv_m_reference}


def reference_weights(base, experts, method: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    result = REFERENCES[method](task_vectors(base, experts))
    return {n: base[n].double() + scale * tv for n, tv in result.items()}


@pytest.fixture(scope="module")
def models(tiny_base, tiny_experts):
    return load(tiny_base), [load(e) for e in tiny_experts[:STEPS]]


def max_abs(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(expected)
    return max(float((got[n].double() - expected[n]).abs().max()) for n in expected)


# -- the continual result equals the all-at-once one after every step ------------------------------
@pytest.mark.parametrize("method", ["iso_c", "tsv_m"])
def test_float64_continual_equals_all_at_once_after_every_step(method, tiny_base, tiny_experts, models, tmp_path):
    base, experts = models
    with ContinualMerger(tiny_base, tmp_path / "out", method, compute_dtype="float64", checkpoint_every=1) as merger:
        for t in range(1, STEPS + 1):
            merger.add(tiny_experts[t - 1])
            expected = REFERENCES[method](task_vectors(base, experts[:t]))
            got = {n: merger.method.merged_task_vector(n) for n in merger.names}
            assert got[next(iter(got))].dtype == torch.float64
            assert max_abs(got, expected) < EXACT, t
            # the written step is the float64 result rounded to the base's float32
            written = load(tmp_path / "out")
            assert max_abs({n: written[n] for n in expected}, reference_weights(base, experts[:t], method)) < 1e-6, t


@pytest.mark.parametrize("method", ["iso_c", "tsv_m"])
def test_float32_continual_is_within_the_measured_bound_after_every_step(method, tiny_base, tiny_experts, models, tmp_path):
    base, experts = models
    seen = []

    def on_step(step, output_dir, state):
        written = load(output_dir)
        expected = reference_weights(base, experts[:step], method)
        seen.append(max_abs({n: written[n] for n in expected}, expected))

    merge(tiny_base, tiny_experts[:STEPS], method, tmp_path / "out", on_step=on_step)
    assert len(seen) == STEPS
    assert max(seen) < FLOAT32, seen


@pytest.mark.parametrize("method", ["iso_c", "tsv_m"])
def test_scaling_factor_scales_the_merged_task_vector(method, tiny_base, tiny_experts, models, tmp_path):
    base, experts = models
    merge(tiny_base, tiny_experts[:3], method, tmp_path / "out", compute_dtype="float64", scaling_factor=0.4)
    written = load(tmp_path / "out")
    expected = reference_weights(base, experts[:3], method, scale=0.4)
    assert max_abs({n: written[n] for n in expected}, expected) < 1e-6
    # and it is not the default scale's result
    assert max_abs({n: written[n] for n in expected}, reference_weights(base, experts[:3], method)) > 1e-3


def test_tsv_m_keeps_the_references_rank_per_expert_and_zero_pads_the_rest(tiny_base, tiny_experts, models, tmp_path):
    """r = 17 (the position embedding of 16 patches + the class token) is not a multiple of 3 or 4."""
    base, experts = models
    name = "vision_model.embeddings.position_embedding.weight"
    assert tuple(base[name].shape) == (17, 32)
    with ContinualMerger(tiny_base, tmp_path / "out", "tsv_m", compute_dtype="float64") as merger:
        for t in range(1, STEPS + 1):
            merger.add(tiny_experts[t - 1])
            factors = merger.method.buffer[name]
            assert tuple(factors.shape) == (17 + 1 + 32, 17)
            singular = factors[17]  # the row of kept singular values
            k = int(17 * (1 / t))
            assert k == {1: 17, 2: 8, 3: 5, 4: 4}[t]
            assert not factors[:, t * k:].any()
            for i in range(t):  # block i: the leading k singular values of τ_i, in order
                s = torch.linalg.svdvals(experts[i][name].double() - base[name].double())
                assert torch.allclose(singular[i * k:(i + 1) * k], s[:k], rtol=0, atol=1e-12), (t, i)


# -- resume and continue ----------------------------------------------------------------------------
def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("method", ["iso_c", "tsv_m"])
def test_two_then_resume_two_more_equals_four_at_once(method, tiny_base, tiny_experts, tmp_path):
    clean = merge(tiny_base, tiny_experts[:STEPS], method, tmp_path / "clean").output_dir
    out = tmp_path / "out"
    merger = ContinualMerger(tiny_base, out, method)
    merger.add_all(tiny_experts[:2])
    merger.close()  # the process ends here; only the folder remains
    assert (out / "merge_state.safetensors").is_file()
    resumed = ContinualMerger.resume(out)
    assert resumed.step == 2 and resumed.method.name == method and resumed.method.step_count == 2
    with resumed:
        resumed.add_all(tiny_experts[2:STEPS])
    got, expected = files(out), files(clean)
    assert sorted(got) == sorted(expected)
    for name in expected:
        if name != "merge_state.json":
            assert got[name] == expected[name], name  # weights and the saved state, bit for bit
    left, right = MergeState.load(out), MergeState.load(clean)
    assert (left.step, left.method_state, left.hyperparameters) == (right.step, right.method_state, right.hyperparameters)


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hf_merge.merging.engine import merge_weights as merge
    from hf_merge.merging.methods import tsv_m

    marker, base, out, *experts = sys.argv[1:]
    real = tsv_m.add_block

    def add_block(factors, block, t):
        if t == 3 and factors.shape[0] > 100:  # midway through step 3, some matrices already moved
            Path(marker).write_text("now")
            time.sleep(600)
        return real(factors, block, t)

    tsv_m.add_block = add_block
    merge(base, experts, "tsv_m", out, checkpoint_every=1)
    """
)


@pytest.mark.slow
def test_tsv_m_killed_midway_through_step_three_resumes_to_the_clean_result(tiny_base, tiny_experts, tmp_path):
    clean = merge(tiny_base, tiny_experts[:STEPS], "tsv_m", tmp_path / "clean").output_dir
    out, marker = tmp_path / "out", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(marker), str(tiny_base), str(out),
                              *map(str, tiny_experts[:STEPS])], env=dict(os.environ, HF_HUB_OFFLINE="1"))
    sigkill_when(child, marker, what="step 3")
    assert child.returncode == -signal.SIGKILL
    merger = ContinualMerger.resume(out)
    assert merger.step == 2  # the factors saved with step 2, not the half-moved ones in memory
    with merger:
        merger.add_all(tiny_experts[2:STEPS])
    got, expected = files(out), files(clean)
    for name in expected:
        if name != "merge_state.json":
            assert got[name] == expected[name], name
