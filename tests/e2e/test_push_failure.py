"""A push refused by the Hub (403): the local result stays, the retry command is printed and works."""

from __future__ import annotations

import shlex

import pytest
from _cli import assert_same_weights, error_lines, hf_merge, state_dict

REPO = "alice/refused-then-retried"
pytestmark = pytest.mark.slow


def test_refused_push_then_retry(seeded_hub, bob_token, alice_token, hub_api, tmp_path):
    output = tmp_path / "result"
    refused = hf_merge(
        ["merge", "--base", seeded_hub.base, "--experts", *seeded_hub.experts[:2], "--output", str(output),
         "--push-to-hub", REPO, "--private", "--token", bob_token]  # bob may not write to alice's namespace
    )
    assert refused.returncode == 1, refused.stderr
    lines = error_lines(refused.stderr)
    assert len(lines) == 2, refused.stderr
    assert lines[0].startswith("hf-merge: error: the Hub refused the push to alice/refused-then-retried (403")
    assert str(output) in lines[0]
    expected = f"hf-merge push {output} --repo-id {REPO} --private"
    assert lines[1] == f"hf-merge: retry with: {expected}"
    assert not hub_api.repo_exists(REPO)

    # The local result is complete: it loads, and has its card, recipe and state.
    for name in ("model.safetensors", "config.json", "README.md", "recipe.yaml", "merge_state.json", "tokenizer.json"):
        assert (output / name).is_file(), name
    local = state_dict(output)

    # The printed command, run as is with a token that may write, publishes the same result.
    argv = shlex.split(lines[1].split("retry with: ", 1)[1])
    assert argv[0] == "hf-merge"
    retried = hf_merge(argv[1:], env={"HF_TOKEN": alice_token})
    assert retried.returncode == 0, retried.stderr
    assert f"pushed: {seeded_hub.endpoint}/{REPO}/commit/" in retried.stdout
    info = hub_api.model_info(REPO)
    assert info.private
    assert {"model.safetensors", "README.md", "recipe.yaml", "merge_state.json"} <= {s.rfilename for s in info.siblings}
    from transformers import CLIPModel

    pushed = CLIPModel.from_pretrained(REPO, token=alice_token).state_dict()
    assert_same_weights(pushed, local)

