"""The token never appears in stdout, stderr, logs, the card, the recipe or the state files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download

REPO = "alice/token-hygiene"
pytestmark = pytest.mark.slow


def _run(args, env_extra):
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_VERBOSITY": "debug", **env_extra}
    process = subprocess.run([sys.executable, "-m", "hf_merge.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    return process


def _files_containing(root: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_token_is_never_written_or_printed(seeded_hub, alice_token, bob_token, tmp_path):
    output = tmp_path / "merged"
    merged = _run(
        ["merge", "--base", seeded_hub.base, "--experts", *seeded_hub.experts[:2], "--eval", "synthetic/colors",
         "--eval-limit", "8", "--output", str(output), "--push-to-hub", REPO, "--token", alice_token, "-v"],
        {},
    )
    assert merged.returncode == 0, merged.stderr
    # The logs were on (ours and the Hub client's request log), so the absence of the token means something.
    assert "INFO hf_merge" in merged.stderr and "authenticated" in merged.stderr

    # Continue with the token from the environment, and fail a push with another user's token.
    added = _run(["add", REPO, "--experts", seeded_hub.experts[2], "--output", str(tmp_path / "added"), "-v"],
                 {"HF_TOKEN": alice_token})
    assert added.returncode == 0, added.stderr
    refused = _run(["push", str(output), "--repo-id", "alice/token-hygiene-refused", "--token", bob_token, "-v"], {})
    assert refused.returncode == 1 and "retry with: hf-merge push" in refused.stderr

    for process in (merged, added, refused):
        for secret in (alice_token, bob_token):
            assert secret not in process.stdout and secret not in process.stderr

    published = Path(snapshot_download(REPO, token=alice_token, local_dir=tmp_path / "published"))
    checked = [output, tmp_path / "added", published, Path(os.environ["HF_HOME"])]
    for root in checked:
        for secret in (alice_token, bob_token):
            assert _files_containing(root, secret) == [], root
    for name in ("README.md", "recipe.yaml", "merge_state.json", "eval_results.json"):
        assert (output / name).is_file() and (published / name).is_file(), name
