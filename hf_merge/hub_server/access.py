"""Who the caller is and what they may do, as on the Hub.

- Anyone reads public repos; only the namespace's user (or a member of the organization that
  owns it) reads its private repos. An anonymous reader gets 401, another user 404, both
  ``RepoNotFound``: a private repo is indistinguishable from a missing one.
- Only the owner (the namespace's user, or a member of its organization) writes to a branch,
  creates or deletes refs, changes settings, deletes the repo, or merges a pull request
  (no token: 401, another user's token: 403).
- Anyone who can read a repo may open a pull request on it (``create_commit(create_pr=True)``)
  and upload the LFS files it needs; the pull request's author may push more commits to it.
- A token that matches no user gets 401 "Invalid credentials in Authorization header" on every
  route, which the client reports as a bad token rather than a missing repo.

All of this is decided from the request's headers and path, before its body is read.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from hf_merge.hub_server.git import HubError
from hf_merge.hub_server.storage import REPO_TYPES, HubStorage, RepoRecord

BAD_TOKEN_MESSAGE = "Invalid credentials in Authorization header"


class Access:
    """Tokens, organizations, and the read/write rules over one storage."""

    def __init__(self, storage: HubStorage, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        for user, secret in tokens.items():
            if not user or not secret:
                raise ValueError("Every user needs a name and a non-empty token.")
        if len(set(tokens.values())) != len(tokens):
            raise ValueError("Two users cannot share a token.")
        self.storage = storage
        self._tokens = dict(tokens)
        self.orgs = {org: list(members) for org, members in (orgs or {}).items()}

    def authenticate(self, authorization: str | None) -> str | None:
        """User of a ``Bearer`` token; ``None`` when there is none; 401 when it matches no user."""
        if not authorization:
            return None
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise HubError(401, BAD_TOKEN_MESSAGE)
        for user, known in self._tokens.items():
            if hmac.compare_digest(known.encode(), secret.strip().encode()):
                return user
        raise HubError(401, BAD_TOKEN_MESSAGE)

    def owns(self, user: str | None, namespace: str) -> bool:
        """Whether ``user`` is ``namespace`` or a member of the organization of that name."""
        return user is not None and (user == namespace or user in self.orgs.get(namespace, ()))

    def orgs_of(self, user: str) -> list[str]:
        """The organizations ``user`` is a member of."""
        return sorted(org for org, members in self.orgs.items() if user in members)

    def readable(self, user: str | None, repo_type: str, repo_id: str) -> RepoRecord:
        """The repo's record if ``user`` may read it; else 401/404 ``RepoNotFound``."""
        record = self.storage.get_repo(repo_type, repo_id) if repo_type in REPO_TYPES else None
        if record is None or (record.private and not self.owns(user, record.namespace)):
            raise HubError(401 if user is None else 404, "Repository not found", code="RepoNotFound")
        return record

    def writable(self, user: str | None, repo_type: str, repo_id: str) -> RepoRecord:
        """The repo's record if ``user`` owns it (writes branches, refs, settings; merges); else 401/403."""
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository.")
        record = self.readable(user, repo_type, repo_id)
        if not self.owns(user, record.namespace):
            raise HubError(403, f"You don't have the rights to write to {repo_type} repository {repo_id}")
        return record

    def contributor(self, user: str | None, repo_type: str, repo_id: str) -> RepoRecord:
        """Anyone signed in who can read the repo: may open a pull request and upload its files."""
        if user is None:
            raise HubError(401, "You must be authenticated to open a pull request.")
        return self.readable(user, repo_type, repo_id)

    def committer(self, user: str | None, repo_type: str, repo_id: str, revision: str, create_pr: bool,
                  pr_author: Callable[[RepoRecord, str], str | None]) -> RepoRecord:
        """May ``user`` commit to ``revision`` (or open a pull request from it)?"""
        record = self.contributor(user, repo_type, repo_id)
        if create_pr or self.owns(user, record.namespace):
            return record
        if revision.startswith("refs/pr/") and pr_author(record, revision.removeprefix("refs/pr/")) == user:
            return record
        raise HubError(403, f"You don't have the rights to write to {repo_type} repository {repo_id}; "
                            "open a pull request instead (create_pr=True).")
