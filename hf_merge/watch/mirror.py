"""The watcher's local copy of the merged repo at its head commit, and what it says about the merge.

Files change only when the head moves (a download into the same folder fetches just the changed
files); ``.watch-head`` names the commit the folder holds and is written after the download, so a
folder interrupted mid-download is never taken for a finished one.
"""

from __future__ import annotations

from pathlib import Path

from hf_merge.hub import client as hub
from hf_merge.publish.card import STATE_FILENAME, lineage, load_state
from hf_merge.errors import MergeStateError, NotContinualError
from hf_merge.merging.methods import METHODS
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
        if not (self.path / STATE_FILENAME).is_file():
            raise MergeStateError(f"{repo_id} has no {STATE_FILENAME}: only a model made by hf-merge can be watched")
        method = str(load_state(self.path).get("method", "opcm"))
        if method in METHODS and not METHODS[method].continual:
            raise NotContinualError(f"{repo_id} was merged with '{method}', which merges every expert at once: the watcher "
                                    "cannot add one; re-run `hf-merge merge` with all the experts, the merged ones and the new")
        (self.path / HEAD_FILE).write_text(head, encoding="utf-8")

    def merged_commits(self) -> set[tuple[str | None, str | None]]:
        """``(repo_id, commit_sha)`` of every expert in the lineage: what was merged, for certain."""
        if not (self.path / STATE_FILENAME).is_file():
            return set()
        _, experts = lineage(load_state(self.path))
        return {(e.get("repo_id"), e.get("commit_sha")) for e in experts}

    def recipe(self) -> MergeRecipe | None:
        return MergeRecipe.load(self.path) if (self.path / "recipe.yaml").is_file() else None

    def base_id(self) -> str:
        """Repo id of the merge's base."""
        entry = lineage(load_state(self.path))[0]
        if entry.get("repo_id"):
            return str(entry["repo_id"])
        recipe = self.recipe()
        return recipe.base.partition("@")[0] if recipe is not None else ""

    def base_reference(self) -> str:
        """The base pinned to the commit the merge started from."""
        entry = lineage(load_state(self.path))[0]
        if entry.get("repo_id") and entry.get("commit_sha"):
            return f"{entry['repo_id']}@{entry['commit_sha']}"
        return self.base_id()


def edit_recipe(folder: Path, **values: object) -> None:
    """Set fields of the ``recipe.yaml`` in ``folder`` (a staging copy of the mirror)."""
    path = folder / "recipe.yaml"
    if not path.is_file():
        return
    recipe = MergeRecipe.load(path)
    for name, value in values.items():
        setattr(recipe, name, value)
    recipe.save(folder)
