"""``hf-merge watch`` and LoRA adapters: the Hub lists them under ``base_model:adapter:<base>``; they
pass through the same admission policy and quality gate as fine-tunes, and are merged as the model
they stand for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from safetensors.torch import save_file

from hf_merge.io.checkpoint import Checkpoint
from hf_merge.testing.watch_models import (
    lineage_of,
    merged_repo,
    prediction_task,
    publish,
)
from hf_merge.watch.policy import AdmissionPolicy
from hf_merge.watch.runner import Watcher

pytestmark = pytest.mark.slow
PROBE = "watch-adapter-probe"


def _adapter(base_dir: Path, out: Path, base_repo: str, *, seed: int, size: float = 0.01, rank_b: int = 2,
             license: str = "mit") -> Path:
    """A PEFT LoRA adapter (rank 2, on the vision q/v projections) whose card names the base as an
    adapter's card does."""
    out.mkdir(parents=True, exist_ok=True)
    width = Checkpoint.open(base_dir).shape("vision_model.encoder.layers.0.self_attn.q_proj.weight")[0]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for proj in ("q_proj", "v_proj"):
        module = f"base_model.model.vision_model.encoder.layers.0.self_attn.{proj}"
        tensors[f"{module}.lora_A.weight"] = torch.randn(2, width, generator=generator) * size
        tensors[f"{module}.lora_B.weight"] = torch.randn(width, rank_b, generator=generator) * size
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": base_repo, "task_type": None, "fan_in_fan_out": False}))
    (out / "README.md").write_text(f"---\nbase_model: {base_repo}\nbase_model_relation: adapter\nlibrary_name: peft\n"
                                   f"license: {license}\n---\nA LoRA adapter of the tiny CLIP base.\n")
    return out


def test_adapters_are_found_checked_gated_and_merged(hub_api, hub_url, alice_token, carol_token, tiny_base, tiny_experts,
                                                     tmp_path_factory):
    work = tmp_path_factory.mktemp("watch-adapter")
    prediction_task(tiny_base, PROBE, work / "probe")
    repo, base = merged_repo(hub_api, alice_token, "watch-adapter", tiny_base, tiny_experts[:2], work,
                             tasks=[PROBE, PROBE], eval_limit=None)
    carol = HfApi(endpoint=hub_url, token=carol_token)
    shas = {
        "carol/watch-lora-good": publish(carol, "carol/watch-lora-good", _adapter(tiny_base, work / "good", base, seed=1)),
        "carol/watch-lora-rank": publish(carol, "carol/watch-lora-rank",
                                         _adapter(tiny_base, work / "rank", base, seed=2, rank_b=3)),
        "carol/watch-lora-gpl": publish(carol, "carol/watch-lora-gpl",
                                        _adapter(tiny_base, work / "gpl", base, seed=3, license="gpl-3.0")),
        "carol/watch-lora-hurt": publish(carol, "carol/watch-lora-hurt",
                                         _adapter(tiny_base, work / "hurt", base, seed=4, size=3.0)),
    }
    policy = AdmissionPolicy(licenses=["mit"], max_forgetting=10.0,
                             tasks={"carol/watch-lora-good": PROBE, "carol/watch-lora-hurt": PROBE})
    watcher = Watcher(repo, work_dir=work / "watcher", token=alice_token, policy=policy)
    outcomes = {o.repo_id: o for o in watcher.run_once()}

    assert {r: (o.status, o.sha) for r, o in outcomes.items()} == {
        "carol/watch-lora-good": ("merged", shas["carol/watch-lora-good"]),
        "carol/watch-lora-rank": ("refused", shas["carol/watch-lora-rank"]),
        "carol/watch-lora-gpl": ("refused", shas["carol/watch-lora-gpl"]),
        "carol/watch-lora-hurt": ("refused", shas["carol/watch-lora-hurt"]),
    }
    assert outcomes["carol/watch-lora-rank"].reason.startswith("architecture: adapter carol/watch-lora-rank@")
    assert "their ranks differ" in outcomes["carol/watch-lora-rank"].reason
    assert outcomes["carol/watch-lora-gpl"].reason == "license: license 'gpl-3.0' is not allowed (mit)"
    assert outcomes["carol/watch-lora-hurt"].reason.startswith("quality: forgetting ")

    assert lineage_of(repo)[-1] == ("carol/watch-lora-good", shas["carol/watch-lora-good"])
    state = json.loads(Path(hf_hub_download(repo, "merge_state.json", force_download=True)).read_text())
    assert state["lineage"][-1]["adapter"]["type"] == "lora" and state["lineage"][-1]["adapter"]["r"] == 2
    card = ModelCard.load(repo)
    assert "a PEFT LoRA adapter, rank 2" in card.text
    assert "carol/watch-lora-good" in card.data.base_model
