"""Where a model comes from: a local folder, or a Hub repo id at a revision.

``resolve`` turns what a user typed (``"org/name"``, ``"org/name@rev"`` or a folder path) into a
:class:`ModelSource`: a local snapshot folder plus the provenance the merge state and the model card
record. Local folders work wherever a repo id does, as in ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSource:
    """A model snapshot on local disk and where it came from.

    Attributes:
        path: Folder with ``config.json`` and the weights (safetensors, single or sharded).
        repo_id: Hub repo id, or ``None`` for a plain local folder.
        revision: The revision the user asked for (branch, tag or sha), or ``None``.
        commit_sha: The exact commit the snapshot was downloaded from, or ``None`` for a folder.
    """

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None

    @classmethod
    def local(cls, path: str | Path) -> "ModelSource":
        """A plain local folder, with no Hub provenance."""
        return cls(path=Path(path).expanduser().resolve())

    @property
    def name(self) -> str:
        """What to show a person: the repo id (with revision if pinned) or the folder path."""
        if self.repo_id is None:
            return str(self.path)
        return self.repo_id if self.revision in (None, "main") else f"{self.repo_id}@{self.revision}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready provenance (the path is local and therefore not recorded)."""
        data = asdict(self)
        data.pop("path")
        data["name"] = self.name
        return data


def split_reference(reference: str) -> tuple[str, str | None]:
    """Split ``"org/name@rev"`` into ``("org/name", "rev")``; no ``@`` gives revision ``None``."""
    if "@" in reference:
        repo_id, _, revision = reference.partition("@")
        return repo_id, revision or None
    return reference, None


def resolve(
    reference: str | Path | ModelSource,
    *,
    token: str | bool | None = None,
    allow_pickle: bool = False,
) -> ModelSource:
    """Resolve a folder path, ``repo_id`` or ``repo_id@revision`` to a local snapshot.

    An existing local folder wins over a repo id of the same spelling, as in ``from_pretrained``.
    Repo ids are downloaded with :func:`hf_merge.hub.download_model` (safetensors, config and
    processor files only).
    """
    if isinstance(reference, ModelSource):
        return reference
    path = Path(reference).expanduser()
    if path.is_dir():
        return ModelSource.local(path)
    from .hub import download_model  # the Hub client is only needed for repo ids

    repo_id, revision = split_reference(str(reference))
    return download_model(repo_id, revision=revision, token=token, allow_pickle=allow_pickle)
