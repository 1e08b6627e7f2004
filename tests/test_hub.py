"""Hub I/O through the local Hub server and the real client: download, errors, eviction, push."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from hf_merge.errors import AuthenticationError, CheckpointError, ModelNotFoundError, PushError
from hf_merge.hub import client as hub
from hf_merge.hub import sources
from hf_merge.hub.push import push_merge
from hf_merge.hub.sources import resolve


@pytest.fixture(scope="module")
def private_repo(hub_api, tiny_base) -> str:
    repo_id = "alice/hub-test-private"
    hub_api.create_repo(repo_id, private=True, exist_ok=True)
    hub_api.upload_folder(repo_id=repo_id, folder_path=tiny_base)
    return repo_id


@pytest.fixture(scope="module")
def two_commit_repo(hub_api, tiny_base, tmp_path_factory) -> tuple[str, str, str]:
    """A repo whose second commit adds a file and touches the weights; returns (repo, sha1, sha2)."""
    repo_id = "alice/hub-test-history"
    hub_api.create_repo(repo_id, exist_ok=True)
    first = hub_api.upload_folder(repo_id=repo_id, folder_path=tiny_base).oid
    extra = tmp_path_factory.mktemp("extra")
    (extra / "notes.txt").write_text("not a model file")
    (extra / "optimizer.pt").write_bytes(b"pickle bytes")
    (extra / "model.safetensors").write_bytes((tiny_base / "model.safetensors").read_bytes())
    second = hub_api.upload_folder(repo_id=repo_id, folder_path=extra).oid
    return repo_id, first, second


def test_loopback_endpoint_disables_xet(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    hub.prepare_client()
    assert constants.HF_HUB_DISABLE_XET is True


def test_download_records_commit_and_fetches_only_model_files(seeded_hub, two_commit_repo):
    source = sources.download_model(seeded_hub.base)
    assert source.repo_id == seeded_hub.base and source.revision is None
    assert source.commit_sha == seeded_hub.commits[seeded_hub.base]
    names = {p.name for p in source.path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= names

    repo_id, _, second = two_commit_repo
    latest = sources.download_model(repo_id)
    assert latest.commit_sha == second
    names = {p.name for p in latest.path.iterdir()}
    assert "notes.txt" not in names and "optimizer.pt" not in names and "model.safetensors" in names


def test_download_pinned_revision(two_commit_repo):
    repo_id, first, second = two_commit_repo
    pinned = resolve(f"{repo_id}@{first}")
    assert pinned.commit_sha == first and pinned.revision == first
    assert pinned.name == f"{repo_id}@{first}"
    assert first != second


def _one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message and message
    return message


def test_unknown_repo_and_revision(seeded_hub):
    with pytest.raises(ModelNotFoundError) as info:
        sources.download_model("alice/does-not-exist")
    assert "alice/does-not-exist" in _one_line(info.value) and info.value.exit_code == 1
    with pytest.raises(ModelNotFoundError) as info:
        sources.download_model(seeded_hub.base, revision="no-such-branch")
    assert "revision 'no-such-branch' not found" in _one_line(info.value)


def test_private_repo_needs_the_owners_token(private_repo, alice_token, bob_token):
    with pytest.raises(ModelNotFoundError) as info:
        sources.download_model(private_repo)
    assert "--token" in _one_line(info.value)  # says how to authenticate
    with pytest.raises(ModelNotFoundError):
        sources.download_model(private_repo, token=bob_token)
    with pytest.raises(AuthenticationError) as info:
        sources.download_model(private_repo, token="hf_not_a_real_token")
    assert "hf_not_a_real_token" not in _one_line(info.value)
    assert sources.download_model(private_repo, token=alice_token).commit_sha


def test_token_from_environment(private_repo, alice_token, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", alice_token)
    assert hub.resolve_token() == alice_token
    assert hub.resolve_token("explicit") == "explicit"
    assert sources.download_model(private_repo).repo_id == private_repo


def test_pickle_only_repo_is_refused_unless_allowed(hub_api, tiny_base, tmp_path):
    folder = tmp_path / "pickle-model"
    folder.mkdir()
    shutil.copy(tiny_base / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    repo_id = "alice/hub-test-pickle"
    hub_api.create_repo(repo_id, exist_ok=True)
    hub_api.upload_folder(repo_id=repo_id, folder_path=folder)
    with pytest.raises(CheckpointError) as info:
        sources.download_model(repo_id)
    assert "--allow-pickle" in _one_line(info.value) and "pytorch_model.bin" in str(info.value)
    source = sources.download_model(repo_id, allow_pickle=True)
    assert (source.path / "pytorch_model.bin").is_file()


def test_evict_deletes_the_snapshot_but_never_a_local_folder(seeded_hub, tiny_base):
    source = sources.download_model(seeded_hub.experts[5])
    assert source.path.is_dir()
    assert sources.evict(source) is True
    assert not source.path.exists()
    local = resolve(str(tiny_base))
    assert sources.evict(local) is False and tiny_base.is_dir()
    # Downloading again after eviction works (the cache is consistent).
    assert sources.download_model(seeded_hub.experts[5]).path.is_dir()


def _fake_result(tiny_base: Path, folder: Path) -> Path:
    shutil.copytree(tiny_base, folder)
    (folder / "merge_state.json").write_text(json.dumps({"method": "opcm", "step": 1}))
    (folder / "recipe.yaml").write_text("base: x\nexperts: [y]\n")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# merged\n")
    (folder / ".hf-merge-staging").mkdir()
    (folder / "scratch.log").write_text("not published")
    return folder


def test_push_sends_one_commit_with_the_result_files(hub_api, alice_token, tiny_base, tmp_path):
    folder = _fake_result(tiny_base, tmp_path / "result")
    published = {str(p) for p in hub.publishable_files(folder)}
    assert {"model.safetensors", "config.json", "merge_state.json", "recipe.yaml", "README.md", "tokenizer.json"} <= published
    assert "scratch.log" not in published and ".hf-merge-staging" not in published
    url = push_merge(folder, "alice/hub-test-push", token=alice_token, commit_message="first")
    assert "alice/hub-test-push" in url
    commits = hub_api.list_repo_commits("alice/hub-test-push")
    assert [c.title for c in commits][0] == "first"
    files = set(hub_api.list_repo_files("alice/hub-test-push"))
    assert published <= files and "scratch.log" not in files


def test_refused_push_keeps_the_folder_and_gives_the_retry_command(bob_token, alice_token, hub_api, tiny_base, tmp_path):
    folder = _fake_result(tiny_base, tmp_path / "result")
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    with pytest.raises(PushError) as info:
        push_merge(folder, "alice/hub-test-refused", token=bob_token, private=True)
    error = info.value
    assert "403" in _one_line(error) and str(folder) in str(error)
    assert error.retry_command == f"hf-merge push {folder} --repo-id alice/hub-test-refused --private"
    assert bob_token not in str(error) and bob_token not in error.retry_command
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before
    assert not hub_api.repo_exists("alice/hub-test-refused")
    push_merge(folder, "alice/hub-test-refused", token=alice_token, private=True)
    assert hub_api.repo_info("alice/hub-test-refused").private


def test_push_to_unreachable_endpoint_is_a_push_error(tiny_base, tmp_path, monkeypatch):
    folder = _fake_result(tiny_base, tmp_path / "result")
    monkeypatch.setattr(hub, "endpoint", lambda: "http://127.0.0.1:9")
    with pytest.raises(PushError) as info:
        push_merge(folder, "alice/unreachable", token="hf_secret_value")
    assert "intact" in _one_line(info.value) and "hf_secret_value" not in str(info.value)
    assert info.value.retry_command.startswith("hf-merge push ")


def test_merge_with_evict_leaves_no_expert_in_the_cache(seeded_hub, tmp_path):
    from huggingface_hub import scan_cache_dir

    from hf_merge.api import merge

    experts = seeded_hub.experts[3:5]
    for repo in experts:  # a cached copy from an earlier test must not hide a missing eviction
        sources.evict(sources.download_model(repo))
    result = merge(base=seeded_hub.base, experts=experts, output=str(tmp_path / "out"), evict=True)
    assert [s["repo_id"] for s in result.steps] == experts
    cached = {repo.repo_id: len(repo.revisions) for repo in scan_cache_dir(constants.HF_HUB_CACHE).repos}
    assert all(cached.get(repo, 0) == 0 for repo in experts), cached
    assert cached.get(seeded_hub.base, 0) >= 1  # the base is kept: later merges need it
