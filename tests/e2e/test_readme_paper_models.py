"""The README's ViT-B/16, ViT-L/14 and LoRA commands, run verbatim against replicas of those repos.

A local Hub of its own holds small replicas of ``openai/clip-vit-base-patch16`` and
``openai/clip-vit-large-patch14``, their ``tanganke`` experts (full ``CLIPVisionModel`` checkpoints,
and PEFT LoRA adapters for B/16) and the eight evaluation datasets
(:mod:`hf_merge.testing.replicas_paper`). The block runs as in ``test_readme_paper.py``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_readme_paper import fresh_folder, readme_blocks, run_block, shell_commands

from hf_merge.hub_server import LocalHubServer
from hf_merge.testing.replicas import PLACEHOLDER, TASKS
from hf_merge.testing.replicas_paper import (
    LORA_ALPHA,
    LORA_RANK,
    VIT_B16,
    VIT_L14,
    publish_paper_replicas,
)

ROOT = Path(__file__).resolve().parents[2]
USER = "paper-user"
TOKEN = "hf_paper_user_3f1e0a9c5b7d4e21"
SECTION = "## The paper's ViT-B/16 and ViT-L/14 experiments, and LoRA experts"
pytestmark = pytest.mark.slow  # three merges of 8 experts, two of them evaluated every step


@pytest.fixture(scope="module")
def paper_models_run(tmp_path_factory):
    server = LocalHubServer(tmp_path_factory.mktemp("paper-models-hub"), tokens={USER: TOKEN}).start()
    try:
        replicas = publish_paper_replicas(server.api.storage, Path(tempfile.gettempdir()) / "hf-merge-replicas")
        home = tmp_path_factory.mktemp("hf-home")
        env = {
            **os.environ,
            "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "HF_HOME": str(home),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        (block,) = readme_blocks(SECTION, "bash")
        commands = shell_commands(block)
        assert len(commands) == 3 and any("_lora-16" in c for c in commands)
        cwd = fresh_folder(tmp_path_factory, "paper-models")
        run_block(commands, env, cwd)
        yield cwd, replicas, home
    finally:
        server.stop()


def test_recipes_name_the_paper_repos_in_order():
    for arch, name in ((VIT_B16, "paper_vit_b16_8tasks.yaml"), (VIT_L14, "paper_vit_l14_8tasks.yaml")):
        recipe = yaml.safe_load((ROOT / "examples" / name).read_text())
        assert recipe["base"] == arch.base and recipe["experts"] == list(arch.experts)
        assert recipe["eval"]["tasks"] == list(TASKS) and recipe["method"] == "opcm"
    assert VIT_B16.lora_experts[1] == "tanganke/clip-vit-base-patch16_stanford-cars_lora-16"


@pytest.mark.parametrize("arch,folder,positions", [(VIT_B16, "clip-vit-b16-opcm-8tasks", 197),
                                                   (VIT_L14, "clip-vit-l14-opcm-8tasks", 257)])
def test_recipe_merges_eight_full_experts_with_their_evaluation(paper_models_run, arch, folder, positions):
    cwd, replicas, _ = paper_models_run
    out = cwd / folder
    state = json.loads((out / "merge_state.json").read_text())
    assert state["base"]["repo_id"] == arch.base and state["base"]["commit_sha"] == replicas.shas[arch.base]
    assert [(e["repo_id"], e["commit_sha"]) for e in state["lineage"]] == [(r, replicas.shas[r]) for r in arch.experts]
    assert state["from_base"] == {"visual_projection.weight": "the expert does not have it: it is a CLIPVisionModel"}
    config = json.loads((out / "config.json").read_text())
    assert (config["projection_dim"], config["vision_config"]["patch_size"]) == (arch.projection_dim, arch.patch_size)
    merged = load_file(out / "model.safetensors")
    assert merged["vision_model.embeddings.position_embedding.weight"].shape[0] == positions
    assert merged["visual_projection.weight"].shape[0] == arch.projection_dim
    results = json.loads((out / "eval_results.json").read_text())
    assert len(results["accuracy_matrix"]) == 8
    assert sum(results["expert_accuracy"]) / 8 > sum(results["base_accuracy"]) / 8 + 0.3  # the experts learned


def test_lora_experts_merge_as_the_models_they_stand_for(paper_models_run):
    cwd, replicas, home = paper_models_run
    out = cwd / "b16-lora-opcm"
    state = json.loads((out / "merge_state.json").read_text())
    assert [(e["repo_id"], e["commit_sha"]) for e in state["lineage"]] == [
        (r, replicas.shas[r]) for r in VIT_B16.lora_experts]
    assert all(e["adapter"] == {"type": "lora", "r": LORA_RANK, "lora_alpha": float(LORA_ALPHA), "use_rslora": False,
                                "base_model_name_or_path": VIT_B16.base, "modules": 4, "modules_to_save": 0}
               for e in state["lineage"])
    # An adapter of the vision tower reads as a CLIPVisionModel: merged like the full experts.
    assert state["from_base"] == {"visual_projection.weight": "the expert does not have it: it is a CLIPVisionModel"}
    card = (out / "README.md").read_text()
    assert f"`{replicas.shas[VIT_B16.lora_experts[0]]}` (a PEFT LoRA adapter, rank 16" in card

    # The first step is the first adapter merged into the base: θ0 + 2·B·A on its q/v projections.
    base = load_file(replicas.folder / VIT_B16.base / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    changed = sorted(n for n in base if base[n].is_floating_point() and not torch.equal(base[n], merged[n]))
    assert changed and all(".self_attn.q_proj.weight" in n or ".self_attn.v_proj.weight" in n for n in changed)
    adapter = load_file(replicas.folder / VIT_B16.lora_experts[0] / "adapter_model.safetensors")
    assert "base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    downloaded = {p.name for p in (home / "hub").rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= downloaded
    assert not downloaded & {"flax_model.msgpack", "tf_model.h5", "pytorch_model.bin"}
    assert not any(p.read_bytes() == PLACEHOLDER for p in (home / "hub").rglob("*")
                   if p.is_file() and p.stat().st_size == len(PLACEHOLDER))


def test_first_lora_step_equals_the_dense_formula(tmp_path):
    """Step 1 of any continual merge is θ1 itself: the adapter merged into the base, checked here
    against θ0 + (alpha / r)·B·A computed densely from the replica's files."""
    from hf_merge.merging.engine import merge_weights as merge
    from hf_merge.testing.replicas_paper import build_paper_files

    root = build_paper_files(Path(tempfile.gettempdir()) / "hf-merge-replicas")
    base_dir, adapter_dir = root / VIT_B16.base, root / VIT_B16.lora_experts[2]
    result = merge(base_dir, [adapter_dir], "average", tmp_path / "out")
    merged, base = load_file(result.output_dir / "model.safetensors"), load_file(base_dir / "model.safetensors")
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    scale = LORA_ALPHA / LORA_RANK
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            module = f"encoder.layers.{layer}.self_attn.{proj}"
            expected = base[f"vision_model.{module}.weight"] + scale * (
                adapter[f"base_model.model.{module}.lora_B.weight"] @ adapter[f"base_model.model.{module}.lora_A.weight"])
            assert torch.allclose(merged[f"vision_model.{module}.weight"], expected, atol=1e-6, rtol=0)
            assert not math.isclose(float((expected - base[f"vision_model.{module}.weight"]).abs().max()), 0.0)
