"""The shapes real Hub repos have: tower-only experts, conversion pull requests, shards, half
precision, flax/tf files, tags, gated repos, harmless config differences, experts without a card."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_merge import api
from hf_merge.errors import AuthenticationError, CheckpointError, IncompatibleExpertError
from hf_merge.hub.conversion_pr import CONVERSION_BOT, PR_TITLE
from hf_merge.hub_server.storage import RepoRecord
from hf_merge.io.weights_writer import CheckpointWriter
from hf_merge.merging.engine import merge_weights as engine_merge

VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "num_channels", "hidden_act", "projection_dim", "layer_norm_eps")
TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
               "max_position_embeddings", "hidden_act", "projection_dim", "eos_token_id", "bos_token_id", "pad_token_id")


def tower_only(full: Path, out: Path, tower: str = "vision", *, projection: bool = False, dtype=None) -> Path:
    """A ``CLIPVisionModel`` / ``CLIPTextModel`` checkpoint cut from a full tiny CLIP folder, as the
    FusionBench experts are (no projection, no position_ids, transformers 4.39 config fields)."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((full / "config.json").read_text())
    section = config[f"{tower}_config"]
    fields = VISION_FIELDS if tower == "vision" else TEXT_FIELDS
    arch = {"vision": "CLIPVisionModelWithProjection" if projection else "CLIPVisionModel", "text": "CLIPTextModel"}[tower]
    tower_config = {k: section[k] for k in fields if k in section}
    tower_config.update(_name_or_path="results/temp/", architectures=[arch], model_type=f"clip_{tower}_model",
                        torch_dtype="float32", transformers_version="4.39.1")
    (out / "config.json").write_text(json.dumps(tower_config, indent=2, sort_keys=True) + "\n")
    prefix = "vision_model." if tower == "vision" else "text_model."
    keep = (prefix, "visual_projection.") if projection else (prefix,)
    tensors = {n: t for n, t in load_file(full / "model.safetensors").items()
               if n.startswith(keep) and not n.endswith("position_ids")}
    if dtype is not None:
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------- tower-only experts
def test_vision_only_experts_merge_into_a_full_clip(tiny_base, tiny_experts, tmp_path):
    experts = [tower_only(e, tmp_path / f"v{i}") for i, e in enumerate(tiny_experts[:3])]
    out = engine_merge(tiny_base, experts, "task_arithmetic", tmp_path / "out", scaling_factor=0.5).output_dir
    full = engine_merge(tiny_base, tiny_experts[:3], "task_arithmetic", tmp_path / "full", scaling_factor=0.5).output_dir
    merged, reference, base = load_file(out / "model.safetensors"), load_file(full / "model.safetensors"), load_file(tiny_base / "model.safetensors")
    assert set(merged) == set(base)
    for name in base:
        if name.startswith("vision_model."):
            assert torch.equal(merged[name], reference[name]), name  # same encoder merge as with full experts
        else:
            assert torch.equal(merged[name], base[name]), name  # text tower, both projections, logit_scale
    state = json.loads((out / "merge_state.json").read_text())
    assert state["from_base"] == {"visual_projection.weight": "the expert does not have it: it is a CLIPVisionModel"}
    assert all(n.startswith("vision_model.") for n in state["merged_names"])
    from hf_merge.publish.card import build_card

    card = build_card(out, plot=False).text
    assert f"{len(state['merged_names'])} tensors were merged: `vision_model.*` ({len(state['merged_names'])})" in card
    assert "- `visual_projection.weight`: the expert does not have it: it is a CLIPVisionModel;" in card
    assert "`text_projection.weight`: outside the merged scope (`vision`)" in card
    from transformers import CLIPModel

    CLIPModel.from_pretrained(out)


def test_vision_model_with_projection_merges_the_projection_too(tiny_base, tiny_experts, tmp_path):
    experts = [tower_only(e, tmp_path / f"p{i}", projection=True) for i, e in enumerate(tiny_experts[:2])]
    out = engine_merge(tiny_base, experts, "average", tmp_path / "out").output_dir
    state = json.loads((out / "merge_state.json").read_text())
    assert "visual_projection.weight" in state["merged_names"] and not state["from_base"]


def test_text_only_experts_with_text_scope(tiny_base, tiny_experts, tmp_path):
    from hf_merge.testing.tiny_clip import make_expert

    text_experts = [make_expert(tiny_base, tmp_path / f"tx{i}", seed=70 + i, scope="text") for i in range(2)]
    experts = [tower_only(e, tmp_path / f"t{i}", tower="text") for i, e in enumerate(text_experts)]
    out = engine_merge(tiny_base, experts, "average", tmp_path / "out", scope="text").output_dir
    merged, base = load_file(out / "model.safetensors"), load_file(tiny_base / "model.safetensors")
    assert all(torch.equal(merged[n], base[n]) for n in base if not n.startswith("text_model."))
    assert any(not torch.equal(merged[n], base[n]) for n in base if n.startswith("text_model."))
    state = json.loads((out / "merge_state.json").read_text())
    assert state["from_base"] == {"text_projection.weight": "the expert does not have it: it is a CLIPTextModel"}


def test_vision_only_base_gives_a_vision_only_output(tiny_base, tiny_experts, tmp_path):
    base = tower_only(tiny_base, tmp_path / "base")
    shutil.copy(tiny_base / "preprocessor_config.json", base)
    experts = [tower_only(e, tmp_path / f"v{i}") for i, e in enumerate(tiny_experts[:2])]
    out = engine_merge(base, experts, "average", tmp_path / "out").output_dir
    assert set(load_file(out / "model.safetensors")) == set(load_file(base / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "clip_vision_model"
    from transformers import CLIPVisionModel

    CLIPVisionModel.from_pretrained(out)


def test_expert_missing_an_encoder_tensor_is_named(tiny_base, tiny_experts, tmp_path):
    bad = tower_only(tiny_experts[0], tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.mlp.fc1.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(IncompatibleExpertError, match="has no tensor 'vision_model.encoder.layers.1.mlp.fc1.weight'") as caught:
        engine_merge(tiny_base, [bad], "average", tmp_path / "out")
    assert "\n" not in str(caught.value)
    good = tower_only(tiny_experts[1], tmp_path / "good")
    with pytest.raises(IncompatibleExpertError, match="has no tensor 'vision_model.encoder.layers.1.mlp.fc1.weight'"):
        api.merge(base=str(tiny_base), experts=[str(good), str(bad)], output=str(tmp_path / "api-out"))
    assert not (tmp_path / "api-out" / "merge_state.json").exists()  # refused before step 1


def test_truncated_local_expert_fails_before_any_step(tiny_base, tiny_experts, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_experts[1], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 4096])
    with pytest.raises(CheckpointError, match="truncated") as caught:
        api.merge(base=str(tiny_base), experts=[str(tiny_experts[0]), str(bad)], output=str(tmp_path / "out"))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape, message", [
    ({"hidden_size": 48}, "vision_config.hidden_size is 48 instead of 32"),
    ({"patch_size": 4}, "vision_config.patch_size is 4 instead of 8"),
])
def test_another_width_or_patch_size_is_one_line(tiny_base, tmp_path, shape, message):
    from hf_merge.testing.tiny_clip import build_tiny_clip

    other = tower_only(build_tiny_clip(tmp_path / "other-full", seed=3, **shape), tmp_path / "other")
    with pytest.raises(IncompatibleExpertError, match=message) as caught:
        api.merge(base=str(tiny_base), experts=[str(other)], output=str(tmp_path / "out"))
    assert "\n" not in str(caught.value)


def test_later_expert_must_cover_the_tensors_the_first_decided(tiny_base, tiny_experts, tmp_path):
    with_projection = tower_only(tiny_experts[0], tmp_path / "wp", projection=True)
    without = tower_only(tiny_experts[1], tmp_path / "np")
    with pytest.raises(IncompatibleExpertError, match="has no tensor 'visual_projection.weight', which the merge needs"):
        api.merge(base=str(tiny_base), experts=[str(with_projection), str(without)], output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- precision and shards
def test_sharded_half_precision_base_and_bfloat16_experts(tiny_base, tiny_experts, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "model.safetensors").unlink()
    tensors = {n: (t.half() if t.is_floating_point() else t) for n, t in load_file(tiny_base / "model.safetensors").items()}
    files = CheckpointWriter(base, max_shard_size=20_000).save_dict(tensors)
    assert "model.safetensors.index.json" in files and len(files) > 2
    experts = [tower_only(e, tmp_path / f"e{i}", dtype=torch.bfloat16) for i, e in enumerate(tiny_experts[:2])]
    out = engine_merge(base, experts, "opcm", tmp_path / "out").output_dir
    merged = load_file(out / "model.safetensors")
    assert all(merged[n].dtype == torch.float16 for n in merged if merged[n].is_floating_point())
    assert torch.equal(merged["text_projection.weight"], tensors["text_projection.weight"])


# ---------------------------------------------------------------------------- Hub repo shapes
def _publish(storage, repo_id: str, files: dict[str, bytes], *, title="add files", author="alice", pr_num=None):
    if storage.get_repo("model", repo_id) is None:
        storage.create_repo(RepoRecord("model", repo_id), author=author)
    operations = []
    for path, data in files.items():
        if path.endswith((".bin", ".safetensors", ".msgpack", ".h5")):
            sha = hashlib.sha256(data).hexdigest()
            storage.put_lfs(iter([data]), sha, len(data))
            operations.append(("lfsFile", {"path": path, "oid": sha, "size": len(data)}))
        else:
            operations.append(("file", {"path": path, "content": base64.b64encode(data).decode()}))
    commit, made = storage.commit("model", repo_id, revision="main", author=author, title=title, message="",
                                  operations=operations, create_pr=pr_num is not None)
    return commit.id


def _folder_files(folder: Path, skip=()) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def pickle_base(hub_server, tiny_base, tmp_path_factory):
    """``alice/pickle-clip``: pytorch_model.bin (+ flax/tf placeholders) on main, safetensors in a
    conversion PR; ``alice/pickle-clip-bad-pr``: its PR renames a tensor; ``alice/pickle-clip-no-pr``."""
    storage = hub_server.api.storage
    state = load_file(tiny_base / "model.safetensors")
    state["vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)
    folder = tmp_path_factory.mktemp("pickle-base")
    torch.save(state, folder / "pytorch_model.bin")
    main = _folder_files(tiny_base, skip=("model.safetensors",)) | {
        "pytorch_model.bin": (folder / "pytorch_model.bin").read_bytes(),
        "flax_model.msgpack": b"never downloaded", "tf_model.h5": b"never downloaded either",
    }
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    renamed = dict(state)
    renamed["vision_model.post_layernorm.renamed"] = renamed.pop("vision_model.post_layernorm.bias")
    save_file(renamed, folder / "bad.safetensors", metadata={"format": "pt"})
    shas = {}
    for repo_id, pr_file in (("alice/pickle-clip", "model.safetensors"), ("alice/pickle-clip-bad-pr", "bad.safetensors"),
                             ("alice/pickle-clip-no-pr", None)):
        if storage.get_repo("model", repo_id) is not None:
            continue
        shas[repo_id] = _publish(storage, repo_id, main)
        if pr_file:
            pr = _publish(storage, repo_id, {"model.safetensors": (folder / pr_file).read_bytes()},
                          title=PR_TITLE, author=CONVERSION_BOT, pr_num=1)
            shas[repo_id + "#pr"] = pr
    return shas


def test_conversion_pr_supplies_safetensors(pickle_base, tiny_experts, alice_token, tmp_path, hub_server):
    result = api.merge(base="alice/pickle-clip", experts=[str(tiny_experts[0])], output=str(tmp_path / "out"),
                       token=alice_token)
    state = json.loads((result.output_dir / "merge_state.json").read_text())
    pr = state["base"]["conversion_pr"]
    assert pr["ref"] == "refs/pr/1" and pr["author"] == CONVERSION_BOT
    assert state["base"]["commit_sha"] == pr["commit_sha"] == pickle_base["alice/pickle-clip#pr"]
    assert pr["revision_commit"] == pickle_base["alice/pickle-clip"]
    card = (result.output_dir / "README.md").read_text()
    assert "refs/pr/1" in card and pr["commit_sha"] in card
    from huggingface_hub import constants

    cached = {p.name for p in Path(constants.HF_HUB_CACHE).glob("models--alice--pickle-clip/snapshots/*/*")}
    assert "model.safetensors" in cached and not cached & {"pytorch_model.bin", "flax_model.msgpack", "tf_model.h5"}
    # Continuing pins the same commit of the pull request.
    continued = api.add(str(result.output_dir), [str(tiny_experts[1])], token=alice_token)
    state = json.loads((continued.output_dir / "merge_state.json").read_text())
    assert state["base"]["commit_sha"] == pr["commit_sha"] and state["step"] == 2


def test_conversion_pr_with_other_tensor_names_is_refused(pickle_base, tiny_experts, alice_token, tmp_path):
    expected = r"conversion pull request refs/pr/1 lacks tensor 'vision_model.post_layernorm.bias'.*refused; pass --allow-pickle"
    with pytest.raises(CheckpointError, match=expected) as caught:
        api.merge(base="alice/pickle-clip-bad-pr", experts=[str(tiny_experts[0])], output=str(tmp_path / "out"), token=alice_token)
    assert "\n" not in str(caught.value)


def test_no_conversion_pr_keeps_the_pickle_error(pickle_base, tiny_experts, alice_token, tmp_path):
    with pytest.raises(CheckpointError, match=r"has only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        api.merge(base="alice/pickle-clip-no-pr", experts=[str(tiny_experts[0])], output=str(tmp_path / "out"), token=alice_token)
    result = api.merge(base="alice/pickle-clip-no-pr", experts=[str(tiny_experts[0])], output=str(tmp_path / "ok"),
                       token=alice_token, allow_pickle=True)
    assert json.loads((result.output_dir / "merge_state.json").read_text())["base"]["conversion_pr"] is None


def test_discussions_api_lists_the_pull_request(pickle_base, hub_api):
    discussions = list(hub_api.get_repo_discussions("alice/pickle-clip"))
    assert [(d.num, d.title, d.author, d.status, d.is_pull_request) for d in discussions] == [
        (1, PR_TITLE, CONVERSION_BOT, "open", True)
    ]
    details = hub_api.get_discussion_details("alice/pickle-clip", 1)
    assert details.events and details.target_branch == "refs/heads/main"
    commits = hub_api.list_repo_commits("alice/pickle-clip", revision="refs/pr/1")
    assert commits[1].commit_id == pickle_base["alice/pickle-clip"]


def test_tag_revision_and_harmless_config_differences(hub_server, hub_api, tiny_base, tiny_experts, tmp_path, alice_token):
    expert = tower_only(tiny_experts[2], tmp_path / "tagged")
    config = json.loads((expert / "config.json").read_text())
    config.update(transformers_version="4.99.0", torch_dtype="bfloat16", _name_or_path="/somewhere/else",
                  architectures=["CLIPVisionModelWithProjection"], id2label={"0": "x"})
    (expert / "config.json").write_text(json.dumps(config))
    repo = "alice/tagged-vision-expert"
    hub_api.create_repo(repo, exist_ok=True)
    first = hub_api.upload_folder(repo_id=repo, folder_path=expert).oid  # no README, no license
    hub_api.create_tag(repo, tag="v0.1")
    hub_api.upload_file(repo_id=repo, path_or_fileobj=b"later", path_in_repo="notes.txt")
    result = api.merge(base=str(tiny_base), experts=[f"{repo}@v0.1"], output=str(tmp_path / "out"), token=alice_token)
    entry = json.loads((result.output_dir / "merge_state.json").read_text())["lineage"][0]
    assert entry["revision"] == "v0.1" and entry["commit_sha"] == first
    assert "license: other" in (result.output_dir / "README.md").read_text()


def test_gated_repo_says_to_accept_its_terms(hub_server, seeded_hub, tmp_path, bob_token):
    storage = hub_server.api.storage
    repo = "alice/gated-expert"
    if storage.get_repo("model", repo) is None:
        _publish(storage, repo, _folder_files(seeded_hub.expert_dirs[0]))
        record = storage.get_repo("model", repo)
        record.gated = "manual"
        storage.update_repo(record)
    with pytest.raises(AuthenticationError, match="alice/gated-expert is gated: accept its conditions") as caught:
        api.merge(base=seeded_hub.base, experts=[repo], output=str(tmp_path / "out"), token=bob_token)
    assert "\n" not in str(caught.value)
    record = storage.get_repo("model", repo)
    record.gated_accepted = ["bob"]
    storage.update_repo(record)
    api.merge(base=seeded_hub.base, experts=[repo], output=str(tmp_path / "ok"), token=bob_token)


def test_the_real_conversion_file_passes_the_name_check():
    """openai/clip-vit-base-patch32's real config.json (full widths): the conversion bot's file
    holds 398 float32 tensors plus two int64 position_ids; that set passes, a renamed one does not."""
    from hf_merge.hub.conversion_pr import expected_float_names, tensor_name_problem

    config = json.loads((Path(__file__).parents[1] / "hf_merge/testing/replica_files/openai-clip-vit-base-patch32.config.json").read_text())
    names = expected_float_names(config)
    assert len(names) == 398 and "logit_scale" in names and "visual_projection.weight" in names
    real_file = {n: "F32" for n in names} | {"text_model.embeddings.position_ids": "I64", "vision_model.embeddings.position_ids": "I64"}
    assert tensor_name_problem(config, real_file) is None
    del real_file["text_projection.weight"]
    assert tensor_name_problem(config, real_file) == "lacks tensor 'text_projection.weight' of the model (1 missing)"
