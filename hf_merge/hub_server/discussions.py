"""Pull requests as the Hub's discussions API shows them, and gated repos.

A pull request of the local Hub is a ``refs/pr/<num>`` ref (made by a ``create_pr`` commit); its
title, author and date are those of the first commit of its branch, and it is ``merged`` once
its head is in the history of a branch, ``closed`` if someone closed it, ``open`` otherwise. So
only the closed ones are stored beyond the git data. As on the Hub, anyone who can read a repo
may open a pull request on it; its author may push more commits to it and close or reopen it;
only the repo's owner (or a member of its organization) merges it. The endpoints, in the JSON
``huggingface_hub`` parses (``get_repo_discussions``, ``get_discussion_details``,
``merge_pull_request``, ``change_discussion_status``):

- ``GET /api/{type}s/{repo}/discussions?p=N``: ``{"count", "start", "discussions": [...]}``,
  newest first, all on page 0;
- ``GET /api/{type}s/{repo}/discussions/{num}``: one discussion with ``events`` and ``changes``;
- ``POST …/discussions/{num}/merge`` and ``POST …/discussions/{num}/status`` (``{"status"}``).

A gated repo (``RepoRecord.gated``) shows its metadata to everyone but serves files only to its
namespace and to the users in ``gated_accepted``; others get the Hub's ``GatedRepo`` error.
"""

from __future__ import annotations

import hashlib
from typing import Any

from hf_merge.hub_server.git import HubError
from hf_merge.hub_server.records import now_iso
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
    head = storage.resolve_revision(record.repo_type, record.repo_id, f"refs/pr/{num}")
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
    """Every commit reachable from a branch, through all parents (merge commits have two)."""
    refs = storage.read_refs(record.repo_type, record.repo_id)
    seen: set[str] = set()
    todo = list(refs.branches.values())
    while todo:
        commit_id = todo.pop()
        if commit_id in seen:
            continue
        commit = storage.get_commit(record.repo_type, record.repo_id, commit_id)
        if commit is not None:
            seen.add(commit_id)
            todo.extend(commit.parents)
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
    if head.id in _on_branches(storage, record):
        status = "merged"
    else:
        status = storage.read_pr_states(record.repo_type, record.repo_id).get(num, "open")
    return {
        "num": int(num),
        "title": first.title,
        "status": status,
        "isPullRequest": True,
        "createdAt": first.date,
        "author": {"name": first.author},
        "repo": {"name": record.repo_id, "type": record.repo_type},
        "pinned": False,
        "numComments": 0,
        "url": f"{base}/{record.repo_id}/discussions/{num}",
    }


def pr_author(storage: HubStorage, record: RepoRecord, num: str) -> str | None:
    """Who opened pull request ``num`` (the author of its first commit); ``None`` if there is none."""
    if num not in _numbers(storage, record):
        return None
    return _pr_commits(storage, record, num)[0].author


def status_of(storage: HubStorage, record: RepoRecord, num: str) -> str:
    """``open``, ``closed`` or ``merged``; 404 if there is no pull request ``num``."""
    if num not in _numbers(storage, record):
        raise HubError(404, f"Discussion {num} not found", code="EntryNotFound")
    return str(_discussion(storage, record, num, "")["status"])


def merge(storage: HubStorage, record: RepoRecord, num: str, user: str) -> str:
    """Merge pull request ``num`` into ``main``: a fast-forward when ``main`` has not moved since the
    pull request branched, else a merge commit (409 when both changed the same file). Returns ``main``'s head."""
    if status_of(storage, record, num) != "open":
        raise HubError(400, f"Pull request {num} is not open.")
    repo_type, repo_id = record.repo_type, record.repo_id
    first, head = _pr_commits(storage, record, num)
    main = storage.resolve_revision(repo_type, repo_id, "main")
    fork = storage.get_commit(repo_type, repo_id, first.parents[0]) if first.parents else None
    if fork is None or fork.id == main.id:
        return storage.merge_commit(repo_type, repo_id, "main", main.id, [main.id, head.id], None, "", user)
    tree = dict(main.tree)
    for path in set(fork.tree) | set(head.tree):
        theirs, base = head.tree.get(path), fork.tree.get(path)
        if theirs == base:
            continue  # not changed by the pull request
        if main.tree.get(path) not in (base, theirs):
            raise HubError(409, f"Pull request {num} conflicts with main on '{path}'.")
        if theirs is None:
            tree.pop(path, None)
        else:
            tree[path] = theirs
    title = f"Merge pull request #{num}: {first.title}"
    return storage.merge_commit(repo_type, repo_id, "main", main.id, [main.id, head.id], tree, title, user)


def event(kind: str, user: str, data: dict[str, Any]) -> dict[str, Any]:
    """An event in the shape ``huggingface_hub``'s ``deserialize_event`` reads."""
    return {"id": hashlib.sha1(f"{kind}{user}{now_iso()}".encode()).hexdigest()[:24], "type": kind,
            "createdAt": now_iso(), "author": {"name": user}, "data": data}
