"""The local Hub keeps data across restarts, refuses bad uploads and stale commits, and serves threads."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from hf_merge.hub_server import LocalHubServer

TOKENS = {"carol": "carol-secret"}


def test_restart_loses_nothing(tmp_path):
    root = tmp_path / "hub"
    payload = os.urandom(3 * 1024 * 1024)
    with LocalHubServer(root, tokens=TOKENS) as first:
        api = HfApi(endpoint=first.url, token=TOKENS["carol"])
        api.create_repo("carol/persisted", private=True)
        api.create_branch("carol/persisted", branch="dev")
        info = api.create_commit(
            "carol/persisted",
            operations=[CommitOperationAdd("model.safetensors", payload), CommitOperationAdd("notes.txt", b"n")],
            commit_message="weights",
        )
        first_port = first.port

    with LocalHubServer(root, tokens=TOKENS) as second:
        assert second.port != first_port
        api = HfApi(endpoint=second.url, token=TOKENS["carol"])
        assert api.model_info("carol/persisted").sha == info.oid
        assert api.model_info("carol/persisted").private is True
        assert {b.name for b in api.list_repo_refs("carol/persisted").branches} == {"main", "dev"}
        path = hf_hub_download(
            "carol/persisted",
            "model.safetensors",
            endpoint=second.url,
            token=TOKENS["carol"],
            cache_dir=tmp_path / "c",
        )
        assert Path(path).read_bytes() == payload
        # The restarted server also takes new commits on top of the old ones.
        again = api.upload_file(path_or_fileobj=b"more", path_in_repo="more.txt", repo_id="carol/persisted")
        assert api.list_repo_commits("carol/persisted")[1].commit_id == info.oid
        assert again.oid != info.oid


def _ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def test_corrupted_lfs_upload_is_refused(hub_api, hub_url, alice_token):
    repo_id = f"alice/lfs-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(repo_id)
    good = os.urandom(4096)
    oid = hashlib.sha256(good).hexdigest()
    auth = {"Authorization": f"Bearer {alice_token}"}
    batch = httpx.post(
        f"{hub_url}/{repo_id}.git/info/lfs/objects/batch",
        headers={**auth, "Content-Type": "application/vnd.git-lfs+json"},
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(good)}]},
    )
    assert batch.status_code == 200
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]

    corrupted = bytearray(good)
    corrupted[100] ^= 0xFF
    refused = httpx.put(href, content=bytes(corrupted))
    assert refused.status_code == 400
    assert "sha256" in refused.json()["error"]
    # The ticket was for one upload only: the right bytes cannot be sneaked in on it afterwards.
    assert httpx.put(href, content=good).status_code == 403

    head_before = hub_api.model_info(repo_id).sha
    commit = httpx.post(
        f"{hub_url}/api/models/{repo_id}/commit/main",
        headers={**auth, "Content-Type": "application/x-ndjson"},
        content=_ndjson(
            {"key": "header", "value": {"summary": "use the broken object"}},
            {
                "key": "lfsFile",
                "value": {"path": "model.safetensors", "algo": "sha256", "oid": oid, "size": len(good)},
            },
        ),
    )
    assert commit.status_code == 400
    assert hub_api.model_info(repo_id).sha == head_before

    # A short upload (wrong size) is refused as well, then the client uploads the object correctly.
    batch = httpx.post(
        f"{hub_url}/{repo_id}.git/info/lfs/objects/batch",
        headers=auth,
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(good)}]},
    )
    assert httpx.put(batch.json()["objects"][0]["actions"]["upload"]["href"], content=good[:-1]).status_code == 400
    hub_api.upload_file(path_or_fileobj=good, path_in_repo="model.safetensors", repo_id=repo_id)
    assert hub_api.get_paths_info(repo_id, ["model.safetensors"])[0].lfs.sha256 == oid
    # Once stored, the batch endpoint asks for no second upload.
    again = httpx.post(
        f"{hub_url}/{repo_id}.git/info/lfs/objects/batch",
        headers=auth,
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(good)}]},
    )
    assert "actions" not in again.json()["objects"][0]


def test_stale_parent_commit_is_412(hub_api):
    repo_id = f"alice/stale-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(repo_id)
    old = hub_api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id=repo_id).oid
    hub_api.upload_file(path_or_fileobj=b"2", path_in_repo="a.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as stale:
        hub_api.create_commit(
            repo_id, operations=[CommitOperationAdd("b.txt", b"b")], commit_message="late", parent_commit=old
        )
    assert stale.value.response.status_code == 412
    assert "b.txt" not in hub_api.list_repo_files(repo_id)


def test_commit_payload_with_regular_file_through_raw_http(hub_url, alice_token, hub_api):
    repo_id = f"alice/raw-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(repo_id)
    response = httpx.post(
        f"{hub_url}/api/models/{repo_id}/commit/main",
        headers={"Authorization": f"Bearer {alice_token}", "Content-Type": "application/x-ndjson"},
        content=_ndjson(
            {"key": "header", "value": {"summary": "raw"}},
            {
                "key": "file",
                "value": {"path": "x.txt", "content": base64.b64encode(b"x").decode(), "encoding": "base64"},
            },
        ),
    )
    assert response.status_code == 200
    body = response.json()
    assert len(body["commitOid"]) == 40 and body["commitUrl"].endswith(f"/{repo_id}/commit/{body['commitOid']}")
    assert body["pullRequestUrl"] is None


def test_concurrent_uploads_and_downloads_of_different_repos(hub_api, tmp_path):
    def round_trip(index: int) -> tuple[str, bool]:
        repo_id = f"alice/concurrent-{index}-{uuid.uuid4().hex[:6]}"
        folder = tmp_path / f"up-{index}"
        folder.mkdir()
        files = {
            "config.json": json.dumps({"index": index}).encode(),
            "model.safetensors": os.urandom(512 * 1024 + index),
            f"sub/{index}.txt": f"file {index}".encode(),
        }
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        hub_api.create_repo(repo_id)
        info = hub_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"upload {index}")
        snapshot = Path(snapshot_download(repo_id, cache_dir=tmp_path / f"cache-{index}", token=hub_api.token))
        same = snapshot.name == info.oid and all((snapshot / n).read_bytes() == d for n, d in files.items())
        return repo_id, same

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(round_trip, range(8)))
    assert all(same for _, same in results), results
    assert len({repo_id for repo_id, _ in results}) == 8


def test_concurrent_commits_to_one_repo_are_all_kept(hub_api):
    repo_id = f"alice/shared-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(repo_id)

    def commit(index: int) -> str:
        return hub_api.upload_file(
            path_or_fileobj=f"{index}".encode(), path_in_repo=f"f{index}.txt", repo_id=repo_id
        ).oid

    with ThreadPoolExecutor(max_workers=8) as pool:
        oids = list(pool.map(commit, range(8)))
    assert len(set(oids)) == 8
    assert sorted(hub_api.list_repo_files(repo_id)) == sorted([".gitattributes"] + [f"f{i}.txt" for i in range(8)])
    assert len(hub_api.list_repo_commits(repo_id)) == 9


def test_lfs_upload_with_chunked_transfer_encoding(hub_api, hub_url, alice_token):
    repo_id = f"alice/chunked-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(repo_id)
    data = os.urandom(300_000)
    oid = hashlib.sha256(data).hexdigest()
    batch = httpx.post(
        f"{hub_url}/{repo_id}.git/info/lfs/objects/batch",
        headers={"Authorization": f"Bearer {alice_token}"},
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
    )
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]

    def chunks():
        for start in range(0, len(data), 70_000):
            yield data[start : start + 70_000]

    upload = httpx.put(href, content=chunks())
    assert upload.request.headers["Transfer-Encoding"] == "chunked"
    assert upload.status_code == 200
    hub_api.create_commit(repo_id, operations=[CommitOperationAdd("w.bin", data)], commit_message="chunked")
    assert hub_api.get_paths_info(repo_id, ["w.bin"])[0].lfs.sha256 == oid


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"key": "header", "value": {"summary": "x"}}\nthis is not json\n', "line 2 is not valid JSON"),
        (b'{"summary": "a plain JSON commit, not ndjson"', "line 1 is not valid JSON"),
        (b'["key", "header"]\n', "line 1 must be a JSON object"),
    ],
)
def test_commit_body_that_is_not_ndjson_is_a_400(hub_url, alice_token, hub_api, body, message):
    repo_id = f"alice/bad-ndjson-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(repo_id)
    before = hub_api.list_repo_commits(repo_id)
    response = httpx.post(
        f"{hub_url}/api/models/{repo_id}/commit/main",
        headers={"Authorization": f"Bearer {alice_token}", "Content-Type": "application/x-ndjson"},
        content=body,
    )
    assert response.status_code == 400
    assert message in response.headers["X-Error-Message"]
    assert message in response.json()["error"]
    assert hub_api.list_repo_commits(repo_id) == before
