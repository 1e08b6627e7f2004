"""On-disk storage of the local Hub: content-addressed blobs, commits and refs, like a bare git repo.

Layout under ``root`` (``objects/`` and ``tmp/``: :mod:`~hf_merge.hub_server.objects`)::

    repos/<type>s/<namespace>/<name>/
        repo.json                         private flag, Space SDK, creation date
        refs.json                         branches, tags, pull requests (name -> commit id)
        commits/<commit id>.json          parents, message, author, date and the full file tree
        lfs/<sha256>                      empty: an upload for this repo brought that LFS object

Every file is written to ``tmp/`` and renamed, so a crash or a restart never leaves a half-written
object, and readers never need a lock. Writers of one repo are serialised by a per-repo lock.

LFS objects are stored once, but a repo may only reference those its own uploads brought (the
``lfs/`` markers), as on the Hub: knowing another repo's sha256 does not give its bytes.
Deleting a repo collects the objects no remaining repo references.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

from hf_merge.hub_server.git import GITATTRIBUTES, HubError, git_blob_sha1, lfs_pointer
from hf_merge.hub_server.objects import ObjectStore
from hf_merge.hub_server.records import Commit, Refs, RepoRecord, TreeEntry, now_iso
from hf_merge.log import get_logger

logger = get_logger(__name__)

REPO_TYPES = ("model", "dataset", "space")
SPACE_SDKS = ("gradio", "streamlit", "docker", "static")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

class HubStorage:
    """Repos, commits, refs and blobs on disk; safe for many threads of one process."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.objects = ObjectStore(self.root)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self._locks: dict[tuple[str, str], threading.RLock] = {}
        self._locks_guard = threading.Lock()

    # ---- low level -------------------------------------------------------------------------------
    def _tmp_path(self) -> Path:
        return self.objects.tmp_path()

    def _write_atomic(self, path: Path, data: bytes) -> None:
        self.objects.write_atomic(path, data)

    def _write_json(self, path: Path, data: Any) -> None:
        self._write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())

    def repo_lock(self, repo_type: str, repo_id: str) -> threading.RLock:
        """The lock that serialises writes (commits, refs, deletion) to one repo."""
        with self._locks_guard:
            return self._locks.setdefault((repo_type, repo_id), threading.RLock())

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id

    # ---- blobs -------------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        """Store a regular file's content; returns its git blob sha1."""
        with self.objects.gc_lock.shared():
            return self.objects.put_blob(data)

    def lfs_size(self, sha256: str) -> int | None:
        """Size of a stored LFS object, or ``None`` if it was never (completely) uploaded."""
        return self.objects.lfs_size(sha256)

    def put_lfs(self, stream: Iterator[bytes], sha256: str, size: int, *, repo: tuple[str, str] | None = None) -> None:
        """Store an LFS object from chunks, refusing content whose sha256 or size is not the promised one.

        ``repo`` (type, id): the repo the upload was for, which may then reference the object
        (:meth:`repo_holds_lfs`); uploads of the storage's own callers (replicas) pass none.
        """
        tmp = self.objects.receive_lfs(stream, sha256, size)
        with self.objects.gc_lock.shared():
            self.objects.install_lfs(tmp, sha256)
            if repo is not None:
                marker = self._repo_dir(*repo) / "lfs" / sha256
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()

    def repo_holds_lfs(self, repo_type: str, repo_id: str, sha256: str) -> bool:
        """Whether an upload for this repo brought the LFS object ``sha256`` (and it is stored)."""
        if self.lfs_size(sha256) is None:
            return False
        return (self._repo_dir(repo_type, repo_id) / "lfs" / sha256).is_file()

    def open_content(self, entry: TreeEntry) -> BinaryIO:
        """Open a file of a tree for reading (the real content, also for LFS files)."""
        return self.objects.open_content(entry.lfs_sha256, entry.oid)

    def read_content(self, entry: TreeEntry) -> bytes:
        with self.open_content(entry) as file:
            return file.read()

    def collect_garbage(self) -> tuple[int, int]:
        """Delete the objects no repo references (by a commit, or by an upload not committed yet).

        Returns:
            (objects removed, bytes freed).
        """
        with self.objects.gc_lock.exclusive():
            blobs: set[str] = set()
            lfs: set[str] = set()
            for commits in (self.root / "repos").glob("*/*/*/commits"):
                for path in commits.glob("*.json"):
                    try:
                        tree = json.loads(path.read_text())["tree"]
                    except (OSError, ValueError, KeyError):
                        continue
                    for entry in tree.values():
                        (lfs.add(entry["lfs_sha256"]) if entry.get("lfs_sha256") else blobs.add(entry["oid"]))
            lfs.update(path.name for path in (self.root / "repos").glob("*/*/*/lfs/*"))
            removed, freed = self.objects.sweep(blobs, lfs)
        if removed:
            logger.info("Garbage collection removed %d object(s), %d bytes", removed, freed)
        return removed, freed

    # ---- repos ----------------------------------------------------------------------------------
    def create_repo(self, record: RepoRecord, author: str) -> None:
        """Create a repo with the Hub's initial commit (``.gitattributes``) on ``main``."""
        namespace, _, name = record.repo_id.partition("/")
        if not (_NAME_RE.match(namespace) and _NAME_RE.match(name)) or name.endswith((".git", ".")):
            raise HubError(400, f"Invalid repo name '{record.repo_id}'.")
        with self.repo_lock(record.repo_type, record.repo_id), self.objects.gc_lock.shared():
            repo_dir = self._repo_dir(record.repo_type, record.repo_id)
            if (repo_dir / "repo.json").exists():
                raise HubError(409, f"You already created this {record.repo_type} repo")
            content = GITATTRIBUTES.encode()
            tree = {".gitattributes": TreeEntry(oid=self.objects.put_blob(content), size=len(content))}
            commit = self._new_commit([], "initial commit", "", author, tree)
            self._write_commit(record.repo_type, record.repo_id, commit)
            self.write_refs(record.repo_type, record.repo_id, Refs(branches={"main": commit.id}))
            self._write_json(repo_dir / "repo.json", asdict(record))

    def get_repo(self, repo_type: str, repo_id: str) -> RepoRecord | None:
        """The repo's record, or ``None`` if there is no such repo (or the id cannot name one)."""
        namespace, _, name = repo_id.partition("/")
        if repo_type not in REPO_TYPES or not (_NAME_RE.match(namespace) and _NAME_RE.match(name)):
            return None  # also keeps ids such as "../x" from reaching the file system
        path = self._repo_dir(repo_type, repo_id) / "repo.json"
        try:
            return RepoRecord(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def update_repo(self, record: RepoRecord) -> None:
        with self.repo_lock(record.repo_type, record.repo_id):
            self._write_json(self._repo_dir(record.repo_type, record.repo_id) / "repo.json", asdict(record))

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        """Remove a repo, then the objects no other repo references (so deleting frees disk space)."""
        with self.repo_lock(repo_type, repo_id):
            repo_dir = self._repo_dir(repo_type, repo_id)
            # Renaming first makes the deletion atomic for readers.
            trash = self._tmp_path()
            os.replace(repo_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            self.collect_garbage()
        except OSError as error:  # the repo is gone either way; the next deletion collects again
            logger.warning("Garbage collection after deleting %s failed: %s", repo_id, error)

    def list_repos(self, repo_type: str) -> list[RepoRecord]:
        base = self.root / "repos" / f"{repo_type}s"
        records = []
        for path in sorted(base.glob("*/*/repo.json")):
            try:
                records.append(RepoRecord(**json.loads(path.read_text())))
            except (FileNotFoundError, json.JSONDecodeError):
                continue  # deleted meanwhile
        return records

    # ---- refs and commits -----------------------------------------------------------------------
    def read_refs(self, repo_type: str, repo_id: str) -> Refs:
        data = json.loads((self._repo_dir(repo_type, repo_id) / "refs.json").read_text())
        return Refs(**data)

    def write_refs(self, repo_type: str, repo_id: str, refs: Refs) -> None:
        self._write_json(self._repo_dir(repo_type, repo_id) / "refs.json", asdict(refs))

    def _new_commit(self, parents: list[str], title: str, message: str, author: str, tree: dict) -> Commit:
        seed = json.dumps([parents, title, message, author, time.time_ns(), uuid.uuid4().hex]).encode()
        return Commit(
            id=hashlib.sha1(seed).hexdigest(), parents=parents, title=title, message=message,
            author=author, date=now_iso(), tree=dict(tree),
        )

    def _write_commit(self, repo_type: str, repo_id: str, commit: Commit) -> None:
        path = self._repo_dir(repo_type, repo_id) / "commits" / f"{commit.id}.json"
        self._write_json(path, commit.to_json())

    def get_commit(self, repo_type: str, repo_id: str, commit_id: str) -> Commit | None:
        if not _COMMIT_RE.match(commit_id):
            return None
        path = self._repo_dir(repo_type, repo_id) / "commits" / f"{commit_id}.json"
        try:
            return Commit.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def resolve_revision(self, repo_type: str, repo_id: str, revision: str) -> Commit:
        """Branch, tag, ``refs/pr/N``, ``refs/heads/x`` or a full commit id -> the commit."""
        refs = self.read_refs(repo_type, repo_id)
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        commit_id = refs.branches.get(name) or refs.tags.get(name)
        if commit_id is None and revision.startswith("refs/pr/"):
            commit_id = refs.pull_requests.get(revision.removeprefix("refs/pr/"))
        if commit_id is None and _COMMIT_RE.match(revision):
            commit_id = revision
        commit = self.get_commit(repo_type, repo_id, commit_id) if commit_id else None
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    def history(self, repo_type: str, repo_id: str, head: Commit) -> list[Commit]:
        """Commits reachable from ``head`` by first parents, newest first."""
        commits = [head]
        while commits[-1].parents:
            parent = self.get_commit(repo_type, repo_id, commits[-1].parents[0])
            if parent is None:
                break
            commits.append(parent)
        return commits

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        *,
        revision: str,
        author: str,
        title: str,
        message: str,
        operations: list[tuple[str, dict[str, Any]]],
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[Commit, int | None]:
        """Apply ndjson operations on top of ``revision``; returns the commit and the PR number, if any."""
        with self.repo_lock(repo_type, repo_id), self.objects.gc_lock.shared():
            refs = self.read_refs(repo_type, repo_id)
            if revision.startswith("refs/pr/"):
                ref_kind, ref_name = "pull_requests", revision.removeprefix("refs/pr/")
            else:
                ref_kind, ref_name = "branches", revision.removeprefix("refs/heads/")
            head_id = getattr(refs, ref_kind).get(ref_name)
            if head_id is None:
                raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            if parent_commit is not None and parent_commit != head_id:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            head = self.get_commit(repo_type, repo_id, head_id)
            assert head is not None, f"ref {revision} points to a missing commit"
            tree = self._apply(dict(head.tree), operations)
            commit = self._new_commit([head.id], title, message, author, tree)
            self._write_commit(repo_type, repo_id, commit)
            pr_num = None
            if create_pr:
                pr_num = max((int(num) for num in refs.pull_requests), default=0) + 1
                refs.pull_requests[str(pr_num)] = commit.id
            else:
                getattr(refs, ref_kind)[ref_name] = commit.id
            self.write_refs(repo_type, repo_id, refs)
            return commit, pr_num

    def _apply(self, tree: dict[str, TreeEntry], operations: list[tuple[str, dict[str, Any]]]) -> dict:
        for key, value in operations:
            path = str(value.get("path", "")).strip("/")
            if not path or ".." in path.split("/"):
                raise HubError(400, f"Invalid path in commit: '{value.get('path')}'.")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding for '{path}'.")
                data = base64.b64decode(value.get("content", ""))
                tree[path] = TreeEntry(oid=self.objects.put_blob(data), size=len(data))
            elif key == "lfsFile":
                sha256 = str(value.get("oid", ""))
                stored = self.lfs_size(sha256)
                if stored is None:
                    raise HubError(400, f"Your push was rejected because the LFS object of '{path}' was not uploaded.")
                if value.get("size") is not None and int(value["size"]) != stored:
                    raise HubError(400, f"Size of '{path}' does not match its uploaded LFS object.")
                tree[path] = TreeEntry(oid=git_blob_sha1(lfs_pointer(sha256, stored)), size=stored, lfs_sha256=sha256)
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            elif key == "deletedFolder":
                doomed = [name for name in tree if name.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for name in doomed:
                    del tree[name]
            else:
                raise HubError(400, f"Unknown commit operation '{key}'.")
        return tree

    def create_ref(self, repo_type: str, repo_id: str, kind: str, name: str, starting_point: str) -> str:
        """Create a branch or tag at a revision; 409 if it exists. Returns the commit id."""
        with self.repo_lock(repo_type, repo_id):
            refs = self.read_refs(repo_type, repo_id)
            table = refs.branches if kind == "branch" else refs.tags
            if name in table:
                raise HubError(409, f"Reference already exists: {name}")
            if not name or name.startswith("refs/") or ".." in name or " " in name:
                raise HubError(400, f"Invalid reference name: {name}")
            table[name] = self.resolve_revision(repo_type, repo_id, starting_point).id
            self.write_refs(repo_type, repo_id, refs)
            return table[name]

    def delete_ref(self, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        with self.repo_lock(repo_type, repo_id):
            refs = self.read_refs(repo_type, repo_id)
            table = refs.branches if kind == "branch" else refs.tags
            if name not in table or (kind == "branch" and name == "main"):
                raise HubError(404 if name not in table else 403, f"Cannot delete reference: {name}")
            del table[name]
            self.write_refs(repo_type, repo_id, refs)

    # ---- pull requests ----------------------------------------------------------------------------
    def merge_commit(self, repo_type: str, repo_id: str, branch: str, expected_head: str, parents: list[str],
                     tree: dict[str, TreeEntry] | None, title: str, author: str) -> str:
        """Move ``branch`` from ``expected_head`` (412 if it moved) to a new commit of ``tree`` with
        ``parents``, or fast-forward it to ``parents[-1]`` when ``tree`` is ``None``; returns the new head."""
        with self.repo_lock(repo_type, repo_id), self.objects.gc_lock.shared():
            refs = self.read_refs(repo_type, repo_id)
            if refs.branches.get(branch) != expected_head:
                raise HubError(412, "The branch moved while merging. Please retry.")
            if tree is None:
                head = parents[-1]
            else:
                commit = self._new_commit(parents, title, "", author, tree)
                self._write_commit(repo_type, repo_id, commit)
                head = commit.id
            refs.branches[branch] = head
            self.write_refs(repo_type, repo_id, refs)
            return head

    def read_pr_states(self, repo_type: str, repo_id: str) -> dict[str, str]:
        """Pull request number -> ``"closed"`` for those closed without merging (open ones are absent)."""
        try:
            return dict(json.loads((self._repo_dir(repo_type, repo_id) / "pr_states.json").read_text()))
        except FileNotFoundError:
            return {}

    def write_pr_state(self, repo_type: str, repo_id: str, num: str, status: str) -> None:
        with self.repo_lock(repo_type, repo_id):
            states = self.read_pr_states(repo_type, repo_id)
            if status == "closed":
                states[num] = status
            else:
                states.pop(num, None)
            self._write_json(self._repo_dir(repo_type, repo_id) / "pr_states.json", states)
