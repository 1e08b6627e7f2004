"""What each endpoint of the local Hub does: access rules (:mod:`~hf_merge.hub_server.access`), then storage."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, BinaryIO

from hf_merge.hub_server import discussions
from hf_merge.hub_server.access import BAD_TOKEN_MESSAGE, Access
from hf_merge.hub_server.git import HubError, should_use_lfs
from hf_merge.hub_server.lfs import LfsEndpoint
from hf_merge.hub_server.metadata import RepoViews, parse_front_matter, url_prefix
from hf_merge.hub_server.storage import REPO_TYPES, SPACE_SDKS, HubStorage, RepoRecord
from hf_merge.hub_server.webhooks import WebhookRegistry

__all__ = ["BAD_TOKEN_MESSAGE", "HubApi"]


class HubApi:
    """The local Hub's behaviour, independent of HTTP parsing (see ``hub_server`` for that).

    Args:
        root: Folder of the storage.
        tokens: User name -> token.
        orgs: Organization name -> its members, who own the organization's repos.
    """

    def __init__(self, root: str | Path, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.storage = HubStorage(root)
        self.access = Access(self.storage, tokens, orgs)
        self.views = RepoViews(self.storage)
        self.webhooks = WebhookRegistry(self.storage.root)
        self.lfs = LfsEndpoint(self.storage, self.access)

    # ---- identity and access --------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> str | None:
        """User of a ``Bearer`` token; ``None`` when there is none; 401 when it matches no user."""
        return self.access.authenticate(authorization)

    def _readable(self, user: str | None, repo_type: str, repo_id: str) -> RepoRecord:
        return self.access.readable(user, repo_type, repo_id)

    def _writable(self, user: str | None, repo_type: str, repo_id: str) -> RepoRecord:
        return self.access.writable(user, repo_type, repo_id)

    def _pr_author(self, record: RepoRecord, num: str) -> str | None:
        return discussions.pr_author(self.storage, record, num)

    def check_commit(self, user: str | None, repo_type: str, repo_id: str, revision: str, create_pr: bool) -> RepoRecord:
        """Whether ``user`` may commit to ``revision`` (or open a pull request): before the body is read."""
        return self.access.committer(user, repo_type, repo_id, revision, create_pr, self._pr_author)

    def whoami(self, user: str | None) -> dict[str, Any]:
        if user is None:
            raise HubError(401, BAD_TOKEN_MESSAGE)
        return {
            "type": "user",
            "id": user,
            "name": user,
            "fullname": user,
            "orgs": [{"name": org, "type": "org"} for org in self.access.orgs_of(user)],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
        }

    # ---- repos ----------------------------------------------------------------------------------
    def create_repo(self, user: str | None, body: dict[str, Any], base: str) -> tuple[int, dict[str, Any]]:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository.")
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type '{repo_type}'.")
        namespace, name = body.get("organization") or user, str(body.get("name") or "")
        if not self.access.owns(user, namespace):
            message = f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"'
            raise HubError(403, message)
        sdk = body.get("sdk")
        if repo_type == "space" and sdk not in SPACE_SDKS:
            raise HubError(400, f"A Space needs an sdk, one of {', '.join(SPACE_SDKS)}.")
        repo_id = f"{namespace}/{name}"
        url = f"{base}/{url_prefix(repo_type)}{repo_id}"
        private = bool(body.get("private")) or body.get("visibility") in ("private", "protected")
        record = RepoRecord(repo_type=repo_type, repo_id=repo_id, private=private, sdk=sdk)
        try:
            self.storage.create_repo(record, author=user)
        except HubError as error:
            if error.status == 409:
                return 409, {"error": error.message, "url": url}
            raise
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def delete_repo(self, user: str | None, body: dict[str, Any]) -> dict[str, Any]:
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        self._writable(user, repo_type, repo_id)
        self.storage.delete_repo(repo_type, repo_id)
        return {}

    def settings(self, user: str | None, repo_type: str, repo_id: str, body: dict[str, Any]) -> dict[str, Any]:
        record = self._writable(user, repo_type, repo_id)
        if "private" in body:
            record.private = bool(body["private"])
        if "visibility" in body:
            record.private = body["visibility"] in ("private", "protected")
        self.storage.update_repo(record)
        return {}

    def validate_yaml(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            parse_front_matter(str(body.get("content", "")))
        except ValueError as error:
            return 400, {"errors": [{"message": str(error)}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def list_repos(self, user: str | None, repo_type: str, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        """``GET /api/models``: ``filter`` (tags, all must match), ``search``, ``author``, ``sort``, ``limit``."""
        wanted = query.get("filter", [])
        search = (query.get("search") or [""])[-1].lower()
        author: str | None = (query.get("author") or [""])[-1] or None
        full = any((query.get(key) or [""])[-1].lower() in ("1", "true") for key in ("full", "cardData"))
        items = []
        for record in self.storage.list_repos(repo_type):
            if (record.private and not self.access.owns(user, record.namespace)) or (author and record.namespace != author):
                continue
            if search and search not in record.repo_id.lower():
                continue
            try:
                head = self.storage.resolve_revision(repo_type, record.repo_id, "main")
            except (HubError, FileNotFoundError):
                continue  # deleted while listing
            info = self.views.repo_info(record, head, full=full)
            if all(tag in info["tags"] or tag == record.repo_id for tag in wanted):
                items.append(info)
        sort = (query.get("sort") or ["id"])[-1]
        if sort in ("id", "lastModified", "createdAt", "likes", "downloads"):
            descending = (query.get("direction") or ["1" if sort == "id" else "-1"])[-1] == "-1"
            items.sort(key=lambda item: item[sort], reverse=descending)
        limit = (query.get("limit") or [""])[-1]
        return items[: int(limit)] if limit.isdigit() else items

    # ---- reads ------------------------------------------------------------------------------------
    def repo_info(self, user: str | None, repo_type: str, repo_id: str, revision: str) -> dict[str, Any]:
        record = self._readable(user, repo_type, repo_id)
        commit = self.storage.resolve_revision(repo_type, repo_id, revision)
        return self.views.repo_info(record, commit)

    def tree(
        self, user: str | None, repo_type: str, repo_id: str, revision: str, path: str, recursive: bool
    ) -> tuple[list[dict[str, Any]], str]:
        self._readable(user, repo_type, repo_id)
        commit = self.storage.resolve_revision(repo_type, repo_id, revision)
        entries = self.views.tree_listing(commit.tree, path.strip("/"), recursive)
        if entries is None:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit.id})
        return entries, commit.id

    def paths_info(
        self, user: str | None, repo_type: str, repo_id: str, revision: str, paths: list[str]
    ) -> list[dict[str, Any]]:
        self._readable(user, repo_type, repo_id)
        commit = self.storage.resolve_revision(repo_type, repo_id, revision)
        return self.views.paths_info(commit.tree, [str(path) for path in paths])

    def refs(self, user: str | None, repo_type: str, repo_id: str) -> dict[str, Any]:
        self._readable(user, repo_type, repo_id)
        refs = self.storage.read_refs(repo_type, repo_id)

        def item(name: str, ref: str, commit: str) -> dict[str, str]:
            return {"name": name, "ref": ref, "targetCommit": commit}

        return {
            "branches": [item(name, f"refs/heads/{name}", c) for name, c in sorted(refs.branches.items())],
            "converts": [],
            "tags": [item(name, f"refs/tags/{name}", c) for name, c in sorted(refs.tags.items())],
            "pullRequests": [
                item(f"refs/pr/{num}", f"refs/pr/{num}", c) for num, c in sorted(refs.pull_requests.items())
            ],
        }

    def commits(self, user: str | None, repo_type: str, repo_id: str, revision: str) -> list[dict[str, Any]]:
        self._readable(user, repo_type, repo_id)
        head = self.storage.resolve_revision(repo_type, repo_id, revision)
        return [
            {
                "id": commit.id,
                "title": commit.title,
                "message": commit.message,
                "authors": [{"user": commit.author}],
                "date": commit.date,
                "parents": commit.parents,
            }
            for commit in self.storage.history(repo_type, repo_id, head)
        ]

    def resolve(
        self, user: str | None, repo_type: str, repo_id: str, revision: str, path: str
    ) -> tuple[BinaryIO, dict[str, str]]:
        """An open file and the Hub's download headers (ETag, X-Repo-Commit, X-Linked-*)."""
        discussions.check_gated(self._readable(user, repo_type, repo_id), user)
        commit = self.storage.resolve_revision(repo_type, repo_id, revision)
        entry = commit.tree.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.id})
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.lfs_sha256 or entry.oid}"',
            "Content-Length": str(entry.size),
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'.encode("ascii", "replace").decode(),
        }
        if entry.lfs_sha256:
            headers["X-Linked-Etag"] = f'"{entry.lfs_sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        return self.storage.open_content(entry), headers

    def discussions(
        self, user: str | None, repo_type: str, repo_id: str, num: str, page: int, base: str
    ) -> dict[str, Any]:
        """``GET …/discussions`` (``num`` empty) or ``GET …/discussions/{num}``."""
        record = self._readable(user, repo_type, repo_id)
        if num:
            return discussions.discussion_details(self.storage, record, num, base)
        return discussions.list_discussions(self.storage, record, page, base)

    # ---- writes -----------------------------------------------------------------------------------
    def preupload(
        self, user: str | None, repo_type: str, repo_id: str, revision: str, body: dict[str, Any],
        create_pr: bool = False,
    ) -> dict[str, Any]:
        self.check_commit(user, repo_type, repo_id, revision, create_pr)
        try:
            tree = self.storage.resolve_revision(repo_type, repo_id, revision).tree
        except HubError:
            tree = {}  # a branch about to be created: nothing to compare with
        files = []
        for item in body.get("files", []):
            path, size = str(item.get("path", "")), int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample", "") or "")
            entry = tree.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if size > 0 and should_use_lfs(path, size, sample) else "regular",
                    "shouldIgnore": False,
                    # The client compares this with its own oid to skip unchanged files.
                    "oid": (entry.lfs_sha256 or entry.oid) if entry else None,
                }
            )
        return {"files": files}

    def commit(
        self,
        user: str | None,
        repo_type: str,
        repo_id: str,
        revision: str,
        lines: list[dict[str, Any]],
        create_pr: bool,
        base: str,
    ) -> dict[str, Any]:
        self.check_commit(user, repo_type, repo_id, revision, create_pr)
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with a header line.")
        header = lines[0].get("value") or {}
        if not header.get("summary"):
            raise HubError(400, "A commit needs a summary.")
        operations = [(str(line.get("key")), line.get("value") or {}) for line in lines[1:]]
        self._check_lfs_reachable(repo_type, repo_id, revision, operations)
        commit, pr_num = self.storage.commit(
            repo_type, repo_id, revision=revision, author=str(user), title=str(header["summary"]),
            message=str(header.get("description") or ""), operations=operations,
            parent_commit=header.get("parentCommit"), create_pr=create_pr,
        )
        self._notify(repo_type, repo_id, f"refs/pr/{pr_num}" if pr_num else f"refs/heads/{revision}",
                     commit.parents[0] if commit.parents else None, commit.id, base)
        repo_url = f"{base}/{url_prefix(repo_type)}{repo_id}"
        return {
            "success": True,
            "commitOid": commit.id,
            "commitUrl": f"{repo_url}/commit/{commit.id}",
            "pullRequestUrl": f"{repo_url}/discussions/{pr_num}" if pr_num else None,
        }

    def _check_lfs_reachable(self, repo_type: str, repo_id: str, revision: str,
                             operations: list[tuple[str, dict[str, Any]]]) -> None:
        """An LFS pointer may only name an object this repo's uploads brought (or its tree already has)."""
        wanted = [value for key, value in operations if key == "lfsFile"]
        if not wanted:
            return
        try:
            known = {e.lfs_sha256 for e in self.storage.resolve_revision(repo_type, repo_id, revision).tree.values()}
        except HubError:
            known = set()
        for value in wanted:
            oid = str(value.get("oid", ""))
            if oid not in known and not self.storage.repo_holds_lfs(repo_type, repo_id, oid):
                raise HubError(400, f"Your push was rejected because the LFS object of '{value.get('path')}' "
                                    "was not uploaded to this repo; upload its content first.")

    def _notify(self, repo_type: str, repo_id: str, ref: str, old: str | None, new: str, base: str) -> None:
        record = self.storage.get_repo(repo_type, repo_id)
        commit = self.storage.get_commit(repo_type, repo_id, new)
        self.webhooks.notify_commit(
            repo_type=repo_type, repo_id=repo_id, private=bool(record and record.private), ref=ref,
            old_sha=old, new_sha=new, base=base, tags=self.views.card_and_tags(commit)[1] if commit else [],
        )

    def change_pr(self, user: str | None, repo_type: str, repo_id: str, num: str, action: str,
                  body: dict[str, Any], base: str) -> dict[str, Any]:
        """``POST …/discussions/{num}/merge`` (owner only) or ``…/status`` (owner or the author)."""
        record = self.access.contributor(user, repo_type, repo_id)
        author = self._pr_author(record, num)
        if author is None:
            raise HubError(404, f"Discussion {num} not found", code="EntryNotFound")
        if action == "merge":
            self.access.writable(user, repo_type, repo_id)
            old = self.storage.resolve_revision(repo_type, repo_id, "main").id
            head = discussions.merge(self.storage, record, num, str(user))
            self._notify(repo_type, repo_id, "refs/heads/main", old, head, base)
            return {"newStatus": discussions.event("status-change", str(user), {"status": "merged"})}
        status = str(body.get("status", ""))
        if status not in ("open", "closed"):
            raise HubError(400, "status must be 'open' or 'closed'.")
        if user != author and not self.access.owns(user, record.namespace):
            raise HubError(403, f"Only the author or the owner of {repo_id} may change discussion {num}.")
        if discussions.status_of(self.storage, record, num) == "merged":
            raise HubError(400, f"Pull request {num} is merged.")
        self.storage.write_pr_state(repo_type, repo_id, num, status)
        return {"newStatus": discussions.event("status-change", str(user), {"status": status})}

    def ref(
        self,
        user: str | None,
        method: str,
        repo_type: str,
        repo_id: str,
        kind: str,
        name: str,
        body: dict[str, Any],
    ) -> dict[str, Any]:
        """Create (``POST``) or delete (``DELETE``) a branch or a tag."""
        self._writable(user, repo_type, repo_id)
        if method == "DELETE":
            self.storage.delete_ref(repo_type, repo_id, kind, name)
            return {}
        if kind == "branch":
            target = self.storage.create_ref(repo_type, repo_id, "branch", name, body.get("startingPoint") or "main")
            return {"name": name, "ref": f"refs/heads/{name}", "targetCommit": target}
        tag = str(body.get("tag") or "")
        target = self.storage.create_ref(repo_type, repo_id, "tag", tag, name)  # `name` is the revision here
        return {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": target}
