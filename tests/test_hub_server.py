"""The local Hub server through the real ``huggingface_hub`` client: every operation hf-merge uses."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import httpx
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils.sha import git_hash

LFS_SIZE = 10 * 1024 * 1024 + 4096  # above the Hub's 10 MB limit for regular files

README = """---
license: mit
base_model: openai/clip-vit-base-patch32
tags:
- clip
- merged
library_name: transformers
---
# A test model
"""


def _repo(hub_api, prefix: str, **kwargs) -> str:
    repo_id = f"alice/{prefix}-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(repo_id, **kwargs)
    return repo_id


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "model.safetensors"
    path.write_bytes(os.urandom(LFS_SIZE))
    return path


@pytest.fixture(scope="module")
def uploaded(hub_api, big_file, tmp_path_factory):
    """A model repo with a README, a config, a nested file and an LFS file over 10 MB."""
    folder = tmp_path_factory.mktemp("upload")
    (folder / "README.md").write_text(README)
    (folder / "config.json").write_text('{"model_type": "clip"}')
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (folder / "model.safetensors").write_bytes(big_file.read_bytes())
    repo_id = _repo(hub_api, "upload")
    info = hub_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Add model")
    return repo_id, folder, info


def test_whoami(hub_api):
    assert hub_api.whoami()["name"] == "alice"


def test_create_repo_model_space_private_and_dataset(hub_api, hub_url, tmp_path):
    model = _repo(hub_api, "model")
    assert hub_api.model_info(model).private is False
    assert hub_api.create_repo(model, exist_ok=True).repo_id == model  # 409 is accepted with exist_ok

    private = _repo(hub_api, "private", private=True)
    assert hub_api.model_info(private).private is True

    space = _repo(hub_api, "space", repo_type="space", space_sdk="gradio")
    assert hub_api.space_info(space).sdk == "gradio"
    url = hub_api.create_repo(space, repo_type="space", space_sdk="gradio", exist_ok=True)
    assert url == f"{hub_url}/spaces/{space}"
    hub_api.upload_file(path_or_fileobj=b"import gradio\n", path_in_repo="app.py", repo_id=space, repo_type="space")
    app = hf_hub_download(space, "app.py", repo_type="space", cache_dir=tmp_path)
    assert Path(app).read_bytes() == b"import gradio\n"

    dataset = _repo(hub_api, "data", repo_type="dataset")
    hub_api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id=dataset, repo_type="dataset")
    assert hub_api.list_repo_files(dataset, repo_type="dataset") == [".gitattributes", "data.csv"]


def test_upload_folder_with_lfs_then_download(uploaded, hub_api, tmp_path):
    repo_id, folder, info = uploaded
    assert len(info.oid) == 40
    assert hub_api.list_repo_files(repo_id) == [
        ".gitattributes", "README.md", "config.json", "model.safetensors", "tokenizer/vocab.txt",
    ]
    big, config = hub_api.get_paths_info(repo_id, ["model.safetensors", "config.json"])
    expected_sha256 = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert big.lfs is not None and big.lfs.sha256 == expected_sha256 and big.size == LFS_SIZE
    assert config.lfs is None and config.blob_id == git_hash((folder / "config.json").read_bytes())

    snapshot = Path(snapshot_download(repo_id, cache_dir=tmp_path / "cache"))
    assert snapshot.name == info.oid
    for name in ("README.md", "config.json", "tokenizer/vocab.txt", "model.safetensors"):
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes(), name

    single = hf_hub_download(repo_id, "tokenizer/vocab.txt", cache_dir=tmp_path / "other")
    assert Path(single).read_text() == "a\nb\n"


def test_model_info_card_data_and_list_models(uploaded, hub_api):
    repo_id, _, info = uploaded
    model = hub_api.model_info(repo_id, files_metadata=True)
    assert model.sha == info.oid
    assert model.card_data["base_model"] == "openai/clip-vit-base-patch32"
    assert {"base_model:openai/clip-vit-base-patch32", "clip", "merged", "license:mit", "safetensors"} <= set(
        model.tags
    )
    siblings = {sibling.rfilename: sibling for sibling in model.siblings}
    assert siblings["model.safetensors"].lfs.size == LFS_SIZE

    found = [m.id for m in hub_api.list_models(filter="base_model:openai/clip-vit-base-patch32")]
    assert repo_id in found
    assert repo_id not in [m.id for m in hub_api.list_models(filter="base_model:someone/else")]
    assert [m.id for m in hub_api.list_models(search=repo_id.split("/")[1])] == [repo_id]
    assert repo_id in [m.id for m in hub_api.list_models(author="alice")]
    by_bob = [m.id for m in hub_api.list_models(author="bob")]  # other tests may have given bob repos
    assert repo_id not in by_bob and all(m.startswith("bob/") for m in by_bob)
    listed = next(iter(hub_api.list_models(search=repo_id.split("/")[1], full=True)))
    assert listed.sha == info.oid and "README.md" in [s.rfilename for s in listed.siblings]


def test_create_commit_adds_deletes_and_skips_unchanged(hub_api, tmp_path):
    repo_id = _repo(hub_api, "commit")
    first = hub_api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("a.txt", b"A"),
            CommitOperationAdd("dir/b.txt", b"B"),
            CommitOperationAdd("dir/c.bin", b"\0binary"),  # binary content goes through LFS
        ],
        commit_message="first",
    )
    paths = hub_api.get_paths_info(repo_id, ["dir/c.bin"])
    assert paths[0].lfs is not None
    second = hub_api.create_commit(
        repo_id,
        operations=[CommitOperationDelete("a.txt"), CommitOperationDelete("dir/", is_folder=True)],
        commit_message="second",
        parent_commit=first.oid,
    )
    assert hub_api.list_repo_files(repo_id) == [".gitattributes"]
    before = hub_api.list_repo_files(repo_id, revision=first.oid)
    assert before == [".gitattributes", "a.txt", "dir/b.txt", "dir/c.bin"]
    commits = hub_api.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits[:2]] == [second.oid, first.oid]
    assert [c.title for c in commits] == ["second", "first", "initial commit"]
    # The preupload oid lets the client skip files that did not change: no new commit.
    hub_api.upload_file(path_or_fileobj=b"same", path_in_repo="s.txt", repo_id=repo_id)
    head = hub_api.model_info(repo_id).sha
    again = hub_api.upload_file(path_or_fileobj=b"same", path_in_repo="s.txt", repo_id=repo_id)
    assert again.oid == head == hub_api.model_info(repo_id).sha


def test_create_branch_and_pull_request(hub_api, tmp_path):
    repo_id = _repo(hub_api, "branch")
    main = hub_api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo_id)
    hub_api.create_branch(repo_id, branch="dev")
    hub_api.create_branch(repo_id, branch="dev", exist_ok=True)
    with pytest.raises(Exception) as conflict:
        hub_api.create_branch(repo_id, branch="dev")
    assert conflict.value.response.status_code == 409
    dev = hub_api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo_id, revision="dev")
    pr = hub_api.upload_file(path_or_fileobj=b"v3", path_in_repo="f.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"

    refs = hub_api.list_repo_refs(repo_id, include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main.oid, "dev": dev.oid}
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]

    def read(revision: str) -> bytes:
        return Path(hf_hub_download(repo_id, "f.txt", revision=revision, cache_dir=tmp_path)).read_bytes()

    assert (read("main"), read("dev"), read("refs/pr/1"), read(main.oid)) == (b"v1", b"v2", b"v3", b"v1")
    second = hub_api.upload_file(path_or_fileobj=b"x", path_in_repo="g.txt", repo_id=repo_id, create_pr=True)
    assert second.pr_num == 2


def test_resolve_headers_range_and_errors(uploaded, hub_url, hub_api, tmp_path):
    repo_id, folder, info = uploaded
    data = (folder / "model.safetensors").read_bytes()
    url = f"{hub_url}/{repo_id}/resolve/main/model.safetensors"
    head = httpx.head(url)
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == info.oid
    assert head.headers["ETag"].strip('"') == hashlib.sha256(data).hexdigest()
    assert head.headers["X-Linked-Size"] == str(LFS_SIZE)
    assert "X-Xet-Hash" not in head.headers
    ranged = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == data[10:20]
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{LFS_SIZE}"
    regular = httpx.head(f"{hub_url}/{repo_id}/resolve/main/config.json")
    assert regular.headers["ETag"].strip('"') == git_hash((folder / "config.json").read_bytes())
    assert "X-Linked-Etag" not in regular.headers

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hub_api.model_info(repo_id, revision="no-such-branch")


def test_tree_listing_and_delete_repo(uploaded, hub_api):
    repo_id, _, _ = uploaded
    top = {entry.path for entry in hub_api.list_repo_tree(repo_id)}
    assert top == {".gitattributes", "README.md", "config.json", "model.safetensors", "tokenizer"}
    assert {e.path for e in hub_api.list_repo_tree(repo_id, path_in_repo="tokenizer")} == {"tokenizer/vocab.txt"}
    assert "tokenizer/vocab.txt" in {e.path for e in hub_api.list_repo_tree(repo_id, recursive=True)}

    doomed = _repo(hub_api, "doomed")
    assert hub_api.repo_exists(doomed)
    hub_api.delete_repo(doomed)
    assert not hub_api.repo_exists(doomed)
    hub_api.delete_repo(doomed, missing_ok=True)


def test_tags_branch_deletion_settings_and_card_validation(hub_api, tmp_path):
    repo_id = _repo(hub_api, "misc")
    first = hub_api.upload_file(path_or_fileobj=b"1", path_in_repo="v.txt", repo_id=repo_id)
    hub_api.create_tag(repo_id, tag="v1.0")
    hub_api.upload_file(path_or_fileobj=b"2", path_in_repo="v.txt", repo_id=repo_id)
    refs = hub_api.list_repo_refs(repo_id)
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", first.oid)]
    assert Path(hf_hub_download(repo_id, "v.txt", revision="v1.0", cache_dir=tmp_path)).read_bytes() == b"1"

    hub_api.create_branch(repo_id, branch="feature", revision=first.oid)
    assert hub_api.model_info(repo_id, revision="feature").sha == first.oid
    hub_api.delete_branch(repo_id, branch="feature")
    assert [b.name for b in hub_api.list_repo_refs(repo_id).branches] == ["main"]

    hub_api.update_repo_settings(repo_id, private=True)
    assert hub_api.model_info(repo_id).private is True

    with pytest.raises(ValueError, match="Invalid metadata"):
        hub_api.upload_file(path_or_fileobj=b"---\n[unclosed\n---\n", path_in_repo="README.md", repo_id=repo_id)
    with pytest.raises(EntryNotFoundError):
        hub_api.delete_file("not-there.txt", repo_id=repo_id)
