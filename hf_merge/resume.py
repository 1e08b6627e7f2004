"""Running the same ``hf-merge merge`` command again after a crash continues it.

A killed merge leaves its output folder at the last written step (see :mod:`hf_merge.merging.state`).
When the same command runs again, :func:`merge_or_resume` compares the folder's merge state with the
command's recipe. The same method, hyperparameters, scope and base, with the merged experts a prefix
of the command's experts in merge order, is the same merge: it continues from the last written step
and publishes as asked; with every step done, only the card, the push and the Space are redone (a
push of unchanged files makes no new commit). Anything else is another merge: it is refused, and
the message names the exact command that would continue or publish the folder.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_merge.errors import UsageError
from hf_merge.hub.sources import split_reference
from hf_merge.io.merge_folder import CARD_FILENAME, MergeFolder, MergeState
from hf_merge.log import get_logger
from hf_merge.publish.card import read_license
from hf_merge.recipe import EvalSpec, MergeRecipe

logger = get_logger(__name__)


@dataclass(frozen=True)
class RerunPlan:
    """How a command continues the merge in its output folder.

    Attributes:
        done: References of the experts already merged, in merge order (as the command spells them).
        remaining: The command's experts still to merge, in merge order.
    """

    done: list[str]
    remaining: list[str]


def plan_rerun(recipe: MergeRecipe, output_dir: Path) -> RerunPlan:
    """The continuation of the merge in ``output_dir`` that ``recipe`` describes.

    Raises:
        UsageError: The folder holds another merge; one line naming the command to run instead.
    """
    state = MergeFolder(output_dir).state()
    base, merged = MergeFolder(output_dir).lineage()
    ordered = recipe.ordered_experts()
    difference = _difference(recipe, state, base, merged, ordered)
    if difference is None:
        return RerunPlan(done=ordered[: len(merged)], remaining=ordered[len(merged):])
    not_merged = [e for e in ordered if not any(_same_model(e, entry) for entry in merged)]
    if not_merged:
        command = shlex.join(["hf-merge", "add", str(output_dir), "--experts", *not_merged]
                             + (["--push-to-hub", recipe.push_to_hub] if recipe.push_to_hub else []))
        advice = f"continue it with `{command}`"
    elif recipe.push_to_hub:
        advice = f"publish it with `{shlex.join(['hf-merge', 'push', str(output_dir), '--repo-id', recipe.push_to_hub])}`"
    else:
        advice = "it already holds every expert of this command"
    raise UsageError(f"{output_dir} already holds a merge of another recipe ({difference}); {advice}, "
                     "or choose another --output")


def merge_or_resume(recipe: MergeRecipe, *, token: str | None = None, create_pr: bool = False) -> Any:
    """``hf-merge merge``: a new merge, or the continuation of the same command's interrupted run.

    Returns:
        The :class:`~hf_merge.api.MergeResult`.

    Raises:
        UsageError: The output folder holds another merge (see :func:`plan_rerun`).
    """
    from hf_merge import api
    from hf_merge.hub.repo_ids import check_names
    from hf_merge.merging.state import recover

    output_dir = recipe.output_dir()
    check_names(repo_ids={"push_to_hub": recipe.push_to_hub, "space": recipe.space},
                references={"base": recipe.base, "expert": recipe.experts})
    if output_dir.is_dir():
        recover(output_dir)  # a step committed before the crash counts as done
    if not MergeFolder(output_dir).has_state():
        return api.merge(recipe, token=token, create_pr=create_pr)
    plan = plan_rerun(recipe, output_dir)
    logger.info("%s holds %d of this command's %d experts: continuing the merge", output_dir, len(plan.done),
                len(plan.done) + len(plan.remaining))
    _record_recipe(recipe, output_dir, plan, token)
    if plan.remaining:
        return api.add(output_dir, plan.remaining, token=token, push_to_hub=recipe.push_to_hub, create_pr=create_pr,
                       allow_pickle=recipe.allow_pickle, evict=recipe.evict, space=recipe.space,
                       partial_download=recipe.partial_download)
    from hf_merge.hub.client import resolve_token

    # Every step is done: what is left is what merge() does after its last step.
    ordered = recipe.replace(experts=plan.done, shuffle=False, eval=_ordered_eval(recipe))
    return api.publish_result(output_dir, ordered, token=resolve_token(token), licenses=api.previous_licenses(output_dir),
                              create_pr=create_pr)


# ------------------------------------------------------------------------------------ internals
def _difference(recipe: MergeRecipe, state: MergeState, base: dict[str, Any], merged: list[dict[str, Any]],
                ordered: list[str]) -> str | None:
    """What makes the saved merge another one than ``recipe``'s (``None``: the same, maybe shorter)."""
    if state.method != recipe.method:
        return f"method {state.method!r}, not {recipe.method!r}"
    if state.hyperparameters != recipe.hyperparameters():
        return f"hyperparameters {state.hyperparameters}, not {recipe.hyperparameters()}"
    if (state.scope or "vision") != recipe.scope:
        return f"scope {state.scope!r}, not {recipe.scope!r}"
    if not _same_model(recipe.base, base):
        return f"base {base.get('name') or base.get('repo_id')!r}, not {recipe.base!r}"
    if len(merged) > len(ordered):
        return f"{len(merged)} experts merged, more than the command's {len(ordered)}"
    for step, (reference, entry) in enumerate(zip(ordered, merged, strict=False), start=1):
        if not _same_model(reference, entry):
            return f"step {step} merged {entry.get('name') or entry.get('repo_id')!r}, not {reference!r}"
    return None


def _same_model(reference: str, entry: dict[str, Any]) -> bool:
    """Whether a lineage entry is what ``reference`` (``REPO[@REV]`` or a folder) names."""
    path = Path(reference).expanduser()
    if path.is_dir():
        recorded = entry.get("local_path") or (None if entry.get("repo_id") else entry.get("name") or entry.get("path"))
        return recorded is not None and Path(str(recorded)).expanduser().resolve() == path.resolve()
    repo_id, revision = split_reference(reference)
    if entry.get("repo_id") != repo_id:
        return False
    if revision in (None, "main"):
        return entry.get("revision") in (None, "main")
    return revision in (entry.get("revision"), entry.get("commit_sha"))


def _ordered_eval(recipe: MergeRecipe) -> EvalSpec | None:
    """The recipe's evaluation with its tasks in merge order (the continuation merges in that order)."""
    if recipe.eval is None:
        return None
    return recipe.eval.model_copy(update={"tasks": recipe.ordered_eval_tasks()})


def _record_recipe(recipe: MergeRecipe, output_dir: Path, plan: RerunPlan, token: str | None) -> None:
    """Write what the continuation reads from the folder: the command's recipe (a crash may have come
    before the first one was written) and, without a card yet, the parents' licences."""
    continued = recipe.replace(experts=plan.done, shuffle=False, output=None, eval=_ordered_eval(recipe))
    continued.save(output_dir)
    if (output_dir / CARD_FILENAME).is_file():
        return
    from hf_merge.publish.card import write_card

    base, merged = MergeFolder(output_dir).lineage()
    licenses = {}
    for entry in [base, *merged]:
        name = entry.get("name") or entry.get("repo_id") or entry.get("path") or "local folder"
        licenses[name] = _license_of(entry, token)
    write_card(output_dir, repo_id=recipe.push_to_hub, licenses=licenses, space_id=recipe.space, plot=False)


def _license_of(entry: dict[str, Any], token: str | None) -> str | None:
    """A parent's licence, read again from its card (the run that read it first was killed)."""
    if not entry.get("repo_id"):
        return read_license(entry.get("local_path") or entry.get("name"))
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
    )

    from hf_merge.hub import client as hub

    try:
        readme = huggingface_hub.hf_hub_download(entry["repo_id"], CARD_FILENAME, revision=entry.get("commit_sha"),
                                                 token=hub.resolve_token(token) or False, endpoint=hub.endpoint())
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        # no card, or the Hub is away: the new card says "not declared"
        logger.debug("no card for %s: %s", entry["repo_id"], error)
        return None
    return read_license(Path(readme).parent)
