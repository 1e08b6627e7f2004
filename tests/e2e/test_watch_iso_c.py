"""The watcher continues a merge made with ``iso_c``, whose state (Σ τ_i) is not the weights: the
merged repo after the watcher's pass equals one Iso-C run over every expert."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file

from hf_merge.api import merge
from hf_merge.testing.watch_models import fine_tune, lineage_of, publish, publish_parents
from hf_merge.watch.runner import Watcher

pytestmark = pytest.mark.slow


def test_watcher_adds_a_fine_tune_to_an_iso_c_merge(hub_api, hub_url, alice_token, carol_token, tiny_base, tiny_experts,
                                                     tmp_path):
    base, experts = publish_parents(hub_api, "watch-iso-c", tiny_base, tiny_experts[:2])
    repo = "alice/watch-iso-c-merged"
    merge(base=base, experts=experts, method="iso_c", parameters={"scaling_factor": 0.7},
          output=str(tmp_path / "merged"), push_to_hub=repo, token=alice_token)

    folder = fine_tune(tiny_base, tmp_path / "carol-ft", base, seed=4242)
    sha = publish(HfApi(endpoint=hub_url, token=carol_token), "carol/watch-iso-c-ft", folder)
    outcomes = Watcher(repo, work_dir=tmp_path / "watcher", token=alice_token).run_once()
    assert [(o.repo_id, o.sha, o.status) for o in outcomes] == [("carol/watch-iso-c-ft", sha, "merged")]
    assert lineage_of(repo)[-1] == ("carol/watch-iso-c-ft", sha) and len(lineage_of(repo)) == 3

    merge(base=base, experts=[*experts, f"carol/watch-iso-c-ft@{sha}"], method="iso_c",
          parameters={"scaling_factor": 0.7}, output=str(tmp_path / "one-run"))
    watched = load_file(hf_hub_download(repo, "model.safetensors", force_download=True))
    expected = load_file(str(tmp_path / "one-run" / "model.safetensors"))
    assert watched.keys() == expected.keys()
    for name in expected:
        assert torch.equal(watched[name], expected[name]), name
    two = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not torch.equal(watched["vision_model.encoder.layers.0.mlp.fc1.weight"], two["vision_model.encoder.layers.0.mlp.fc1.weight"])
