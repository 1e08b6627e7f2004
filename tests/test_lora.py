"""PEFT LoRA adapters as experts: the view's tensors against peft's own merge_and_unload, the
mapping of tensor names, lineage and card, and every bad adapter refused in one line before a merge."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import peft  # a test dependency (the [dev] extra): the reference the merge is checked against
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_merge.errors import CheckpointError, IncompatibleExpertError
from hf_merge.hub.preflight import check_models
from hf_merge.hub.sources import ModelSource
from hf_merge.io.checkpoint import Checkpoint
from hf_merge.io.lora_checkpoint import LoraCheckpoint, open_expert, planning_view


def _clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 64,
                         "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "image_size": 32, "patch_size": 16},
        projection_dim=8)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("lora-base")
    torch.manual_seed(0)
    CLIPModel(_clip_config()).save_pretrained(folder)
    return folder


def _peft_adapter(base_dir: Path, out: Path, *, vision_only: bool = False, seed: int = 1, **lora):
    """An adapter made by peft on the base (random B, so the update is not zero), and peft's own
    merge_and_unload of it: ``(adapter folder, merged state dict)``."""
    from transformers import CLIPModel, CLIPVisionModel

    model = (CLIPVisionModel if vision_only else CLIPModel).from_pretrained(base_dir)
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # trained modules_to_save: their own values, not the base's
        for name, parameter in wrapped.named_parameters():
            if ".modules_to_save." in name:
                parameter.add_(torch.randn_like(parameter))
    wrapped.save_pretrained(out)
    merged = wrapped.merge_and_unload().state_dict()
    return out, {k: v.detach().clone() for k, v in merged.items()}


def _open(adapter: Path, base_dir: Path):
    base = Checkpoint.open(base_dir)
    return base, open_expert(adapter, "me/adapter", base, ModelSource.local(base_dir))


@pytest.mark.parametrize("lora", [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": r".*vision_model.*\.(k_proj|fc1|out_proj)",
         "modules_to_save": ["post_layernorm"]},
    {"r": 3, "lora_alpha": 5, "target_modules": ["fc1", "fc2", "q_proj"], "rank_pattern": {"fc2": 2}, "alpha_pattern": {"q_proj": 7}},
], ids=["list-targets", "regex-rslora-modules-to-save", "rank-and-alpha-patterns"])
def test_every_tensor_equals_peft_merge_and_unload(base_dir, tmp_path, lora):
    adapter, merged = _peft_adapter(base_dir, tmp_path / "adapter", **lora)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    base, view = _open(adapter, base_dir)
    assert isinstance(view, LoraCheckpoint)
    changed = 0
    with base, view:
        for name in view.names():
            got = view.get(name)
            assert got.dtype == merged[name].dtype and got.shape == merged[name].shape
            assert torch.allclose(got, merged[name], atol=1e-6, rtol=0), name
            changed += not torch.equal(got, base.get(name))
    assert changed >= 6  # the adapter did change the weights it targets
    assert view.names() == base.names() and view.config == base.config  # the base with the adapter's changes
    planned = planning_view(view)
    if "modules_to_save" in lora:  # vision tensors only: it plans a merge as a CLIPVisionModel
        assert planned.config["model_type"] == "clip_vision_model" and planned.config["architectures"] == ["CLIPVisionModel"]
        assert planned.names() == [n for n in base.names() if n.startswith("vision_model.")]
        assert planned.config["hidden_size"] == 16 and planned.config["patch_size"] == 16
        with base, view:
            assert not torch.equal(view.get("vision_model.post_layernorm.weight"), base.get("vision_model.post_layernorm.weight"))
    else:
        assert planned is view


def test_adapter_on_a_vision_model_maps_to_the_base_names(base_dir, tmp_path):
    # transformers 5's CLIPVisionModel, like FusionBench's CLIPVisionTransformer, names modules
    # without `vision_model.`: the adapter's `base_model.model.encoder...` is the base's `vision_model.encoder...`.
    adapter, merged = _peft_adapter(base_dir, tmp_path / "adapter", vision_only=True, r=2, lora_alpha=4,
                                    target_modules=["q_proj", "v_proj"])
    stored = load_file(adapter / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.encoder.layers.0.self_attn.q_proj.lora_A") for k in stored)
    base, view = _open(adapter, base_dir)
    with base, view:
        assert planning_view(view).config["model_type"] == "clip_vision_model"
        for short, tensor in merged.items():
            name = short if short.startswith("vision_model.") else "vision_model." + short
            if name in view:
                assert torch.allclose(view.get(name), tensor, atol=1e-6, rtol=0), name
        assert not torch.equal(view.get("vision_model.encoder.layers.1.self_attn.v_proj.weight"),
                               base.get("vision_model.encoder.layers.1.self_attn.v_proj.weight"))


def _manual_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fields = {"peft_type": "LORA", "r": 2, "lora_alpha": 3, "target_modules": ["fc1"],
              "base_model_name_or_path": None, **config}
    (folder / "adapter_config.json").write_text(json.dumps(fields))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def test_fan_in_fan_out_and_prefixless_names_follow_the_documented_formula(base_dir, tmp_path):
    # peft turns fan_in_fan_out off for nn.Linear, so this is checked against the formula itself:
    # W + (B·A)ᵀ · alpha / r, for a weight stored as (in, out).
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    shape = Checkpoint.open(base_dir).shape(name)  # (48, 16): read as in=48, out=16
    torch.manual_seed(3)
    lora_a, lora_b = torch.randn(2, shape[0]), torch.randn(shape[1], 2)
    adapter = _manual_adapter(tmp_path / "a", {"vision_model.encoder.layers.0.mlp.fc1.lora_A.weight": lora_a,
                                               "vision_model.encoder.layers.0.mlp.fc1.lora_B.weight": lora_b},
                              fan_in_fan_out=True, base_model_name_or_path=str(base_dir))
    base, view = _open(adapter, base_dir)
    with base, view:
        expected = base.get(name) + (lora_b @ lora_a).T * 1.5
        assert torch.allclose(view.get(name), expected, atol=1e-6, rtol=0)
        other = "vision_model.encoder.layers.1.mlp.fc1.weight"
        assert torch.equal(view.get(other), base.get(other))


def _adapter_and_its_full_model(base_dir, tmp_path):
    """A peft adapter (rank 4 on q_proj and fc2) and the full model peft's merge_and_unload makes of it."""
    from transformers import CLIPModel

    adapter, merged = _peft_adapter(base_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "fc2"])
    full = tmp_path / "full"
    model = CLIPModel.from_pretrained(base_dir)
    model.load_state_dict(merged)
    model.save_pretrained(full)
    return adapter, full


def test_engine_merges_an_adapter_like_the_model_it_stands_for(base_dir, tmp_path):
    from hf_merge.api import card
    from hf_merge.merging.engine import merge_weights as merge

    adapter, full = _adapter_and_its_full_model(base_dir, tmp_path)
    via_adapter = merge(base_dir, [adapter], "task_arithmetic", tmp_path / "out-a", scaling_factor=0.7)
    via_full = merge(base_dir, [full], "task_arithmetic", tmp_path / "out-f", scaling_factor=0.7)
    left, right = load_file(via_adapter.output_dir / "model.safetensors"), load_file(via_full.output_dir / "model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        assert torch.allclose(left[key], right[key], atol=1e-6, rtol=0), key
    entry = json.loads((via_adapter.output_dir / "merge_state.json").read_text())["lineage"][0]
    assert entry["adapter"] == {"type": "lora", "r": 4, "lora_alpha": 8.0, "use_rslora": False,
                                "base_model_name_or_path": str(base_dir), "modules": 8, "modules_to_save": 0}
    readme = card(via_adapter.output_dir).read_text()
    assert "a PEFT LoRA adapter, rank 4" in readme


def test_an_all_at_once_method_reads_an_adapter_as_the_model_it_stands_for(base_dir, tmp_path):
    from hf_merge.merging.engine import merge_weights as merge

    adapter, full = _adapter_and_its_full_model(base_dir, tmp_path)
    # WUDI needs every task vector at once; a few Adam steps keep the comparison smooth
    via_adapter = merge(base_dir, [adapter, full], "wudi", tmp_path / "out-a", iter_num=3)
    via_full = merge(base_dir, [full, full], "wudi", tmp_path / "out-f", iter_num=3)
    left, right = load_file(via_adapter.output_dir / "model.safetensors"), load_file(via_full.output_dir / "model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        assert torch.allclose(left[key], right[key], atol=1e-5, rtol=0), key
    lineage = json.loads((via_adapter.output_dir / "merge_state.json").read_text())["lineage"]
    assert lineage[0]["adapter"]["r"] == 4 and "adapter" not in lineage[1]


# ------------------------------------------------------------------------------------ bad input
def _lora_pair(module: str, rank_a: int = 2, rank_b: int = 2, width: int = 16):
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": torch.randn(rank_a, width), f"{prefix}.lora_B.weight": torch.randn(width, rank_b)}


_Q = "vision_model.encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("tensors,config,error,message", [
    (_lora_pair(_Q, 2, 3), {}, IncompatibleExpertError,
     (r"adapter .*bad: tensor 'base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight' has shape "
     r"\[2, 16\] and .* \[16, 3\]: their ranks differ")),
    (_lora_pair("vision_model.encoder.layers.7.self_attn.q_proj"), {}, IncompatibleExpertError,
     r"adapts module 'vision_model.encoder.layers.7.self_attn.q_proj', which the base does not have"),
    (_lora_pair(_Q), {"lora_alpha": math.nan}, CheckpointError, r"the scale lora_alpha / r is nan .*; fix the adapter's config"),
    (_lora_pair(_Q), {"lora_alpha": math.inf}, CheckpointError, r"the scale lora_alpha / r is inf"),
    (_lora_pair(_Q), {"r": 0}, CheckpointError, r"field 'r' must be a positive integer, got 0"),
    (_lora_pair(_Q), {"peft_type": "LOHA"}, CheckpointError, r"peft_type 'LOHA' is not supported; only LORA"),
    (_lora_pair(_Q), {"peft_type": "IA3"}, CheckpointError, r"peft_type 'IA3' is not supported"),
    (_lora_pair(_Q), {"use_dora": True}, CheckpointError, r"use_dora is set"),
    (_lora_pair(_Q), {"base_model_name_or_path": "someone/other-clip"}, IncompatibleExpertError,
     r"adapter .*bad was trained on someone/other-clip, not on the merge's base"),
    (_lora_pair(_Q), {"r": 4}, IncompatibleExpertError, r"has rank 2, but adapter_config.json says r=4"),
], ids=["rank-differs", "module-absent", "scale-nan", "scale-inf", "rank-zero", "loha", "ia3", "dora", "other-base", "rank-vs-config"])
def test_bad_adapter_refused_in_one_line_by_preflight_and_engine(base_dir, tmp_path, tensors, config, error, message):
    config = {"base_model_name_or_path": str(base_dir), "target_modules": ["q_proj"], **config}
    adapter = _manual_adapter(tmp_path / "bad", tensors, **config)
    with pytest.raises(error, match=message) as caught:
        check_models(str(base_dir), [str(adapter)], token=None)
    assert "\n" not in str(caught.value)
    base = Checkpoint.open(base_dir)
    with pytest.raises(error, match=message), base:
        open_expert(adapter, str(adapter), base, ModelSource.local(base_dir))


def test_missing_or_malformed_config_refused(base_dir, tmp_path):
    missing = tmp_path / "missing"
    missing.mkdir()
    save_file(_lora_pair(_Q), missing / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter .*missing has no adapter_config.json; it is not a PEFT adapter"):
        check_models(str(base_dir), [str(missing)], token=None)
    broken = _manual_adapter(tmp_path / "broken", _lora_pair(_Q))
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2,')
    with pytest.raises(CheckpointError, match=r"adapter .*broken: adapter_config.json is not valid JSON"):
        check_models(str(base_dir), [str(broken)], token=None)
    no_alpha = _manual_adapter(tmp_path / "no-alpha", _lora_pair(_Q), lora_alpha="big",
                               base_model_name_or_path=str(base_dir))
    with pytest.raises(CheckpointError, match=r"field 'lora_alpha' must be a number, got 'big'"):
        check_models(str(base_dir), [str(no_alpha)], token=None)


def test_revision_difference_is_only_a_warning(base_dir, tmp_path, caplog):
    from hf_merge.io.lora import AdapterConfig, check_base

    config = AdapterConfig.from_dict({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "revision": "v1",
                                      "base_model_name_or_path": "openai/clip-vit-base-patch16"}, "me/a")
    with caplog.at_level(logging.WARNING):
        check_base(config, "me/a", repo_id="openai/clip-vit-base-patch16", revision="main", commit_sha="ab" * 20,
                   base_config={})
    assert "trained on openai/clip-vit-base-patch16@v1; the merge's base is at main" in caplog.text
    with pytest.raises(IncompatibleExpertError, match="not on the merge's base openai/clip-vit-large-patch14"):
        check_base(config, "me/a", repo_id="openai/clip-vit-large-patch14", revision=None, commit_sha=None, base_config={})


def test_an_adapter_is_evaluated_as_the_base_with_the_adapter_merged(base_dir, tmp_path):
    from hf_merge.evaluation.runner import load_clip

    adapter, merged = _peft_adapter(base_dir, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["v_proj"])
    from transformers import CLIPModel

    clip, _ = load_clip(adapter, device="cpu", base=(CLIPModel.from_pretrained(base_dir), None))
    state = clip.state_dict()
    name = "vision_model.encoder.layers.0.self_attn.v_proj.weight"
    assert torch.allclose(state[name], merged[name], atol=1e-6, rtol=0)
    assert not torch.equal(state[name], Checkpoint.open(base_dir).get(name))


def test_adapters_by_repo_id_on_the_hub(base_dir, tmp_path, hub_api, alice_token):
    """A good adapter merges by repo id (lineage: repo, commit, adapter); a bad one is refused by the
    checks before the merge, which read its config and safetensors header only."""
    from huggingface_hub import constants

    from hf_merge.api import merge

    hub_api.create_repo("alice/lora-base", exist_ok=True)
    hub_api.upload_folder(repo_id="alice/lora-base", folder_path=base_dir)
    good, _ = _peft_adapter(base_dir, tmp_path / "good", r=2, lora_alpha=4, target_modules=["q_proj"])
    config = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "alice/lora-base"}))
    hub_api.create_repo("alice/lora-good", exist_ok=True)
    sha = hub_api.upload_folder(repo_id="alice/lora-good", folder_path=good).oid
    bad = _manual_adapter(tmp_path / "bad", _lora_pair(_Q, 2, 3), base_model_name_or_path="alice/lora-base",
                          target_modules=["q_proj"])
    hub_api.create_repo("alice/lora-bad", exist_ok=True)
    hub_api.upload_folder(repo_id="alice/lora-bad", folder_path=bad)

    hub_api.create_repo("alice/lora-no-config", exist_ok=True)
    hub_api.upload_file(path_or_fileobj=bad / "adapter_model.safetensors", path_in_repo="adapter_model.safetensors",
                        repo_id="alice/lora-no-config")
    with pytest.raises(CheckpointError, match=r"^adapter alice/lora-no-config has no adapter_config.json; it is not a PEFT"):
        check_models("alice/lora-base", ["alice/lora-no-config"], token=alice_token)
    with pytest.raises(IncompatibleExpertError, match=r"adapter alice/lora-bad: tensor .*q_proj.lora_A.weight.* their ranks differ"):
        merge(base="alice/lora-base", experts=["alice/lora-good", "alice/lora-bad"], method="task_arithmetic",
              output=str(tmp_path / "refused"), token=alice_token)
    cached = [p.name for p in Path(constants.HF_HUB_CACHE).rglob("*") if "lora-bad" in str(p) and p.is_file()]
    assert "adapter_model.safetensors" not in cached  # only its header was read, by a range request
    assert not (tmp_path / "refused" / "merge_state.json").exists()

    result = merge(base="alice/lora-base", experts=["alice/lora-good"], method="task_arithmetic",
                   output=str(tmp_path / "merged"), token=alice_token)
    entry = result.steps[0]
    assert (entry["repo_id"], entry["commit_sha"], entry["adapter"]["type"]) == ("alice/lora-good", sha, "lora")
    assert f"`{sha}` (a PEFT LoRA adapter, rank 2" in (tmp_path / "merged" / "README.md").read_text()


def test_a_vision_adapter_and_full_vision_experts_mix_in_either_order(base_dir, tmp_path):
    from transformers import CLIPModel

    from hf_merge.merging.engine import merge_weights as merge

    adapter, _ = _peft_adapter(base_dir, tmp_path / "adapter", r=2, lora_alpha=4,
                               target_modules=r".*vision_model.*\.(q_proj|v_proj)")
    vision = tmp_path / "vision-expert"  # a CLIPVisionModel checkpoint, as the tanganke experts are
    vision.mkdir()
    model = CLIPModel.from_pretrained(base_dir)
    tensors = {n: t + 0.01 for n, t in model.state_dict().items() if n.startswith("vision_model.")}
    save_file(tensors, vision / "model.safetensors")
    config = {**model.config.vision_config.to_dict(), "model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]}
    (vision / "config.json").write_text(json.dumps(config))
    for order in ([adapter, vision], [vision, adapter]):
        result = merge(base_dir, order, "task_arithmetic", tmp_path / f"out-{order[0].name}", scaling_factor=0.5)
        state = json.loads((result.output_dir / "merge_state.json").read_text())
        assert state["step"] == 2 and "visual_projection.weight" in state["from_base"]
        assert all(n.startswith("vision_model.") for n in state["merged_names"])
