"""``accelerate launch`` of the CLI itself: two CPU ranks merge by repo id, the main rank alone
writes and publishes, and the pushed weights equal a one-process merge."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from _cli import assert_same_weights, hf_merge, state_dict

REPO = "alice/cli-two-ranks"
pytestmark = pytest.mark.slow


def test_two_ranks_publish_once_and_match_one_process(seeded_hub, alice_token, hub_api, tmp_path):
    experts = seeded_hub.experts[:3]
    args = ["merge", "--base", seeded_hub.base, "--experts", *experts, "--method", "opcm", "--token", alice_token]
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    two = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "hf_merge.cli", *args, "--output", str(tmp_path / "two"), "--push-to-hub", REPO],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # One summary (the main rank's), one commit by hf-merge.
    assert two.stdout.count("output: ") == 1, two.stdout
    titles = [c.title for c in hub_api.list_repo_commits(REPO)]
    assert len([t for t in titles if t.startswith("hf-merge")]) == 1, titles

    one = hf_merge([*args, "--output", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    assert_same_weights(state_dict(REPO), state_dict(tmp_path / "one"), atol=1e-6)
