"""What the local Hub stores about repos: their records, refs, commits and the files of a tree."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from hf_merge.hub_server.git import lfs_pointer


def now_iso() -> str:
    """UTC timestamp in the Hub's format (``2024-01-01T00:00:00.000Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class TreeEntry:
    """One file of a commit's tree. ``oid`` is the git blob sha1 (of the pointer, for LFS files)."""

    oid: str
    size: int
    lfs_sha256: str | None = None

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.lfs_sha256 or "", self.size)) if self.lfs_sha256 else 0


@dataclass
class Commit:
    """A commit: the whole tree (path -> entry) is stored, not a diff, so reads are one file."""

    id: str
    parents: list[str]
    title: str
    message: str
    author: str
    date: str
    tree: dict[str, TreeEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tree"] = {path: asdict(entry) for path, entry in self.tree.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        tree = {path: TreeEntry(**entry) for path, entry in data.pop("tree").items()}
        return cls(tree=tree, **data)


@dataclass
class RepoRecord:
    """What the Hub knows about a repo besides its git content."""

    repo_type: str
    repo_id: str
    private: bool = False
    sdk: str | None = None
    created_at: str = field(default_factory=now_iso)
    gated: str | bool = False  # "auto" / "manual": files only for the namespace and gated_accepted
    gated_accepted: list[str] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]


@dataclass
class Refs:
    """Named pointers to commits. Pull requests live at ``refs/pr/<num>``."""

    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[str, str] = field(default_factory=dict)  # str(num) -> commit id
