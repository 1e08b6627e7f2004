"""The watcher's local copy of the merged repo at its head commit, and what it says about the merge.

Files change only when the head moves (a download into the same folder fetches just the changed
files); ``.watch-head`` names the commit the folder holds and is written after the download, so a
folder interrupted mid-download is never taken for a finished one.
"""

from __future__ import annotations

from pathlib import Path

from hf_merge.errors import MergeStateError
from hf_merge.hub import client as hub
from hf_merge.io.merge_folder import STATE_FILENAME, MergeFolder
from hf_merge.merging.methods.registry import require_continual
from hf_merge.recipe import MergeRecipe

HEAD_FILE = ".watch-head"


class Mirror:
    """The merged repo's files at one commit, in ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def head(self) -> str | None:
        """The commit the folder holds, or ``None`` while it holds none completely."""
        file = self.path / HEAD_FILE
        return file.read_text(encoding="utf-8").strip() if file.is_file() else None

    def invalidate(self) -> None:
        """Mark the folder stale (its files were edited, or the repo moved)."""
        (self.path / HEAD_FILE).unlink(missing_ok=True)

    def update(self, repo_id: str, head: str, token: str | None) -> None:
        """Make the folder hold ``repo_id`` at ``head``."""
        from hf_merge.hub.sources import download_model

        if self.head() == head:
            return
        self.invalidate()
        download_model(repo_id, revision=head, token=token, allow_pickle=True,
                       extra_patterns=hub.MERGE_RESULT_PATTERNS, local_dir=self.path)
        if not MergeFolder(self.path).has_state():
            raise MergeStateError(f"{repo_id} has no {STATE_FILENAME}: only a model made by hf-merge can be watched")
        require_continual(MergeFolder(self.path).state().method, repo_id)
        (self.path / HEAD_FILE).write_text(head, encoding="utf-8")

    def merged_commits(self) -> set[tuple[str | None, str | None]]:
        """``(repo_id, commit_sha)`` of every expert in the lineage: what was merged, for certain."""
        if not MergeFolder(self.path).has_state():
            return set()
        _, experts = MergeFolder(self.path).lineage()
        return {(e.get("repo_id"), e.get("commit_sha")) for e in experts}

    def recipe(self) -> MergeRecipe | None:
        return MergeRecipe.of_folder(self.path)

    def base_id(self) -> str:
        """Repo id of the merge's base."""
        entry = MergeFolder(self.path).lineage()[0]
        if entry.get("repo_id"):
            return str(entry["repo_id"])
        recipe = self.recipe()
        return recipe.base.partition("@")[0] if recipe is not None else ""

    def base_reference(self) -> str:
        """The base pinned to the commit the merge started from."""
        entry = MergeFolder(self.path).lineage()[0]
        if entry.get("repo_id") and entry.get("commit_sha"):
            return f"{entry['repo_id']}@{entry['commit_sha']}"
        return self.base_id()


def edit_recipe(folder: Path, **values: object) -> None:
    """Set fields of the recipe in ``folder`` (a staging copy of the mirror), validated again."""
    recipe = MergeRecipe.of_folder(folder)
    if recipe is None:
        return
    recipe.replace(**values).save(folder)
