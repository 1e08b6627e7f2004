"""``hf-merge add`` on repos merged with ``iso_c`` and ``tsv_m``: their state (the running sum, the
kept singular triplets) travels with the repo, and the continuation equals one run over every expert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import hf_merge
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

from hf_merge.api import merge

pytestmark = pytest.mark.slow


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method", ["iso_c", "tsv_m"])
def test_add_continues_the_merge_and_equals_one_run(method, seeded_hub, alice_token, hub_api, tmp_path):
    repo = f"alice/cli-{method.replace('_', '-')}"
    first = hf_merge(["merge", "--base", seeded_hub.base, "--experts", *seeded_hub.experts[:2], "--method", method,
                      "--scaling", "0.8", "--output", str(tmp_path / "first"), "--push-to-hub", repo,
                      "--token", alice_token])
    assert first.returncode == 0, first.stderr
    assert "merge_state.safetensors" in hub_api.list_repo_files(repo)
    second = hf_merge(["add", repo, "--experts", *seeded_hub.experts[2:4], "--output", str(tmp_path / "second"),
                       "--token", alice_token])
    assert second.returncode == 0, second.stderr

    one_run = merge(base=seeded_hub.base, experts=seeded_hub.experts[:4], method=method,
                    parameters={"scaling_factor": 0.8}, output=str(tmp_path / "one-run"))
    assert [s["repo_id"] for s in one_run.steps] == seeded_hub.experts[:4]
    continued, expected = weights(tmp_path / "second"), weights(tmp_path / "one-run")
    assert continued.keys() == expected.keys()
    for name in expected:
        assert torch.equal(continued[name], expected[name]), name
    # the method's state, too, is the one a single run leaves
    assert torch.equal(
        load_file(str(tmp_path / "second" / "merge_state.safetensors"))["vision_model.encoder.layers.0.mlp.fc1.weight"],
        load_file(str(tmp_path / "one-run" / "merge_state.safetensors"))["vision_model.encoder.layers.0.mlp.fc1.weight"],
    )
    # ...which moved past the two-expert model, and was pushed
    two = weights(tmp_path / "first")
    name = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(continued[name], two[name])
    state = json.loads(Path(hf_hub_download(repo, "merge_state.json", token=alice_token)).read_text())
    assert state["method"] == method and state["step"] == 4
    assert state["hyperparameters"] == {"scaling_factor": 0.8}
