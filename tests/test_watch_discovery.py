"""Where a watcher finds candidates: the base_model relation tag, authors, searches and an allow-list."""

from __future__ import annotations

import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from hf_merge.errors import UsageError
from hf_merge.watch.discovery import Discovery, read_allow_list


def _repo(api: HfApi, repo_id: str, front_matter: str) -> str:
    api.create_repo(repo_id, exist_ok=True)
    readme = f"---\n{front_matter}\n---\n".encode()
    return api.create_commit(repo_id, [CommitOperationAdd("README.md", readme)], commit_message="card").oid


def test_candidates_from_every_source_pinned_and_oldest_first(hub_server, hub_url, alice_token, carol_token, tmp_path):
    alice, carol = HfApi(endpoint=hub_url, token=alice_token), HfApi(endpoint=hub_url, token=carol_token)
    first = _repo(carol, "carol/disc-ft-1", "base_model: alice/disc-base\nlicense: mit")
    second = _repo(alice, "alice/disc-ft-2", "base_model: alice/disc-base")
    _repo(alice, "alice/disc-merged", "base_model:\n- alice/disc-base\n- carol/disc-ft-1")
    adapter = _repo(alice, "alice/disc-adapter", "base_model: alice/disc-base\nbase_model_relation: adapter")
    _repo(alice, "alice/disc-quantized", "base_model: alice/disc-base\nbase_model_relation: quantized")
    searched = _repo(carol, "carol/disc-findme-special", "license: mit")
    pinned = _repo(carol, "carol/disc-pinned", "license: mit")
    _repo(carol, "carol/disc-pinned", "license: apache-2.0")  # main moves on; the allow-list pins the first
    allow = tmp_path / "allow.txt"
    allow.write_text(f"# pinned fine-tunes\ncarol/disc-pinned@{pinned}  # reviewed\n\n")

    found = Discovery(base="alice/disc-base", exclude=["alice/disc-merged"], searches=["disc-findme"],
                      allow_list=allow).find(alice_token)
    by_id = {c.repo_id: c for c in found}
    # An adapter of the base is a candidate (merged as the model it stands for); a quantized copy is not.
    assert set(by_id) == {"carol/disc-ft-1", "alice/disc-ft-2", "alice/disc-adapter", "carol/disc-findme-special",
                          "carol/disc-pinned"}
    assert [(by_id[r].sha, by_id[r].source) for r in sorted(by_id)] == [
        (adapter, "adapter"), (second, "base_model"), (searched, "search"), (first, "base_model"), (pinned, "allow-list")]
    assert [c.repo_id for c in found][:2] == ["carol/disc-ft-1", "alice/disc-ft-2"]  # oldest first
    assert by_id["carol/disc-ft-1"].license == "mit" and by_id["alice/disc-ft-2"].license is None
    assert by_id["carol/disc-ft-1"].reference == f"carol/disc-ft-1@{first}"

    authored = Discovery(base="nobody/none", authors=["carol"]).find(alice_token)
    assert {"carol/disc-ft-1", "carol/disc-pinned"} <= {c.repo_id for c in authored}
    assert all(c.repo_id.startswith("carol/") and c.source == "author" for c in authored)


def test_allow_list_must_exist(tmp_path):
    with pytest.raises(UsageError, match="allow-list file .* does not exist"):
        read_allow_list(tmp_path / "missing.txt")
