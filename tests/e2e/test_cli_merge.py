"""``hf-merge merge --push-to-hub`` end to end: a subprocess, the local Hub server, the real client."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from _cli import EVAL_LIMIT, TASK, assert_same_weights, hf_merge, state_dict
from huggingface_hub import ModelCard

REPO = "alice/cli-merged"
SPACE = "alice/cli-merged-demo"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pushed(seeded_hub, alice_token, tmp_path_factory):
    output = tmp_path_factory.mktemp("cli-merge") / "out"
    experts = seeded_hub.experts[:4]
    result = hf_merge(
        ["merge", "--base", seeded_hub.base, "--experts", *experts, "--method", "opcm", "--alpha", "0.5",
         "--eval", *[TASK] * 4, "--eval-every-step", "--eval-limit", EVAL_LIMIT,
         "--output", str(output), "--push-to-hub", REPO, "--space", SPACE, "--token", alice_token]
    )
    assert result.returncode == 0, result.stderr
    return output, result, experts


def test_pushed_model_loads_with_the_local_weights(pushed, seeded_hub):
    output, _, _ = pushed
    local = state_dict(output)
    assert_same_weights(state_dict(REPO), local)
    base = state_dict(seeded_hub.base_dir)
    # The vision tower moved, the text tower is the base's.
    assert not torch.equal(local["vision_model.encoder.layers.0.mlp.fc1.weight"], base["vision_model.encoder.layers.0.mlp.fc1.weight"])
    assert torch.equal(local["text_model.encoder.layers.0.mlp.fc1.weight"], base["text_model.encoder.layers.0.mlp.fc1.weight"])


def test_one_commit_holds_everything(pushed, hub_api):
    files = set(hub_api.list_repo_files(REPO))
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json", "README.md",
            "recipe.yaml", "merge_state.json", "eval_results.json", "accuracy.png"} <= files
    titles = [c.title for c in hub_api.list_repo_commits(REPO)]
    assert [t for t in titles if t.startswith("hf-merge")] == [f"hf-merge: upload merged model ({len(files) - 1} files)"]


def test_card_metadata(pushed, seeded_hub):
    _, _, experts = pushed
    card = ModelCard.load(REPO)
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert data.base_model == [seeded_hub.base, *experts]
    assert data.get("base_model_relation") == "merge"
    assert data.tags == ["merge", "hf-merge", "opcm", "continual-merging", "clip"]
    assert data.license == "other"  # the tiny models declare no license: flagged in the body
    assert "License check needed" in card.text
    assert data.eval_results and data.eval_results[0].metric_type == "accuracy"
    assert data.eval_results[0].dataset_name == TASK
    report = json.loads((pushed[0] / "eval_results.json").read_text())
    assert data.eval_results[0].metric_value == pytest.approx(report["accuracy_matrix"][-1][0], abs=1e-4)
    card.validate()  # the server's /api/validate-yaml


def test_card_body(pushed, seeded_hub):
    output, _, experts = pushed
    text = (output / "README.md").read_text()
    assert "arxiv.org/abs/2501.09522" in text and "| alpha | `0.5` |" in text
    for step, repo in enumerate(experts, start=1):
        assert re.search(rf"\| {step} \| \[{re.escape(repo)}\]\(.*\) \| `{seeded_hub.commits[repo]}` \|", text), repo
    assert text.count("\n| 4 | ") == 2  # lineage row and accuracy row of step 4
    assert "![Accuracy after each merge step](accuracy.png)" in text
    assert (output / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recipe_block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block)["experts"] == experts


def test_usage_snippet_runs_as_written(pushed):
    card = ModelCard.load(REPO)
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'model="{REPO}"' in snippet
    namespace: dict = {}
    exec(compile(snippet, "card-snippet", "exec"), namespace)
    predictions = namespace["classifier"](namespace["image"], candidate_labels=["a", "b"])
    assert {p["label"] for p in predictions} == {"a", "b"}


def test_summary_table_and_state(pushed, seeded_hub):
    output, result, experts = pushed
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["step", "expert", "commit", "avg", "acc"]
    assert [line.split()[1] for line in lines[1:5]] == experts
    assert f"pushed: {seeded_hub.endpoint}/{REPO}/commit/" in result.stdout
    state = json.loads((output / "merge_state.json").read_text())
    assert [e["commit_sha"] for e in state["lineage"]] == [seeded_hub.commits[r] for r in experts]
    assert "output" not in yaml.safe_load((output / "recipe.yaml").read_text())


def test_space_is_published_and_linked(pushed, seeded_hub, hub_api):
    _, result, _ = pushed
    assert f"space: {seeded_hub.endpoint}/spaces/{SPACE}" in result.stdout
    assert hub_api.repo_exists(SPACE, repo_type="space")
    assert f"[{SPACE}]({seeded_hub.endpoint}/spaces/{SPACE})" in ModelCard.load(REPO).text


@pytest.mark.parametrize("command", [[], ["merge"], ["add"], ["card"], ["push"]])
def test_help_everywhere(command, capsys):
    from hf_merge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hf-merge" in capsys.readouterr().out


def test_evaluation_reports_the_base_and_expert_references(pushed, seeded_hub):
    """Beside the merged model's matrix: the base's zero-shot accuracy on every task and each expert's
    accuracy on its own task, as the paper's tables show them."""
    from hf_merge.evaluation import Evaluator

    output, _, _ = pushed
    report = json.loads((output / "eval_results.json").read_text())
    evaluator = Evaluator([TASK], limit=int(EVAL_LIMIT))
    base = evaluator.evaluate(str(seeded_hub.base_dir))[TASK]["accuracy"]
    assert report["base_accuracy"] == pytest.approx([base] * 4, abs=1e-6)
    experts = [evaluator.evaluate(str(d))[TASK]["accuracy"] for d in seeded_hub.expert_dirs[:4]]
    assert report["expert_accuracy"] == pytest.approx(experts, abs=1e-6)
