"""``hf-merge demo`` end to end on a miniature zoo: Hub, merge by repo id, evaluation, card, Space."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import HfApi, ModelCard

from hf_merge.demo import run_demo
from hf_merge.hub_server import LocalHubServer
from hf_merge.zoo import ZooConfig

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_MERGE_CACHE", str(tmp_path / "cache"))
    config = ZooConfig.tiny()
    first = run_demo(tmp_path / "demo", eval_limit=20, zoo_config=config)
    # A second run starts over from the cached zoo instead of refusing the existing merge folder.
    result = run_demo(tmp_path / "demo", eval_limit=20, zoo_config=config)
    assert result.output_dir == first.output_dir
    out = capsys.readouterr().out
    assert "Removing the previous demo run" in out and out.count("[4/4] Done.") == 2

    experts = [f"demo/zoo-clip-{task.replace('_', '-')}" for task in config.tasks]
    card = ModelCard.load(result.output_dir / "README.md")
    assert card.data.base_model == ["demo/zoo-clip-base", *experts]
    report = json.loads((result.output_dir / "eval_results.json").read_text())
    assert report["tasks"] == [f"offline/{task}" for task in config.tasks]
    assert len(report["accuracy_matrix"]) == len(config.tasks)
    assert None not in report["base_accuracy"] and None not in report["expert_accuracy"]
    state = json.loads((result.output_dir / "merge_state.json").read_text())
    assert state["method"] == "tsv_m"  # the continual method that ranks first on the zoo's validation splits
    records = state["tuning"]  # its scaling chosen at every step on the validation splits, never the test ones
    assert [r["step"] for r in records] == list(range(1, len(config.tasks) + 1))
    assert set(records[-1]["per_task"][0]) == {f"offline/{task}/val" for task in config.tasks}
    assert "### Hyperparameters chosen on validation data" in card.text

    with LocalHubServer(tmp_path / "demo" / "hub") as server:  # what the demo published survives it
        api = HfApi(endpoint=server.url)
        assert {"model.safetensors", "README.md", "merge_state.json"} <= set(api.list_repo_files(result.merged_repo))
        assert "app.py" in api.list_repo_files(result.space_repo, repo_type="space")
