"""SIGKILL of a watcher in the middle of a candidate, then a restart: the same result as no crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file

from hf_merge.testing.watch_models import fine_tune, lineage_of, merged_repo, publish
from hf_merge.watch.runner import PAUSE_ENV

pytestmark = pytest.mark.slow


def _watch_once(repo: str, work, token: str, pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = f"{pause}:300"
    return subprocess.Popen([sys.executable, "-m", "hf_merge.cli", "watch", repo, "--once", "--work-dir", str(work),
                             "--token", token, "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(repo: str) -> dict[str, torch.Tensor]:
    return load_file(hf_hub_download(repo, "model.safetensors", force_download=True))


@pytest.fixture(scope="module")
def twins(hub_api, alice_token, carol_token, hub_url, tiny_base, tiny_experts, tmp_path_factory):
    """Three merged repos with the same content, each with the same fine-tune pushed for it."""
    work = tmp_path_factory.mktemp("watch-crash")
    carol = HfApi(endpoint=hub_url, token=carol_token)
    repos = {}
    for name in ("calm", "killed-merging", "killed-pushing"):
        repo, base = merged_repo(hub_api, alice_token, f"watch-crash-{name}", tiny_base, tiny_experts[:2], work)
        folder = fine_tune(tiny_base, work / f"ft-{name}", base, seed=5151)
        repos[name] = (repo, f"carol/watch-crash-{name}-ft", publish(carol, f"carol/watch-crash-{name}-ft", folder))
    return repos, work


@pytest.mark.parametrize("name, point", [("killed-merging", "merged"), ("killed-pushing", "ready")])
def test_sigkill_then_restart_gives_the_uninterrupted_result(twins, alice_token, hub_url, name, point):
    repos, work = twins
    calm_repo, calm_ft, calm_sha = repos["calm"]
    if ("carol/watch-crash-calm-ft", calm_sha) not in lineage_of(calm_repo):
        calm = _watch_once(calm_repo, work / "w-calm", alice_token)
        assert calm.wait(timeout=300) == 0, calm.stderr.read()
    repo, ft, sha = repos[name]
    commits_before = len(HfApi(endpoint=hub_url).list_repo_commits(repo))

    process = _watch_once(repo, work / f"w-{name}", alice_token, pause=point)
    marker = work / f"w-{name}" / f".paused-{point}"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert len(HfApi(endpoint=hub_url).list_repo_commits(repo)) == commits_before  # nothing pushed yet

    restarted = _watch_once(repo, work / f"w-{name}", alice_token)
    assert restarted.wait(timeout=300) == 0, restarted.stderr.read()
    assert lineage_of(repo)[-1] == (ft, sha)
    assert [e for e, _ in lineage_of(repo)].count(ft) == 1
    titles = [c.title for c in HfApi(endpoint=hub_url).list_repo_commits(repo)]
    assert len(titles) == commits_before + 1 and titles[0] == f"hf-merge watch: add {ft}@{sha[:10]}"
    calm, crashed = _weights(calm_repo), _weights(repo)
    assert calm.keys() == crashed.keys()
    for tensor in calm:
        assert torch.equal(calm[tensor], crashed[tensor]), tensor

    # A third run finds nothing to do.
    again = _watch_once(repo, work / f"w-{name}", alice_token)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert out == "" and len(HfApi(endpoint=hub_url).list_repo_commits(repo)) == commits_before + 1
