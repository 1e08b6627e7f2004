"""Pull requests as the Hub's discussions API shows them, and gated repos.

A pull request of the local Hub is a ``refs/pr/<num>`` ref (made by a ``create_pr`` commit); its
title, author and date are those of the first commit of its branch, and it is ``merged`` once
its head is in ``main``'s history, ``open`` otherwise. So nothing beyond the git data is stored.
The endpoints, in the JSON ``huggingface_hub`` parses (``HfApi.get_repo_discussions``,
``get_discussion_details``):

- ``GET /api/{type}s/{repo}/discussions?p=N``: ``{"count", "start", "discussions": [...]}``,
  newest first, all on page 0;
- ``GET /api/{type}s/{repo}/discussions/{num}``: one discussion with ``events`` and ``changes``.

A gated repo (``RepoRecord.gated``) shows its metadata to everyone but serves files only to its
namespace and to the users in ``gated_accepted``; others get the Hub's ``GatedRepo`` error.
"""

from __future__ import annotations

from typing import Any

from hf_merge.hub_server.git import HubError
from hf_merge.hub_server.storage import Commit, HubStorage, RepoRecord

PAGE_SIZE = 50


def check_gated(record: RepoRecord, user: str | None) -> None:
    """Raise the Hub's ``GatedRepo`` error if ``user`` may not download files of ``record``."""
    if not record.gated or user == record.namespace or (user is not None and user in record.gated_accepted):
        return
    kind = "model" if record.repo_type == "model" else record.repo_type
    raise HubError(
        401 if user is None else 403,
        f"Access to {kind} {record.repo_id} is restricted and you are not in the authorized list. "
        f"Visit /{record.repo_id} to ask for access.",
        code="GatedRepo",
    )


def list_discussions(storage: HubStorage, record: RepoRecord, page: int, base: str) -> dict[str, Any]:
    """The ``GET …/discussions`` answer."""
    items = [_discussion(storage, record, num, base) for num in _numbers(storage, record)]
    start = page * PAGE_SIZE
    return {"count": len(items), "start": start, "discussions": items[start : start + PAGE_SIZE]}


def discussion_details(storage: HubStorage, record: RepoRecord, num: str, base: str) -> dict[str, Any]:
    """The ``GET …/discussions/{num}`` answer."""
    if num not in _numbers(storage, record):
        raise HubError(404, f"Discussion {num} not found", code="EntryNotFound")
    item = _discussion(storage, record, num, base)
    first, head = _pr_commits(storage, record, num)
    item["events"] = [
        {"id": commit.id[:24], "type": "commit", "createdAt": commit.date, "author": {"name": commit.author},
         "data": {"subject": commit.title, "oid": commit.id}}
        for commit in reversed(_branch(storage, record, num))
    ]
    item["changes"] = {"base": "refs/heads/main"}
    if item["status"] == "merged":
        item["changes"]["mergeCommitId"] = head.id
    item["filesWithConflicts"] = []
    return item


def _numbers(storage: HubStorage, record: RepoRecord) -> list[str]:
    refs = storage.read_refs(record.repo_type, record.repo_id)
    return sorted(refs.pull_requests, key=int, reverse=True)


def _on_branches(storage: HubStorage, record: RepoRecord) -> set[str]:
    refs = storage.read_refs(record.repo_type, record.repo_id)
    seen: set[str] = set()
    for commit_id in refs.branches.values():
        head = storage.get_commit(record.repo_type, record.repo_id, commit_id)
        if head is not None:
            seen.update(c.id for c in storage.history(record.repo_type, record.repo_id, head))
    return seen


def _branch(storage: HubStorage, record: RepoRecord, num: str) -> list[Commit]:
    """The pull request's own commits, newest first (those not on any branch)."""
    head = storage.resolve_revision(record.repo_type, record.repo_id, f"refs/pr/{num}")
    on_branches = _on_branches(storage, record)
    own = [c for c in storage.history(record.repo_type, record.repo_id, head) if c.id not in on_branches]
    return own or [head]


def _pr_commits(storage: HubStorage, record: RepoRecord, num: str) -> tuple[Commit, Commit]:
    head = storage.resolve_revision(record.repo_type, record.repo_id, f"refs/pr/{num}")
    return _branch(storage, record, num)[-1], head


def _discussion(storage: HubStorage, record: RepoRecord, num: str, base: str) -> dict[str, Any]:
    first, head = _pr_commits(storage, record, num)
    merged = head.id in _on_branches(storage, record)
    return {
        "num": int(num),
        "title": first.title,
        "status": "merged" if merged else "open",
        "isPullRequest": True,
        "createdAt": first.date,
        "author": {"name": first.author},
        "repo": {"name": record.repo_id, "type": record.repo_type},
        "pinned": False,
        "numComments": 0,
        "url": f"{base}/{record.repo_id}/discussions/{num}",
    }
