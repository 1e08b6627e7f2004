"""The merge driver: output folder, validation of experts, dtypes, sharded inputs, scopes, API."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_merge.errors import CheckpointError, IncompatibleExpertError, MergeStateError, UsageError
from hf_merge.hub.sources import ModelSource
from hf_merge.io.weights_writer import CheckpointWriter
from hf_merge.merging.engine import ContinualMerger
from hf_merge.merging.engine import EngineResult as MergeResult
from hf_merge.merging.engine import merge_weights as merge
from hf_merge.merging.state import MergeState
from hf_merge.testing.tiny_clip import build_tiny_clip


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def clean_three(tiny_base, tiny_experts, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    merge(tiny_base, tiny_experts[:3], "opcm", out)
    return out


def test_output_folder_is_a_loadable_model_with_its_state(tiny_base, tiny_experts, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    steps = []
    result = merge(
        str(tiny_base), [ModelSource.local(tiny_experts[0]), tiny_experts[1]], "opcm", tmp_path / "out",
        alpha=0.4, on_step=lambda step, out, state: steps.append((step, state.step, (out / "merge_state.json").is_file())),
    )
    assert isinstance(result, MergeResult)
    assert steps == [(1, 1, True), (2, 2, True)]
    assert result.timings["seconds_per_expert"] > 0 and len(result.steps) == 2
    out = result.output_dir
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "vocab.json", "merges.txt"):
        assert (out / name).is_file(), name
    state = MergeState.load(out)
    assert state.method == "opcm" and state.step == 2 and state.scope == "vision"
    assert state.hyperparameters["alpha"] == 0.4 and state.hyperparameters["zero_diagonal"] is True
    assert [e["step"] for e in state.lineage] == [1, 2]
    assert state.lineage[0]["name"] == str(tiny_experts[0]) and state.lineage[0]["repo_id"] is None
    assert set(state.method_state) == {"step", "prev_lambda", "norms"} and len(state.method_state["norms"]) == 2
    model = CLIPModel.from_pretrained(out)
    merged = weights(out)
    assert torch.equal(model.vision_model.post_layernorm.weight.detach(), merged["vision_model.post_layernorm.weight"])
    CLIPProcessor.from_pretrained(out)


@pytest.mark.parametrize("defect", ["hidden_size", "architecture", "missing_tensor", "nan", "truncated"])
def test_bad_expert_is_rejected_and_earlier_state_untouched(defect, tiny_base, tiny_experts, clean_three, tmp_path):
    bad = tmp_path / "bad"
    if defect == "hidden_size":
        build_tiny_clip(bad, seed=5, hidden_size=48)
        expected = IncompatibleExpertError, r"tensor '.*' has shape \[.*48.*\].*vision_config.hidden_size is 48 instead of 32"
    else:
        shutil.copytree(tiny_experts[3], bad)
        tensors = load_file(bad / "model.safetensors")
        if defect == "architecture":
            config = json.loads((bad / "config.json").read_text())
            config.update(architectures=["SiglipModel"], model_type="siglip")
            (bad / "config.json").write_text(json.dumps(config))
            expected = IncompatibleExpertError, "is a SiglipModel .*the base is a CLIPModel"
        elif defect == "missing_tensor":
            del tensors["vision_model.post_layernorm.bias"]
            save_file(tensors, bad / "model.safetensors")
            expected = IncompatibleExpertError, "has no tensor 'vision_model.post_layernorm.bias'"
        elif defect == "nan":
            tensors["vision_model.encoder.layers.1.mlp.fc2.weight"][0, 3] = float("nan")
            save_file(tensors, bad / "model.safetensors")
            expected = CheckpointError, "tensor 'vision_model.encoder.layers.1.mlp.fc2.weight' contains NaN"
        else:
            data = (bad / "model.safetensors").read_bytes()
            (bad / "model.safetensors").write_bytes(data[: len(data) - 4096])
            expected = CheckpointError, "truncated: tensor '.*'"
    out = tmp_path / "out"
    merger = ContinualMerger(tiny_base, out, "opcm")
    merger.add_all(tiny_experts[:2])
    before = snapshot(out)
    with pytest.raises(expected[0], match=expected[1]) as caught:
        merger.add(bad)
    assert "\n" not in str(caught.value)
    assert snapshot(out) == before
    merger.add(tiny_experts[2])  # the merger is still usable and its memory was not touched
    assert snapshot(out)["model.safetensors"] == snapshot(clean_three)["model.safetensors"]


@pytest.mark.parametrize("method", ["opcm", "average", "task_arithmetic", "ties", "magmax", "iso_c", "tsv_m", "dop"])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_nan_found_midway_undoes_the_half_done_step(method, first, tiny_base, tiny_experts, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_experts[3], poisoned)
    tensors = load_file(poisoned / "model.safetensors")
    tensors["visual_projection.weight"][1, 2] = float("inf")  # read last: every other tensor is merged by then
    save_file(tensors, poisoned / "model.safetensors")
    reference = merge(tiny_base, tiny_experts[:3], method, tmp_path / "reference").output_dir
    # every step written, so that the spare files of the last write are there to be checked
    with ContinualMerger(tiny_base, tmp_path / "out", method, checkpoint_every=1) as merger:
        merger.add_all(tiny_experts[:0 if first else 2])
        with pytest.raises(CheckpointError, match="tensor 'visual_projection.weight' contains NaN or Inf"):
            merger.add(poisoned)
        assert merger.step == (0 if first else 2)
        merger.add_all(tiny_experts[merger.step : 3])
        assert (tmp_path / "out" / ".hf-merge-spare").is_dir()  # kept for the next step
    assert snapshot(tmp_path / "out")["model.safetensors"] == snapshot(reference)["model.safetensors"]
    assert not (tmp_path / "out" / ".hf-merge-spare").exists()  # discarded when the run ends


def test_half_precision_checkpoints_keep_their_dtype(tiny_base, tiny_experts, tmp_path):
    def as_fp16(src, dst):
        shutil.copytree(src, dst)
        tensors = {n: t.half() if t.is_floating_point() else t for n, t in weights(src).items()}
        save_file(tensors, dst / "model.safetensors")
        return dst

    base16 = as_fp16(tiny_base, tmp_path / "base16")
    experts16 = [as_fp16(e, tmp_path / f"e{i}") for i, e in enumerate(tiny_experts[:3])]
    out16 = merge(base16, experts16, "opcm", tmp_path / "out16").output_dir
    out32 = merge(tiny_base, tiny_experts[:3], "opcm", tmp_path / "out32").output_dir
    merged16, merged32 = weights(out16), weights(out32)
    assert all(t.dtype == torch.float16 for t in merged16.values())
    diff = max(float((merged16[n].float() - merged32[n]).abs().max()) for n in merged32)
    assert diff < 5e-3


def test_sharded_inputs_give_the_same_merge(tiny_base, tiny_experts, clean_three, tmp_path):
    def as_shards(src, dst):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
        CheckpointWriter(dst, max_shard_size="60KB").save_dict(weights(src))
        assert (dst / "model.safetensors.index.json").is_file()
        return dst

    base = as_shards(tiny_base, tmp_path / "base")
    experts = [as_shards(e, tmp_path / f"e{i}") for i, e in enumerate(tiny_experts[:3])]
    out = merge(base, experts, "opcm", tmp_path / "out").output_dir
    assert weights(out).keys() == weights(clean_three).keys()
    assert all(torch.equal(weights(out)[n], t) for n, t in weights(clean_three).items())


def test_scope_all_merges_the_text_tower_too(tiny_base, tiny_experts, tmp_path):
    text_expert = tmp_path / "text"
    shutil.copytree(tiny_experts[0], text_expert)
    tensors = weights(text_expert)
    tensors["text_model.final_layer_norm.bias"] += 0.5
    save_file(tensors, text_expert / "model.safetensors")
    base = weights(tiny_base)
    vision_only = weights(merge(tiny_base, [text_expert, tiny_experts[1]], "average", tmp_path / "v").output_dir)
    everything = weights(merge(tiny_base, [text_expert, tiny_experts[1]], "average", tmp_path / "a", scope="all").output_dir)
    name = "text_model.final_layer_norm.bias"
    assert torch.equal(vision_only[name], base[name])
    assert torch.allclose(everything[name], base[name] + 0.25)
    assert torch.equal(everything["text_model.encoder.layers.0.mlp.fc1.weight"], base["text_model.encoder.layers.0.mlp.fc1.weight"])


def test_usage_errors(tiny_base, tiny_experts, clean_three, tmp_path):
    with pytest.raises(UsageError, match="unknown merge method 'nope'"):
        merge(tiny_base, tiny_experts[:1], "nope", tmp_path / "a")
    with pytest.raises(UsageError, match=r"method 'opcm' has no parameter 'alhpa' \(did you mean 'alpha'\?\)"):
        merge(tiny_base, tiny_experts[:1], "opcm", tmp_path / "b", alhpa=0.5)
    with pytest.raises(UsageError, match=r"method 'opcm': parameter 'alpha' must be in \[0, 1\], got 2"):
        merge(tiny_base, tiny_experts[:1], "opcm", tmp_path / "c", alpha=2)
    with pytest.raises(UsageError, match="at least one expert"):
        merge(tiny_base, [], "opcm", tmp_path / "d")
    with pytest.raises(UsageError, match="unknown scope"):
        merge(tiny_base, tiny_experts[:1], "opcm", tmp_path / "e", scope="audio")
    with pytest.raises(MergeStateError, match="already holds a merge"):
        ContinualMerger(tiny_base, clean_three, "opcm")


def toy_model(folder, tensors):
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_integer_buffers_come_from_the_base_and_zero_delta_is_not_projected(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "vision_model.a.weight": torch.randn(6, 4, generator=g),
        "vision_model.b.weight": torch.randn(5, 7, generator=g),
        "vision_model.ids": torch.arange(6),
    }
    first = dict(base, **{"vision_model.a.weight": base["vision_model.a.weight"] + torch.randn(6, 4, generator=g)})
    tau_b = torch.randn(5, 7, generator=g)
    second = dict(base, **{"vision_model.b.weight": base["vision_model.b.weight"] + tau_b, "vision_model.ids": torch.zeros(6, dtype=torch.int64)})
    folders = [toy_model(tmp_path / name, t) for name, t in (("base", base), ("e1", first), ("e2", second))]
    merged = weights(merge(folders[0], folders[1:], "opcm", tmp_path / "out").output_dir)
    assert torch.equal(merged["vision_model.ids"], base["vision_model.ids"])
    # b was zero in the merged task vector: the new task vector passes unprojected, only rescaled
    moved = (merged["vision_model.b.weight"] - base["vision_model.b.weight"]).double().flatten()
    cosine = torch.dot(moved, tau_b.double().flatten()) / (moved.norm() * tau_b.double().norm())
    assert float(cosine) == pytest.approx(1.0, abs=1e-6)
    projected = weights(merge(folders[0], folders[1:], "opcm", tmp_path / "p", project_zero_delta=True).output_dir)
    assert not torch.allclose(projected["vision_model.b.weight"], merged["vision_model.b.weight"])


def test_cpu_worker_threads_give_bit_identical_weights(tiny_base, tiny_experts, tmp_path, monkeypatch):
    outputs = []
    for threads in ("1", "3"):
        monkeypatch.setenv("HF_MERGE_THREADS", threads)
        outputs.append(snapshot(merge(tiny_base, tiny_experts[:3], "opcm", tmp_path / threads).output_dir)["model.safetensors"])
    assert outputs[0] == outputs[1]
