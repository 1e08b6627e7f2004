"""``hf-merge add``: continue a merged repo from its merge state; equal to merging everything at once."""

from __future__ import annotations

import json

import pytest
from _cli import EVAL_LIMIT, TASK, assert_same_weights, hf_merge, state_dict
from huggingface_hub import ModelCard, hf_hub_download

from hf_merge.api import add, merge

REPO = "alice/cli-continued"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def continued(seeded_hub, alice_token, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-add")
    first = hf_merge(
        ["merge", "--base", seeded_hub.base, "--experts", *seeded_hub.experts[:4], "--alpha", "0.5",
         "--eval", *[TASK] * 4, "--eval-every-step", "--eval-limit", EVAL_LIMIT,
         "--output", str(root / "first"), "--push-to-hub", REPO, "--token", alice_token]
    )
    assert first.returncode == 0, first.stderr
    second = hf_merge(
        ["add", REPO, "--experts", *seeded_hub.experts[4:6], "--eval", TASK, TASK,
         "--output", str(root / "second"), "--token", alice_token]
    )
    assert second.returncode == 0, second.stderr
    return root, second


def test_add_equals_one_run_merge_of_all_six(continued, seeded_hub):
    root, _ = continued
    one_run = merge(base=seeded_hub.base, experts=seeded_hub.experts[:6], method="opcm",
                    parameters={"alpha": 0.5}, output=str(root / "one-run"))
    assert [s["repo_id"] for s in one_run.steps] == seeded_hub.experts[:6]
    assert_same_weights(state_dict(REPO), state_dict(root / "one-run"), atol=1e-6)
    # ...and the continuation really moved the weights past the 4-expert model.
    four = state_dict(root / "first")
    name = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    assert not (state_dict(REPO)[name] - four[name]).abs().max() < 1e-6


def test_repo_has_one_commit_per_run(continued, hub_api):
    titles = [c.title for c in hub_api.list_repo_commits(REPO)]
    ours = [t for t in titles if t.startswith("hf-merge")]
    assert len(ours) == 2
    assert ours[0].startswith("hf-merge: add 2 experts")  # newest first


def test_lineage_lists_six_experts_with_their_commits(continued, seeded_hub):
    state = json.loads(open(hf_hub_download(REPO, "merge_state.json")).read())
    assert state["step"] == 6
    assert [(e["repo_id"], e["commit_sha"], e["step"]) for e in state["lineage"]] == [
        (repo, seeded_hub.commits[repo], step) for step, repo in enumerate(seeded_hub.experts[:6], start=1)
    ]
    card = ModelCard.load(REPO)
    assert card.data.base_model == [seeded_hub.base, *seeded_hub.experts[:6]]
    for repo in seeded_hub.experts[:6]:
        assert f"`{seeded_hub.commits[repo]}`" in card.text
    recipe = hf_hub_download(REPO, "recipe.yaml")
    assert open(recipe).read().count("tiny-clip-expert-") == 6


def test_evaluation_continues_row_by_row(continued):
    report = json.loads(open(hf_hub_download(REPO, "eval_results.json")).read())
    assert len(report["accuracy_matrix"]) == 6
    assert [len([v for v in row if v is not None]) for row in report["accuracy_matrix"]] == [1, 2, 3, 4, 5, 6]
    # The references grow with the merge: the base on all six tasks, each expert on its own.
    assert len(report["base_accuracy"]) == 6 and None not in report["base_accuracy"]
    assert len(report["expert_accuracy"]) == 6 and None not in report["expert_accuracy"]
    text = ModelCard.load(REPO).text
    assert "\n| 6 | " in text and "backward transfer" in text


def test_add_as_pull_request_with_a_local_expert(continued, seeded_hub, alice_token, hub_api, tmp_path):
    from hf_merge.testing.tiny_clip import make_expert

    expert = make_expert(seeded_hub.base_dir, tmp_path / "local-expert", seed=4242)
    main_before = hub_api.model_info(REPO).sha
    result = add(REPO, [str(expert)], token=alice_token, output=tmp_path / "pr", create_pr=True)
    assert result.commit_url and "/discussions/" in result.commit_url
    assert hub_api.model_info(REPO).sha == main_before  # main untouched until the PR is merged
    assert [s.get("repo_id") for s in result.steps][-1] is None and len(result.steps) == 7


def test_another_user_proposes_an_expert_as_a_pull_request(continued, seeded_hub, bob_token, hub_api, hub_url, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from hf_merge.testing.tiny_clip import make_expert

    bob = HfApi(endpoint=hub_url, token=bob_token)
    proposal = "bob/tiny-clip-proposal"
    bob.create_repo(proposal, exist_ok=True)
    sha = bob.upload_folder(repo_id=proposal, folder_path=make_expert(seeded_hub.base_dir, tmp_path / "ft", seed=777),
                            commit_message="Add fine-tune").oid
    main_before = hub_api.model_info(REPO).sha
    done = hf_merge(["add", REPO, "--experts", proposal, "--create-pr", "--output", str(tmp_path / "proposal"),
                     "--token", bob_token])
    assert done.returncode == 0, done.stderr
    assert hub_api.model_info(REPO).sha == main_before  # alice's main is untouched until she merges
    pr = next(d for d in hub_api.get_repo_discussions(REPO) if d.author == "bob")
    assert pr.is_pull_request and pr.status == "open" and pr.title == f"hf-merge: add 1 expert ({proposal})"
    state = json.loads(open(hf_hub_download(REPO, "merge_state.json", revision=pr.git_reference)).read())
    assert state["lineage"][-1]["repo_id"] == proposal and state["lineage"][-1]["commit_sha"] == sha
    # Bob cannot merge his own proposal; alice can.
    with pytest.raises(HfHubHTTPError) as refused:
        bob.merge_pull_request(REPO, pr.num)
    assert refused.value.response.status_code == 403
    hub_api.merge_pull_request(REPO, pr.num)
    merged = json.loads(open(hf_hub_download(REPO, "merge_state.json")).read())
    assert merged["lineage"][-1]["repo_id"] == proposal and merged["step"] == state["step"]


def test_already_merged_expert_is_a_usage_error(continued, seeded_hub, alice_token, tmp_path, capsys):
    from hf_merge.cli import main

    code = main(["add", REPO, "--experts", seeded_hub.experts[1], "--output", str(tmp_path / "x"), "--token", alice_token, "-q"])
    assert code == 2
    assert "already merged" in capsys.readouterr().err
