"""The all-at-once methods (Iso-CTS, WUDI) against dense references written here from FusionBench's
code, and the engine's all-at-once path: one tensor per expert resident, the lineage of every expert,
no continuation.

The references hold every task vector in memory and follow ``iso_utils.py: iso_cts`` and
``wudi.py: wudi_merging`` line by line (zero-filled factor matrices and slice assignment; the loss
through autograd), in float64, so they share no code with the methods.
"""

from __future__ import annotations

import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_merge.errors import CheckpointError, NotContinualError, UsageError
from hf_merge.io.checkpoint import Checkpoint
from hf_merge.merging.engine import ContinualMerger
from hf_merge.merging.engine import merge_weights as merge
from hf_merge.merging.methods import get_method
from hf_merge.merging.methods.iso_cts import subspace_sizes
from hf_merge.merging.methods.wudi import wudi_matrix

N_EXPERTS = 4


def load(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def vision_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, t in state.items()
                  if n.startswith(("vision_model.", "visual_projection.")) and t.is_floating_point())


def task_vectors(base, experts) -> list[dict[str, torch.Tensor]]:
    names = vision_names(base)
    return [{n: e[n].double() - base[n].double() for n in names} for e in experts]


# -- dense references ----------------------------------------------------------------------------
def iso_cts_reference(tvs: list[dict[str, torch.Tensor]], fraction: float) -> dict[str, torch.Tensor]:
    """``iso_cts`` as FusionBench writes it (iso_utils.py lines 49-162)."""
    out = {}
    for key in tvs[0]:
        shape = tvs[0][key].shape
        if len(shape) != 2:
            for i, tv in enumerate(tvs):
                out[key] = tv[key].clone() if i == 0 else out[key] + (tv[key] - out[key]) / (i + 1)
            continue
        combined = sum(tv[key] for tv in tvs)
        common = int(min(shape) * fraction)
        total = round((min(shape) - common) / len(tvs)) * len(tvs)
        common = min(shape) - total
        u, s, v = torch.linalg.svd(combined, full_matrices=False)
        cu, cs, cv = u[:, :common], s[:common], v[:common, :]
        per = int((min(shape) - common) / len(tvs))
        for i, tv in enumerate(tvs):
            w = tv[key]
            u_ts, s_ts, v_ts = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
            if i == 0:
                U, S, V = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
            U[:, i * per:(i + 1) * per] = u_ts[:, :per]
            S[i * per:(i + 1) * per] = s_ts[:per]
            V[i * per:(i + 1) * per, :] = v_ts[:per, :]
        end = len(tvs) * per
        U[:, end:end + common], S[end:end + common], V[end:end + common, :] = cu, cs, cv
        a, _, b = torch.linalg.svd(U, full_matrices=False)
        c, _, d = torch.linalg.svd(V, full_matrices=False)
        S = torch.ones_like(S) * S.mean()
        out[key] = torch.linalg.multi_dot((a @ b, torch.diag(S), c @ d))
    return out


def wudi_reference_matrix(taus: list[torch.Tensor], iterations: int, lr: float = 1e-5) -> torch.Tensor:
    """One matrix of ``wudi_merging`` (wudi.py lines 30-54): autograd through the T×m×m products."""
    tvs = torch.stack(taus)
    merged = torch.nn.Parameter(torch.sum(tvs, dim=0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    l2_norms = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
    for _ in range(iterations):
        product = torch.matmul(merged.unsqueeze(0) - tvs, tvs.transpose(1, 2))
        loss = torch.sum(torch.square(product) / l2_norms.unsqueeze(-1).unsqueeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


def wudi_reference(tvs: list[dict[str, torch.Tensor]], iterations: int) -> dict[str, torch.Tensor]:
    return {key: wudi_reference_matrix([tv[key] for tv in tvs], iterations) if tvs[0][key].dim() == 2
            else sum(tv[key] for tv in tvs) / len(tvs) for key in tvs[0]}


@pytest.fixture(scope="module")
def models(tiny_base, tiny_experts):
    return load(tiny_base), [load(e) for e in tiny_experts[:N_EXPERTS]]


# -- Iso-CTS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fraction", "scaling"), [(0.8, 1.0), (0.5, 1.5)])
def test_iso_cts_matches_the_dense_reference(fraction, scaling, tiny_base, tiny_experts, models, tmp_path):
    base, experts = models
    merge(tiny_base, tiny_experts[:N_EXPERTS], "iso_cts", tmp_path / "out", compute_dtype="float64",
          common_space_fraction=fraction, scaling_factor=scaling)
    reference = iso_cts_reference(task_vectors(base, experts), fraction)
    merged = load(tmp_path / "out")
    matrices = [n for n in reference if reference[n].dim() == 2]
    assert "vision_model.embeddings.position_embedding.weight" in matrices and len(matrices) > 8
    for name, result in reference.items():
        expected = base[name].double() + scaling * result
        # float64 arithmetic, stored in the checkpoint's float32: a few float32 ulps
        assert torch.allclose(merged[name].double(), expected, atol=2e-7, rtol=0), name
        assert not torch.equal(merged[name], base[name]), name


def test_iso_cts_subspace_sizes_round_as_the_reference():
    # ViT-B/32: 768x768 with 8 experts keeps 616 common directions and 19 per task; the 50x768
    # position embedding 42 and 1; with 20 experts round(0.5) is 0 (ties to even), so all 50 common.
    assert subspace_sizes((768, 768), 8, 0.8) == (616, 19)
    assert subspace_sizes((3072, 768), 8, 0.8) == (616, 19)
    assert subspace_sizes((50, 768), 8, 0.8) == (42, 1)
    assert subspace_sizes((50, 768), 20, 0.8) == (50, 0)
    assert subspace_sizes((17, 32), 3, 0.0)[0] == -1  # where the reference fails on a shape


def test_iso_cts_refuses_a_fraction_that_leaves_no_common_space(tiny_base, tiny_experts, tmp_path):
    with pytest.raises(UsageError, match=r"common_space_fraction 0 with 3 experts leaves no common subspace .*raise"):
        merge(tiny_base, tiny_experts[:3], "iso_cts", tmp_path / "out", common_space_fraction=0.0)
    assert not (tmp_path / "out" / "merge_state.json").exists()


def test_iso_cts_takes_float64_where_float32_svd_does_not_converge(monkeypatch):
    from hf_merge.merging.methods import iso_cts

    generator = torch.Generator().manual_seed(3)
    taus = [torch.randn(12, 9, generator=generator) for _ in range(3)]
    expected = iso_cts.iso_cts_matrix([t.double() for t in taus], 0.5)
    real = torch.linalg.svd

    def float32_fails(matrix, full_matrices=True):
        if matrix.dtype == torch.float32:  # as LAPACK's gesdd did on a 768x768 factor matrix
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    result = iso_cts.iso_cts_matrix(taus, 0.5)
    assert result.dtype == torch.float32
    assert torch.allclose(result.double(), expected, atol=1e-5, rtol=0)


# -- WUDI ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (3, 40), (7, 7)])  # tall, wide, very wide (S rows), square
@pytest.mark.parametrize("lr", [1e-5, 1e-3])
def test_wudi_gram_form_gives_the_reference_iterates(shape, lr):
    generator = torch.Generator().manual_seed(sum(shape))
    taus = [torch.randn(*shape, generator=generator, dtype=torch.float64) * (i + 1) for i in range(3)]
    start = sum(taus)
    for iterations in (1, 2, 25):
        ours = wudi_matrix(taus, iterations, lr=lr) - start
        reference = wudi_reference_matrix(taus, iterations, lr=lr) - start
        # Adam moves each entry by about lr per step: the corrections are compared, not the sums
        assert reference.abs().max() > 0.5 * lr * iterations
        assert torch.allclose(ours, reference, rtol=1e-9, atol=1e-9 * lr * iterations), (shape, iterations)


def test_wudi_leaves_out_a_zero_task_vector_where_the_reference_returns_nan():
    generator = torch.Generator().manual_seed(0)
    taus = [torch.randn(6, 4, generator=generator, dtype=torch.float64) for _ in range(2)]
    zero = torch.zeros(6, 4, dtype=torch.float64)
    assert torch.isnan(wudi_reference_matrix([*taus, zero], 3)).all()
    assert torch.allclose(wudi_matrix([*taus, zero], 3), wudi_reference_matrix(taus, 3), rtol=1e-12, atol=1e-15)


def test_wudi_matches_the_dense_reference(tiny_base, tiny_experts, models, tmp_path):
    base, experts = models
    iterations = 30
    merge(tiny_base, tiny_experts[:N_EXPERTS], "wudi", tmp_path / "out", compute_dtype="float64", iter_num=iterations)
    tvs = task_vectors(base, experts)
    reference = wudi_reference(tvs, iterations)
    merged = load(tmp_path / "out")
    for name, result in reference.items():
        if result.dim() == 2:
            start = sum(tv[name] for tv in tvs)
            correction = merged[name].double() - base[name].double() - start
            expected = result - start
            assert expected.abs().max() > 1e-4  # 30 steps of lr 1e-5 moved it
            # float32 storage of weights of magnitude < 1: within 1e-7, 0.1 % of the correction
            assert torch.allclose(correction, expected, atol=1e-7, rtol=0), name
        else:  # the mean of the task vectors, no scaling
            assert torch.allclose(merged[name].double(), base[name].double() + result, atol=2e-7, rtol=0), name


def test_wudi_float32_is_close_to_float64(tiny_base, tiny_experts, tmp_path):
    merge(tiny_base, tiny_experts[:3], "wudi", tmp_path / "64", compute_dtype="float64", iter_num=20)
    merge(tiny_base, tiny_experts[:3], "wudi", tmp_path / "32", iter_num=20)
    a, b = load(tmp_path / "64"), load(tmp_path / "32")
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 5e-6


# -- parameters --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "values", "message"), [
    ("iso_cts", {"common_space_fraction": 1.5}, "method 'iso_cts': parameter 'common_space_fraction' must be in [0, 1], got 1.5"),
    ("iso_cts", {"scaling_factor": -1}, "method 'iso_cts': parameter 'scaling_factor' must be in [0, inf), got -1"),
    ("wudi", {"iter_num": 2.5}, "method 'wudi': parameter 'iter_num' must be an integer in [0, inf), got 2.5"),
    ("wudi", {"iter_num": -3}, "method 'wudi': parameter 'iter_num' must be in [0, inf), got -3"),
])
def test_parameters_out_of_range_are_one_line_errors(method, values, message):
    with pytest.raises(UsageError) as error:
        get_method(method)(**values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_declared_defaults_are_the_references():
    assert get_method("iso_cts").defaults == {"scaling_factor": 1.0, "common_space_fraction": 0.8}
    assert get_method("wudi").defaults == {"iter_num": 400}
    assert not get_method("iso_cts").continual and not get_method("wudi").continual


# -- the engine's all-at-once path ----------------------------------------------------------------------
def test_each_name_reads_one_tensor_per_expert_and_frees_them_before_the_next(tiny_base, tiny_experts, monkeypatch, tmp_path):
    experts = {str(p.resolve()) for p in tiny_experts[:N_EXPERTS]}
    live: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
    reads: list[tuple[str, str]] = []
    peak = [0]
    original = Checkpoint.get

    def counting_get(self, name, out=None):
        tensor = original(self, name, out)
        if str(self.path.resolve()) in experts and out is None:
            live.add(tensor)
            reads.append((str(self.path), name))
            peak[0] = max(peak[0], len(live))
        return tensor

    monkeypatch.setattr(Checkpoint, "get", counting_get)
    merge(tiny_base, tiny_experts[:N_EXPERTS], "wudi", tmp_path / "out", iter_num=2)
    names = list(dict.fromkeys(name for _, name in reads))
    assert len(reads) == len(names) * N_EXPERTS  # each tensor of each expert read once
    # per name, every expert's tensor, then the next name: never a whole expert model
    assert [name for _, name in reads] == [name for name in names for _ in range(N_EXPERTS)]
    assert peak[0] == N_EXPERTS


def test_state_records_every_expert_and_the_merge_cannot_be_continued(tiny_base, tiny_experts, tmp_path):
    result = merge(tiny_base, tiny_experts[:3], "iso_cts", tmp_path / "out")
    state = result.state
    assert state.method == "iso_cts" and state.step == 3
    assert [entry["step"] for entry in state.lineage] == [1, 2, 3]
    assert [entry["name"] for entry in state.lineage] == [str(p.resolve()) for p in tiny_experts[:3]]
    assert [s.step for s in result.steps] == [1, 2, 3]
    assert result.timings["seconds_per_expert"] > 0
    with ContinualMerger.resume(tmp_path / "out") as merger, \
            pytest.raises(NotContinualError, match="re-run `hf-merge merge` with all the experts"):
        merger.add(tiny_experts[3])
    assert load(tmp_path / "out").keys() == load(tiny_base).keys()


def test_a_nan_expert_fails_the_merge_and_writes_nothing(tiny_base, tiny_experts, tmp_path):
    bad = tmp_path / "nan-expert"
    shutil.copytree(tiny_experts[1], bad)
    tensors = load(bad)
    name = "vision_model.encoder.layers.1.mlp.fc2.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name):
        merge(tiny_base, [tiny_experts[0], bad, tiny_experts[2]], "iso_cts", tmp_path / "out")
    assert not (tmp_path / "out" / "merge_state.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors"))
