"""Anyone may open a pull request on a public repo of the local Hub; only its owners merge it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from hf_merge.hub.conversion_pr import CONVERSION_BOT, PR_TITLE, find_conversion_pr
from hf_merge.hub_server import LocalHubServer

TOKENS = {"alice": "pr-alice", "bob": "pr-bob", "carol": "pr-carol", CONVERSION_BOT: "pr-bot"}
ORGS = {"team": ["alice", "bob"]}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with LocalHubServer(tmp_path_factory.mktemp("hub-prs"), tokens=TOKENS, orgs=ORGS) as server:
        yield server


@pytest.fixture(scope="module")
def apis(hub) -> dict[str, HfApi]:
    return {user: HfApi(endpoint=hub.url, token=token) for user, token in TOKENS.items()} | {
        "anonymous": HfApi(endpoint=hub.url, token=False)}


def _repo(apis, owner: str = "alice", private: bool = False) -> str:
    repo_id = f"{owner}/prs-{uuid.uuid4().hex[:8]}"
    apis[owner].create_repo(repo_id, private=private)
    apis[owner].upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id=repo_id)
    return repo_id


def _status(error: pytest.ExceptionInfo) -> int:
    return error.value.response.status_code


def test_anyone_opens_a_pull_request_that_only_the_owner_merges(apis, tmp_path):
    repo_id = _repo(apis)
    main_before = apis["alice"].model_info(repo_id).sha
    weights = os.urandom(50_000)
    info = apis["bob"].create_commit(
        repo_id, [CommitOperationAdd("model.safetensors", weights), CommitOperationAdd("notes.txt", b"v2")],
        commit_message="Propose new weights", create_pr=True)
    assert info.pr_url and info.pr_url.endswith("/discussions/1") and info.pr_revision == "refs/pr/1"
    assert apis["alice"].model_info(repo_id).sha == main_before  # main untouched
    [pr] = list(apis["alice"].get_repo_discussions(repo_id))
    assert (pr.num, pr.author, pr.title, pr.status, pr.is_pull_request) == (1, "bob", "Propose new weights", "open", True)
    path = apis["anonymous"].hf_hub_download(repo_id, "model.safetensors", revision="refs/pr/1", cache_dir=tmp_path)
    assert Path(path).read_bytes() == weights

    # The author may push more commits to his pull request; nobody else but the owner may.
    apis["bob"].upload_file(path_or_fileobj=b"readme", path_in_repo="README.md", repo_id=repo_id, revision="refs/pr/1")
    with pytest.raises(HfHubHTTPError) as other:
        apis["carol"].upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, revision="refs/pr/1")
    assert _status(other) == 403
    # Bob may neither merge it, nor write to a branch, nor make one.
    with pytest.raises(HfHubHTTPError) as merge:
        apis["bob"].merge_pull_request(repo_id, 1)
    assert _status(merge) == 403
    with pytest.raises(HfHubHTTPError) as write:
        apis["bob"].upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert _status(write) == 403
    with pytest.raises(HfHubHTTPError) as branch:
        apis["bob"].create_branch(repo_id, branch="bobs")
    assert _status(branch) == 403
    # Anonymous users cannot open one.
    with pytest.raises(HfHubHTTPError) as anonymous:
        apis["anonymous"].create_commit(repo_id, [CommitOperationAdd("a.txt", b"a")], commit_message="anon", create_pr=True)
    assert _status(anonymous) == 401

    apis["alice"].merge_pull_request(repo_id, 1)
    files = apis["alice"].list_repo_files(repo_id)
    assert {"model.safetensors", "README.md"} <= set(files)
    assert Path(apis["alice"].hf_hub_download(repo_id, "notes.txt", cache_dir=tmp_path)).read_bytes() == b"v2"
    assert apis["alice"].get_paths_info(repo_id, ["model.safetensors"])[0].lfs.size == len(weights)
    details = apis["alice"].get_discussion_details(repo_id, 1)
    assert details.status == "merged" and details.author == "bob"
    with pytest.raises(HfHubHTTPError) as again:
        apis["alice"].merge_pull_request(repo_id, 1)
    assert _status(again) == 400


def test_merging_after_main_moved_makes_a_merge_commit_and_refuses_conflicts(apis):
    repo_id = _repo(apis)
    apis["bob"].create_commit(repo_id, [CommitOperationAdd("bob.txt", b"bob")], commit_message="add bob", create_pr=True)
    apis["carol"].create_commit(repo_id, [CommitOperationAdd("notes.txt", b"carol")], commit_message="edit notes",
                                create_pr=True)
    apis["carol"].create_commit(repo_id, [CommitOperationDelete("notes.txt")], commit_message="drop notes",
                                create_pr=True)
    apis["alice"].upload_file(path_or_fileobj=b"alice", path_in_repo="notes.txt", repo_id=repo_id)  # main moves
    apis["alice"].merge_pull_request(repo_id, 1)
    commits = apis["alice"].list_repo_commits(repo_id)
    assert commits[0].title == "Merge pull request #1: add bob"
    assert set(apis["alice"].list_repo_files(repo_id)) == {".gitattributes", "notes.txt", "bob.txt"}
    for num in (2, 3):  # both changed the file main changed since
        with pytest.raises(HfHubHTTPError) as conflict:
            apis["alice"].merge_pull_request(repo_id, num)
        assert _status(conflict) == 409
    assert apis["alice"].get_discussion_details(repo_id, 1).status == "merged"
    assert apis["alice"].get_discussion_details(repo_id, 2).status == "open"


def test_the_author_or_the_owner_closes_a_pull_request(apis):
    repo_id = _repo(apis)
    apis["bob"].create_commit(repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="b", create_pr=True)
    with pytest.raises(HfHubHTTPError) as stranger:
        apis["carol"].change_discussion_status(repo_id, 1, "closed")
    assert _status(stranger) == 403
    assert apis["bob"].change_discussion_status(repo_id, 1, "closed").new_status == "closed"
    assert next(iter(apis["alice"].get_repo_discussions(repo_id))).status == "closed"
    with pytest.raises(HfHubHTTPError) as closed:
        apis["alice"].merge_pull_request(repo_id, 1)
    assert _status(closed) == 400
    apis["alice"].change_discussion_status(repo_id, 1, "open")
    apis["alice"].merge_pull_request(repo_id, 1)
    assert "b.txt" in apis["alice"].list_repo_files(repo_id)


def test_a_private_repo_takes_no_pull_request_from_others(apis):
    repo_id = _repo(apis, private=True)
    with pytest.raises(RepositoryNotFoundError) as hidden:
        apis["bob"].create_commit(repo_id, [CommitOperationAdd("a.txt", b"a")], commit_message="pr", create_pr=True)
    assert _status(hidden) == 404
    assert list(apis["alice"].get_repo_discussions(repo_id)) == []


def test_organization_members_own_its_repos(apis):
    repo_id = f"team/shared-{uuid.uuid4().hex[:8]}"
    apis["alice"].create_repo(repo_id)
    apis["bob"].upload_file(path_or_fileobj=b"by bob", path_in_repo="bob.txt", repo_id=repo_id)  # a member writes
    with pytest.raises(HfHubHTTPError) as outsider:
        apis["carol"].upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert _status(outsider) == 403
    apis["carol"].create_commit(repo_id, [CommitOperationAdd("c.txt", b"c")], commit_message="c", create_pr=True)
    apis["bob"].merge_pull_request(repo_id, 1)  # a member merges
    assert {"bob.txt", "c.txt"} <= set(apis["alice"].list_repo_files(repo_id))
    assert [org["name"] for org in apis["bob"].whoami()["orgs"]] == ["team"]


# ---- the conversion bot's pull requests, opened through the API ----------------------------------
def test_a_conversion_pr_opened_by_the_bot_is_found_and_a_look_alike_is_ignored(apis):
    repo_id = f"carol/pickle-only-{uuid.uuid4().hex[:8]}"
    apis["carol"].create_repo(repo_id)
    main = apis["carol"].upload_file(path_or_fileobj=os.urandom(1000), path_in_repo="pytorch_model.bin",
                                     repo_id=repo_id).oid
    bot = apis[CONVERSION_BOT].create_commit(repo_id, [CommitOperationAdd("model.safetensors", os.urandom(1000))],
                                             commit_message=PR_TITLE, create_pr=True)
    # A newer pull request, same title, by someone else: listed first, and must not be picked.
    apis["bob"].create_commit(repo_id, [CommitOperationAdd("model.safetensors", os.urandom(1000))],
                              commit_message=PR_TITLE, create_pr=True)
    found = find_conversion_pr(HfApi(endpoint=apis["carol"].endpoint, token=False), repo_id, main)
    assert found is not None
    assert (found.num, found.ref, found.author, found.revision_commit) == (1, "refs/pr/1", CONVERSION_BOT, main)
    assert found.commit_sha == apis["carol"].list_repo_commits(repo_id, revision="refs/pr/1")[0].commit_id
    assert bot.pr_num == 1


def test_only_look_alike_pull_requests_give_no_conversion(apis):
    repo_id = f"carol/pickle-only-{uuid.uuid4().hex[:8]}"
    apis["carol"].create_repo(repo_id)
    main = apis["carol"].upload_file(path_or_fileobj=os.urandom(1000), path_in_repo="pytorch_model.bin",
                                     repo_id=repo_id).oid
    apis["bob"].create_commit(repo_id, [CommitOperationAdd("model.safetensors", os.urandom(1000))],
                              commit_message=PR_TITLE, create_pr=True)
    assert next(iter(apis["carol"].get_repo_discussions(repo_id))).title == PR_TITLE
    assert find_conversion_pr(apis["carol"], repo_id, main) is None


# ---- the relation filter of list_models ------------------------------------------------------------
def test_an_adapter_repo_is_listed_under_base_model_adapter(apis):
    import json

    base = "openai/clip-vit-base-patch16"
    adapter = f"carol/lora-{uuid.uuid4().hex[:8]}"
    local_path = f"carol/lora-local-{uuid.uuid4().hex[:8]}"
    for repo_id, base_name in ((adapter, base), (local_path, "/mnt/runs/checkpoint-24000")):
        apis["carol"].create_repo(repo_id)
        config = {"peft_type": "LORA", "base_model_name_or_path": base_name, "r": 16, "lora_alpha": 16,
                  "target_modules": ["q_proj", "v_proj"]}
        apis["carol"].create_commit(repo_id, [
            CommitOperationAdd("adapter_config.json", json.dumps(config).encode()),
            CommitOperationAdd("adapter_model.safetensors", os.urandom(2000)),
        ], commit_message="adapter")
    found = [m.id for m in apis["carol"].list_models(filter=f"base_model:adapter:{base}")]
    assert found == [adapter]
    assert f"base_model:{base}" in apis["carol"].model_info(adapter).tags
    # A path to a local checkpoint is no repo: no relation is made up.
    assert not [t for t in apis["carol"].model_info(local_path).tags if t.startswith("base_model:")]


# ---- the same, end to end on the session's Hub: a merge reads the bot's safetensors ----------------
@pytest.fixture(scope="module")
def pickle_only(hub_api, hub_url, conversion_bot_token, carol_token, tiny_base, tmp_path_factory):
    """Two pickle-only tiny CLIP repos of alice: one with the bot's conversion PR and a newer
    look-alike by carol, one with only the look-alike."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("pickle-only")
    state = load_file(tiny_base / "model.safetensors")
    for path in tiny_base.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    torch.save(state, folder / "pytorch_model.bin")
    converted_path = tmp_path_factory.mktemp("converted") / "model.safetensors"
    save_file(state, converted_path, metadata={"format": "pt"})
    converted = converted_path.read_bytes()
    fake = dict(state)
    fake["vision_model.post_layernorm.bias"] = fake["vision_model.post_layernorm.bias"] + 1.0
    look_alike = tmp_path_factory.mktemp("look-alike") / "model.safetensors"
    save_file(fake, look_alike, metadata={"format": "pt"})
    bot = HfApi(endpoint=hub_url, token=conversion_bot_token)
    carol = HfApi(endpoint=hub_url, token=carol_token)
    repos = {}
    for repo_id, with_bot in ((f"alice/pickle-api-{uuid.uuid4().hex[:6]}", True),
                              (f"alice/pickle-api-{uuid.uuid4().hex[:6]}", False)):
        hub_api.create_repo(repo_id)
        main = hub_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add files").oid
        if with_bot:
            bot.create_commit(repo_id, [CommitOperationAdd("model.safetensors", converted)], commit_message=PR_TITLE,
                              create_pr=True)
        carol.create_commit(repo_id, [CommitOperationAdd("model.safetensors", look_alike.read_bytes())],
                            commit_message=PR_TITLE, create_pr=True)
        repos[with_bot] = (repo_id, main)
    return repos


def test_a_merge_reads_the_bots_pull_request_opened_through_the_api(pickle_only, tiny_experts, alice_token, tmp_path):
    import json

    from hf_merge import api

    repo_id, main = pickle_only[True]
    result = api.merge(base=repo_id, experts=[str(tiny_experts[0])], output=str(tmp_path / "out"), token=alice_token)
    pr = json.loads((result.output_dir / "merge_state.json").read_text())["base"]["conversion_pr"]
    assert (pr["ref"], pr["author"], pr["revision_commit"]) == ("refs/pr/1", CONVERSION_BOT, main)


def test_a_look_alike_pull_request_alone_leaves_the_pickle_error(pickle_only, tiny_experts, alice_token, tmp_path):
    from hf_merge import api
    from hf_merge.errors import CheckpointError

    repo_id, _ = pickle_only[False]
    with pytest.raises(CheckpointError, match=r"has only pickle weights \(pytorch_model.bin\)"):
        api.merge(base=repo_id, experts=[str(tiny_experts[0])], output=str(tmp_path / "out"), token=alice_token)
