"""An all-at-once method (Iso-CTS) from the command line: merged by repo id with the final model
evaluated once, and refused in one line by ``add``, the watcher and an out-of-range parameter."""

from __future__ import annotations

import json

import pytest
from _cli import EVAL_LIMIT, TASK, error_lines, hf_merge
from huggingface_hub import ModelCard

REPO = "alice/cli-iso-cts"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def merged(seeded_hub, alice_token, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-iso-cts")
    run = hf_merge(
        ["merge", "--base", seeded_hub.base, "--experts", *seeded_hub.experts[:3], "--method", "iso_cts",
         "--scaling", "1.5", "--eval", *[TASK] * 3, "--eval-every-step", "--eval-limit", EVAL_LIMIT,
         "--output", str(root / "out"), "--push-to-hub", REPO, "--token", alice_token]
    )
    assert run.returncode == 0, run.stderr
    return root, run


def test_merge_by_repo_id_records_every_expert_and_evaluates_the_final_model_once(merged, seeded_hub):
    root, run = merged
    assert "iso_cts merges every expert at once, so there is no model between steps: evaluating the final model only" in run.stderr
    state = json.loads((root / "out" / "merge_state.json").read_text())
    assert state["method"] == "iso_cts" and state["step"] == 3
    assert state["hyperparameters"] == {"scaling_factor": 1.5, "common_space_fraction": 0.8}
    assert [(e["repo_id"], e["commit_sha"], e["step"]) for e in state["lineage"]] == [
        (repo, seeded_hub.commits[repo], i) for i, repo in enumerate(seeded_hub.experts[:3], start=1)]
    results = json.loads((root / "out" / "eval_results.json").read_text())
    assert [row["step"] for row in results["steps"]] == [3]
    card = ModelCard.load(root / "out" / "README.md")
    assert "with **Iso-CTS (isotropic merging in common and task-specific subspaces)**, all experts at once" in card.text
    assert "continual-merging" not in card.data.tags and "iso_cts" in card.data.tags
    assert all(repo in card.text for repo in seeded_hub.experts[:3])


def test_add_refuses_in_one_line_before_downloading(merged, seeded_hub, alice_token, tmp_path):
    run = hf_merge(["add", REPO, "--experts", seeded_hub.experts[3], "--output", str(tmp_path / "more"),
                    "--token", alice_token])
    assert run.returncode == 2
    (line,) = error_lines(run.stderr)
    assert line == (f"hf-merge: error: {REPO} was merged with 'iso_cts', which merges every expert at once and cannot "
                     "take one more; re-run `hf-merge merge` with all the experts, the merged ones and the new")
    assert not (tmp_path / "more").exists()
    local = hf_merge(["add", str(merged[0] / "out"), "--experts", seeded_hub.experts[3]])
    assert local.returncode == 2 and "re-run `hf-merge merge`" in error_lines(local.stderr)[0]


def test_the_watcher_refuses_in_one_line(merged, alice_token, tmp_path):
    run = hf_merge(["watch", REPO, "--once", "--work-dir", str(tmp_path / "watch"), "--token", alice_token])
    assert run.returncode == 2
    (line,) = error_lines(run.stderr)
    assert "merges every expert at once and cannot take one more; re-run `hf-merge merge`" in line  # as add says


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "iso_cts", "--param", "common_space_fraction=1.5"],
     "method 'iso_cts': parameter 'common_space_fraction' must be in [0, 1], got 1.5"),
    (["--method", "wudi", "--param", "iter_num=-1"], "method 'wudi': parameter 'iter_num' must be in [0, inf), got -1"),
])
def test_a_parameter_out_of_range_is_refused_before_any_download(args, message, seeded_hub, tmp_path):
    home = tmp_path / "hf-home"
    run = hf_merge(["merge", "--base", seeded_hub.base, "--experts", *seeded_hub.experts[:2], *args,
                    "--output", str(tmp_path / "out")], env={"HF_HOME": str(home)})
    assert run.returncode == 2
    (line,) = error_lines(run.stderr)
    assert line == f"hf-merge: error: {message}"
    assert not (tmp_path / "out").exists()
    assert not [p for p in home.rglob("*") if p.is_file()]  # nothing downloaded, not even a config
