"""Continuing a merge folder: fetch it (local or from the Hub, with its merge state), check it can
take more experts, and extend its recipe with them, pinned to exactly what was merged.

What :func:`hf_merge.api.add` does before the engine resumes; kept apart so the API reads as the flow.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hf_merge.errors import MergeStateError, RecipeError, UsageError
from hf_merge.hub import client as hub
from hf_merge.hub import sources
from hf_merge.hub.repo_ids import check_names
from hf_merge.hub.sources import split_reference
from hf_merge.io.merge_folder import STATE_FILENAME, MergeFolder
from hf_merge.merging.methods.registry import require_continual
from hf_merge.output_folder import check_output_folder
from hf_merge.recipe import EvalSpec, MergeRecipe, reference_key
from hf_merge.recipe_overrides import build_recipe
from hf_merge.step_evaluation import continued_tasks


def fetch_merged(merged: str | Path, output: str | Path | None, token: str | None) -> tuple[Path, str | None]:
    """The merge folder to continue, ``(folder, repo it came from)``: a local folder (copied when
    ``output`` names another), or a repo downloaded with its merge state."""
    local = Path(merged).expanduser()
    if local.is_dir():
        require_continual_folder(local / STATE_FILENAME, merged)
        output_dir = Path(output) if output else local
        check_output_folder(output_dir)
        if output_dir.resolve() != local.resolve():
            copy_result(local, output_dir)
        source_repo = None
    else:
        repo_id, revision = split_reference(str(merged))
        check_names(repo_ids={"merged repo": repo_id})
        require_continual_folder(hub.fetch_file(repo_id, STATE_FILENAME, revision, token), merged)
        output_dir = Path(output) if output else Path(repo_id.split("/")[-1])
        check_output_folder(output_dir)
        if MergeFolder(output_dir).has_state():
            raise UsageError(
                f"{output_dir} already holds a merge: pass --output DIR to download {merged} elsewhere, "
                f"or continue the local copy with `hf-merge add {output_dir} --experts ... --push-to-hub {repo_id}`"
            )
        sources.download_model(
            repo_id, revision=revision, token=token, allow_pickle=True,
            extra_patterns=hub.MERGE_RESULT_PATTERNS, local_dir=output_dir,
        )
        source_repo = repo_id
    if not MergeFolder(output_dir).has_state():
        raise MergeStateError(f"{merged} has no {STATE_FILENAME}: it was not made by hf-merge, so it cannot be continued")
    return output_dir, source_repo


def continued_recipe(previous: MergeRecipe, merged: str | Path, done: list[dict[str, Any]], experts: list[str], *,
                      output_dir: Path, push_to_hub: str | None, eval: EvalSpec | None,
                      overrides: dict[str, Any]) -> tuple[MergeRecipe, list[str]]:
    """The recipe extended with ``experts`` after the ``done`` ones, and the tasks to evaluate.

    The merged part's order is fixed by the lineage (pinned to what was merged); new experts
    follow in the order given; an expert merged already is refused.
    """
    merged_keys = {reference_key(pinned_name(e)): pinned_name(e) for e in done}
    merged_keys[reference_key(previous.base)] = previous.base
    for expert in experts:
        key = reference_key(expert)
        if key in merged_keys or (key[0], None) in merged_keys:
            raise RecipeError(f"expert {expert!r} is already merged in {merged}")
    tasks, evaluation = continued_tasks(previous, eval, len(done), len(experts))
    changes = {**overrides, "experts": [pinned_name(e) for e in done] + experts, "shuffle": False,
               "output": str(output_dir), "eval": evaluation}
    recipe = build_recipe(previous, changes, source="the continued recipe")
    if push_to_hub != recipe.push_to_hub:  # a local folder continued without --push-to-hub pushes nowhere
        recipe = recipe.replace(push_to_hub=push_to_hub)
    return recipe, tasks


def require_continual_folder(state_file: Path | None, merged: str | Path) -> None:
    """:class:`~hf_merge.errors.NotContinualError` when the merge saved in ``state_file`` used an all-at-once method."""
    if state_file is not None and state_file.is_file():  # else not an hf-merge result: said later, in full
        require_continual(MergeFolder(state_file.parent).state().method, merged)


def recipe_of(output_dir: Path) -> MergeRecipe:
    recipe = MergeRecipe.of_folder(output_dir)
    if recipe is not None:
        return recipe
    # A merge folder without a recipe (made with the engine directly): rebuild one from the state.
    folder = MergeFolder(output_dir)
    state = folder.state()
    base, experts = folder.lineage()
    return MergeRecipe(
        base=pinned_name(base) or str(base.get("path")),
        experts=[pinned_name(e) for e in experts],
        method=str(state.method or "opcm"),
        parameters={},
        scope=str(state.scope or "vision"),
    )


def pinned_base(entry: dict[str, Any], fallback: str) -> str:
    if entry.get("repo_id") and entry.get("commit_sha"):
        return f"{entry['repo_id']}@{entry['commit_sha']}"
    if entry.get("local_path") and Path(entry["local_path"]).is_dir():
        return str(entry["local_path"])
    return fallback


def pinned_name(entry: dict[str, Any]) -> str:
    """``repo@sha`` of a lineage entry (exactly what was merged), or its name for a local folder."""
    if entry.get("repo_id"):
        return entry["repo_id"] + (f"@{entry['revision']}" if entry.get("revision") else "")
    return str(entry.get("name") or entry.get("path") or "")


def copy_result(source: Path, destination: Path) -> None:

    from hf_merge.merging.state import recover

    if destination.exists() and any(destination.iterdir()):
        raise UsageError(f"output folder {destination} is not empty")
    recover(source)  # a step committed before a crash belongs to the copy; spare and staging files do not
    shutil.copytree(source, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".hf-merge-*"))
