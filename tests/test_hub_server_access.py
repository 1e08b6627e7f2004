"""Who may read and write what on the local Hub, seen through the real client's exceptions."""

from __future__ import annotations

import uuid

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError


@pytest.fixture(scope="module")
def bob_api(hub_url, bob_token) -> HfApi:
    return HfApi(endpoint=hub_url, token=bob_token)


@pytest.fixture(scope="module")
def anonymous_api(hub_url) -> HfApi:
    return HfApi(endpoint=hub_url, token=False)


@pytest.fixture(scope="module")
def public_repo(hub_api) -> str:
    repo_id = f"alice/public-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(repo_id)
    hub_api.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id=repo_id)
    return repo_id


@pytest.fixture(scope="module")
def private_repo(hub_api) -> str:
    repo_id = f"alice/secret-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(repo_id, private=True)
    hub_api.upload_file(path_or_fileobj=b"secret", path_in_repo="secret.txt", repo_id=repo_id)
    return repo_id


def test_push_without_token_is_401(anonymous_api, public_repo):
    with pytest.raises(HfHubHTTPError) as create:
        anonymous_api.create_repo(f"alice/anon-{uuid.uuid4().hex[:8]}")
    assert create.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as upload:
        anonymous_api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public_repo)
    assert upload.value.response.status_code == 401


def test_bad_token_is_reported_as_bad_credentials(hub_url, public_repo):
    bad = HfApi(endpoint=hub_url, token="hf_not_a_real_token")
    with pytest.raises(HfHubHTTPError) as whoami:
        bad.whoami()
    assert whoami.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as upload:
        bad.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public_repo)
    assert upload.value.response.status_code == 401
    assert upload.value.response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    # Not mistaken for a missing repo: the client raises the generic error, not RepositoryNotFoundError.
    assert not isinstance(upload.value, RepositoryNotFoundError)


def test_writing_into_another_users_namespace_is_403(bob_api, public_repo):
    with pytest.raises(HfHubHTTPError) as create:
        bob_api.create_repo(f"alice/from-bob-{uuid.uuid4().hex[:8]}")
    assert create.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as create_ok:
        bob_api.create_repo(f"alice/from-bob-{uuid.uuid4().hex[:8]}", exist_ok=True)
    assert create_ok.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as upload:
        bob_api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public_repo)
    assert upload.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as branch:
        bob_api.create_branch(public_repo, branch="bobs")
    assert branch.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as delete:
        bob_api.delete_repo(public_repo)
    assert delete.value.response.status_code == 403
    # Bob still reads the public repo, and writes to his own namespace.
    assert bob_api.list_repo_files(public_repo) == [".gitattributes", "hello.txt"]
    assert bob_api.create_repo(f"bob/own-{uuid.uuid4().hex[:8]}").repo_id.startswith("bob/")


def test_private_repo_is_invisible_to_others(hub_api, bob_api, anonymous_api, private_repo, tmp_path, hub_url):
    assert hub_api.model_info(private_repo).private is True
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        anonymous_api.model_info(private_repo)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as other_user:
        bob_api.model_info(private_repo)
    assert other_user.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(private_repo, "secret.txt", cache_dir=tmp_path, token=False)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(private_repo, cache_dir=tmp_path, token=bob_api.token)
    raw = httpx.get(f"{hub_url}/{private_repo}/resolve/main/secret.txt")
    assert raw.status_code == 401 and raw.headers["X-Error-Code"] == "RepoNotFound"
    assert private_repo not in [m.id for m in bob_api.list_models(author="alice")]
    assert private_repo in [m.id for m in hub_api.list_models(author="alice")]
    path = hf_hub_download(private_repo, "secret.txt", cache_dir=tmp_path, token=hub_api.token)
    assert open(path, "rb").read() == b"secret"


def test_missing_repo_is_repository_not_found(hub_api, anonymous_api):
    with pytest.raises(RepositoryNotFoundError):
        hub_api.model_info("alice/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        anonymous_api.model_info("alice/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hub_api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/does-not-exist")


def test_repo_ids_cannot_escape_the_storage_root(hub_url, alice_token):
    auth = {"Authorization": f"Bearer {alice_token}"}
    for path in ("/api/models/%2E%2E/%2E%2E", "/api/models/alice/%2E%2E", "/%2E%2E/repos/resolve/main/repo.json"):
        response = httpx.get(f"{hub_url}{path}", headers=auth)
        assert response.status_code == 404, path
    created = httpx.post(f"{hub_url}/api/repos/create", headers=auth, json={"name": ".."})
    assert created.status_code == 400


def _batch(hub_url: str, token: str, repo_id: str, oid: str, size: int) -> dict:
    response = httpx.post(f"{hub_url}/{repo_id}.git/info/lfs/objects/batch",
                          headers={"Authorization": f"Bearer {token}"},
                          json={"operation": "upload", "objects": [{"oid": oid, "size": size}]})
    assert response.status_code == 200
    return response.json()["objects"][0]


def test_lfs_objects_of_a_private_repo_cannot_be_reached_through_another(hub_api, bob_api, hub_url, alice_token,
                                                                         bob_token, hub_server):
    import hashlib
    import json
    import os

    secret = os.urandom(64 * 1024)
    oid = hashlib.sha256(secret).hexdigest()
    bobs = f"bob/private-{uuid.uuid4().hex[:8]}"
    bob_api.create_repo(bobs, private=True)
    bob_api.upload_file(path_or_fileobj=secret, path_in_repo="secret.safetensors", repo_id=bobs)
    assert _batch(hub_url, bob_token, bobs, oid, len(secret)).get("actions") is None  # bob's own repo holds it

    alices = f"alice/public-{uuid.uuid4().hex[:8]}"
    hub_api.create_repo(alices)
    # The batch endpoint does not reveal that some repo holds the object: alice must upload it.
    assert "upload" in _batch(hub_url, alice_token, alices, oid, len(secret))["actions"]
    # A pointer to Bob's object, committed without uploading it, is refused.
    commit = httpx.post(
        f"{hub_url}/api/models/{alices}/commit/main",
        headers={"Authorization": f"Bearer {alice_token}", "Content-Type": "application/x-ndjson"},
        content=b"".join(json.dumps(line).encode() + b"\n" for line in (
            {"key": "header", "value": {"summary": "borrow"}},
            {"key": "lfsFile", "value": {"path": "stolen.safetensors", "algo": "sha256", "oid": oid, "size": len(secret)}},
        )),
    )
    assert commit.status_code == 400 and "was not uploaded to this repo" in commit.json()["error"]
    assert "stolen.safetensors" not in hub_api.list_repo_files(alices)
    response = httpx.get(f"{hub_url}/{alices}/resolve/main/stolen.safetensors")
    assert response.status_code == 404 and secret not in response.content

    # Whoever has the bytes may still upload them: stored once, reachable through both repos.
    hub_api.upload_file(path_or_fileobj=secret, path_in_repo="same.safetensors", repo_id=alices)
    assert httpx.get(f"{hub_url}/{alices}/resolve/main/same.safetensors").content == secret
    # (other tests' objects share the store: look for copies of these bytes, whatever their name)
    copies = [p for p in (hub_server.root / "objects" / "lfs").rglob("*")
              if p.is_file() and p.stat().st_size == len(secret) and p.read_bytes() == secret]
    assert [p.name for p in copies] == [oid]

