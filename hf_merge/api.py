"""What a user calls: ``merge`` a list of experts into a base, ``add`` experts to a merged repo.

The flow reads top to bottom: validate the recipe -> check every model on the Hub (cheap, before
any weights move) -> merge one expert at a time (evaluating after each step when asked) -> write
the recipe and the model card -> push one commit -> publish the Space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_merge.continuation import continued_recipe, fetch_merged, pinned_base, recipe_of
from hf_merge.errors import RecipeError, UsageError
from hf_merge.hub import client as hub
from hf_merge.hub import sources
from hf_merge.hub.preflight import check_models
from hf_merge.hub.push import push_merge
from hf_merge.hub.repo_ids import check_names
from hf_merge.hub.sources import resolve
from hf_merge.io.merge_folder import STATE_FILENAME, MergeFolder
from hf_merge.log import get_logger
from hf_merge.merging.methods import get_method
from hf_merge.output_folder import check_output_folder, weights_bytes
from hf_merge.progress import Phase
from hf_merge.publish.card import read_license, write_card
from hf_merge.recipe import EvalSpec, MergeRecipe
from hf_merge.recipe_overrides import build_recipe
from hf_merge.step_evaluation import average_accuracy, evaluation_hook, final_only_unless_continual
from hf_merge.validation_scoring import tuner_for

logger = get_logger(__name__)


@dataclass
class MergeResult:
    """The outcome of :func:`merge` or :func:`add`.

    Attributes:
        output_dir: Local folder with the merged model, its card, recipe, merge state and results.
        recipe: The recipe that was run (for ``add``: the original one, extended with the new experts).
        steps: Provenance of every merged expert, in order (``name``, ``repo_id``, ``commit_sha``, ``step``).
        accuracy: Average accuracy (0-1) on the tasks seen so far after each step, when evaluated.
        commit_url: URL of the pushed commit (or pull request), when pushed.
        space_url: URL of the published Space, when published.
        is_main_process: False in the other processes of an ``accelerate launch`` run, which merge
            but leave writing and publishing to the main process.
    """

    output_dir: Path
    recipe: MergeRecipe
    steps: list[dict[str, Any]] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    commit_url: str | None = None
    space_url: str | None = None
    is_main_process: bool = True

    @property
    def repo_id(self) -> str | None:
        return self.recipe.push_to_hub


def merge(recipe: MergeRecipe | str | Path | None = None, *, token: str | None = None, create_pr: bool = False, **fields: Any) -> MergeResult:
    """Merge fine-tuned CLIP models one after another, then card, push and publish as the recipe says.

    Args:
        recipe: A :class:`MergeRecipe`, a path to a YAML recipe, or ``None`` to build one from ``fields``.
        token: Hub token (default: ``HF_TOKEN`` or the stored login). Never written anywhere.
        create_pr: Push as a pull request instead of a commit on ``main``.
        **fields: Recipe fields (``base``, ``experts``, ``method``, ``parameters``, ``eval``, ...);
            with a recipe, they override its values.

    Example:
        >>> from hf_merge import merge
        >>> result = merge(base="openai/clip-vit-base-patch32",
        ...                experts=["tanganke/clip-vit-base-patch32_sun397", "tanganke/clip-vit-base-patch32_dtd"],
        ...                method="opcm", parameters={"alpha": 0.5}, push_to_hub="me/clip-opcm")
    """
    recipe = build_recipe(recipe, fields, source="arguments")
    check_names(repo_ids={"push_to_hub": recipe.push_to_hub, "space": recipe.space},
                references={"base": recipe.base, "expert": recipe.experts})
    token = hub.resolve_token(token)
    output_dir = recipe.output_dir()
    if MergeFolder(output_dir).has_state():
        raise UsageError(
            f"{output_dir} already holds a merge; continue it with `hf-merge add {output_dir} --experts ...` "
            "or choose another --output"
        )
    experts = recipe.ordered_experts()
    check_output_folder(output_dir)
    spec = final_only_unless_continual(recipe.eval, get_method(recipe.method))
    hook = evaluation_hook(spec, recipe.ordered_eval_tasks(), experts, done=0, base=recipe.base, token=token)
    tuner = tuner_for(recipe, recipe.ordered_eval_tasks(), len(experts), base=recipe.base, token=token)
    check_models(recipe.base, experts, token=token, allow_pickle=recipe.allow_pickle, scope=recipe.scope)
    check_output_folder(output_dir, weights_bytes=weights_bytes(recipe.base, token=token))

    from hf_merge.merging.engine import ContinualMerger

    base = _resolve_base(recipe.base, token=token, allow_pickle=recipe.allow_pickle)
    licenses = {base.name: read_license(base.path)}
    merger = ContinualMerger(
        base,
        output_dir,
        method=recipe.method,
        scope=recipe.scope,
        hyperparameters=recipe.hyperparameters(),
        on_step=_step_hook(hook, recipe),
        token=token,
        allow_pickle=recipe.allow_pickle,
        checkpoint_every=_checkpoint_every(recipe),
        tuner=tuner,
    )
    with merger:
        _merge_experts(merger, experts, recipe, token, licenses)
    if not merger.executor.is_main_process:  # under `accelerate launch`, the main process publishes
        return MergeResult(output_dir=output_dir, recipe=recipe, is_main_process=False)
    _evaluate_final(hook, recipe, merger)
    return publish_result(output_dir, recipe, token=token, licenses=licenses, create_pr=create_pr)


def add(
    merged: str | Path,
    experts: Sequence[str],
    *,
    token: str | None = None,
    output: str | Path | None = None,
    push_to_hub: str | None = None,
    create_pr: bool = False,
    eval: EvalSpec | None = None,
    allow_pickle: bool | None = None,
    evict: bool | None = None,
    space: str | None = None,
    partial_download: bool | None = None,
    tune: bool | None = None,
) -> MergeResult:
    """Continue a merge: pull a merged repo with its merge state, merge more experts, push a new commit.

    Args:
        merged: Repo id (``USER/NAME[@REV]``) of a model made by hf-merge, or its local folder.
        experts: New experts, merged in this order after the existing ones.
        token: Hub token (default: ``HF_TOKEN`` or the stored login).
        output: Local folder for the continued merge (default: the repo name).
        push_to_hub: Where to push (default: the repo it came from; a local folder pushes nowhere).
        create_pr: Open a pull request instead of committing to ``main``.
        eval: Evaluation settings (default: the recipe's).
        allow_pickle, evict, space, partial_download, tune: As in the recipe (default: the recipe's values).
    """
    experts = [str(e) for e in experts]
    if not experts:
        raise RecipeError("`add` needs at least one new expert: --experts REPO[@REV] ...")
    check_names(repo_ids={"push_to_hub": push_to_hub, "space": space}, references={"merged model": str(merged), "expert": experts})
    token = hub.resolve_token(token)
    output_dir, source_repo = fetch_merged(merged, output, token)
    folder = MergeFolder(output_dir)
    base_entry, done = folder.lineage()
    recipe, tasks = continued_recipe(
        recipe_of(output_dir), merged, done, experts, output_dir=output_dir, push_to_hub=push_to_hub or source_repo,
        eval=eval, overrides={"allow_pickle": allow_pickle, "evict": evict, "space": space,
                              "partial_download": partial_download, "tune": tune},
    )
    base_reference = pinned_base(base_entry, recipe.base)
    hook = evaluation_hook(recipe.eval, tasks, recipe.experts, done=len(done), output_dir=output_dir,
                           base=base_reference, token=token)
    tuner = tuner_for(recipe, tasks, len(recipe.experts), base=base_reference, token=token)
    check_models(base_reference, experts, token=token, allow_pickle=recipe.allow_pickle,
                 scope=recipe.scope, merged_names=folder.state().merged_names)

    from hf_merge.merging.engine import ContinualMerger

    # The base pinned to the commit the merge started from (the engine refuses any other).
    base = _resolve_base(base_reference, token=token, allow_pickle=recipe.allow_pickle)
    licenses = previous_licenses(output_dir)
    base_name = base_entry.get("name") or base.name
    if licenses.get(base_name) is None:
        licenses[base_name] = read_license(base.path)
    merger = ContinualMerger.resume(output_dir, base=base, on_step=_step_hook(hook, recipe), token=token,
                                    allow_pickle=recipe.allow_pickle, checkpoint_every=_checkpoint_every(recipe), tuner=tuner)
    with merger:
        _merge_experts(merger, experts, recipe, token, licenses)
    if not merger.executor.is_main_process:
        return MergeResult(output_dir=output_dir, recipe=recipe, is_main_process=False)
    _evaluate_final(hook, recipe, merger)
    message = f"hf-merge: add {len(experts)} expert{'s' if len(experts) > 1 else ''} ({', '.join(experts)})"
    return publish_result(output_dir, recipe, token=token, licenses=licenses, create_pr=create_pr, commit_message=message)


def push(output_dir: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
         create_pr: bool = False, commit_message: str | None = None) -> str:
    """Push a finished merge folder (again): what ``hf-merge push`` and a failed push's retry run."""
    check_names(repo_ids={"repo_id": repo_id})
    output_dir = Path(output_dir)
    folder = MergeFolder(output_dir)
    if not folder.has_state():
        raise UsageError(f"{output_dir} is not an hf-merge result (no {STATE_FILENAME})")
    if folder.card_path.is_file():
        # The card's usage snippet names the repo; regenerate it if pushing somewhere new.
        write_card(output_dir, repo_id=repo_id, licenses=None)
    return push_merge(output_dir, repo_id, token=hub.resolve_token(token), private=private,
                          create_pr=create_pr, commit_message=commit_message)


def card(output_dir: str | Path, *, repo_id: str | None = None, space: str | None = None) -> Path:
    """(Re)generate ``README.md`` (and ``accuracy.png``) of a local merge folder."""
    check_names(repo_ids={"repo_id": repo_id, "space": space})
    output_dir = Path(output_dir)
    if repo_id is None:
        recipe = MergeRecipe.of_folder(output_dir)
        repo_id = recipe.push_to_hub if recipe is not None else None
    return write_card(output_dir, repo_id=repo_id, licenses=None, space_id=space)


# ------------------------------------------------------------------------------------ internals
def _resolve_base(reference: str, *, token: str | None, allow_pickle: bool) -> Any:
    with Phase("Downloading the base", 1, unit="model") as phase:
        phase.describe(reference)
        base = resolve(reference, token=token, allow_pickle=allow_pickle)
        phase.step(base.name)
    return base


def _merge_experts(merger: Any, experts: Sequence[str], recipe: MergeRecipe, token: str | None, licenses: dict) -> None:
    from hf_merge.hub.prefetch import Prefetcher

    prefixes = _partial_prefixes(recipe)

    def fetch(reference: str, transfer: Any) -> sources.ModelSource:
        return resolve(reference, token=token, allow_pickle=recipe.allow_pickle, tensor_prefixes=prefixes, transfer=transfer)

    # The next expert downloads while this one merges; with evict, at most two are on disk (all, for all-at-once).
    prefetcher = Prefetcher(experts, fetch, discard=sources.evict if recipe.evict else None)
    merged: list[sources.ModelSource] = []
    with Phase("Merging", len(experts), unit="expert") as phase, prefetcher:
        for i, source in enumerate(prefetcher):
            phase.describe(source.name)
            licenses[source.name] = read_license(source.path)
            merger.add(source, final=i == len(experts) - 1)
            merged.append(source)
            if recipe.evict and merger.method.continual:
                sources.evict(merged.pop())
            phase.step(source.name)
    for source in merged if recipe.evict else ():  # an all-at-once merge read them all at the end
        sources.evict(source)


def _partial_prefixes(recipe: MergeRecipe) -> tuple[str, ...] | None:
    """Tensor prefixes to download experts for, or ``None`` for full snapshots."""
    from hf_merge.io.validation import SCOPES

    prefixes = SCOPES.get(recipe.scope)
    if not recipe.partial_download or not prefixes or "" in prefixes:
        return None
    if _evaluates_every_step(recipe):
        return None  # each expert is evaluated too, from a full snapshot: a partial one would be a second download
    return tuple(prefixes)


def _checkpoint_every(recipe: MergeRecipe) -> int | None:
    """How often the run writes its output: 1 when every step is evaluated (the evaluation reads
    the written model), else the recipe's ``checkpoint_every``, else ``None``: the method's policy."""
    if _evaluates_every_step(recipe):
        return 1
    return recipe.checkpoint_every


def _evaluates_every_step(recipe: MergeRecipe) -> bool:
    return recipe.eval is not None and recipe.eval.every_step and get_method(recipe.method).continual


def _step_hook(hook: Any, recipe: MergeRecipe) -> Any:
    """The engine's ``on_step``: the evaluation hook when it evaluates every step. A final-only
    evaluation runs after the merge instead, so the engine keeps the method's checkpoint policy."""
    return hook if _evaluates_every_step(recipe) else None


def _evaluate_final(hook: Any, recipe: MergeRecipe, merger: Any) -> None:
    """Evaluate the final model (written: the last step always is) when only it is evaluated."""
    if hook is not None and not _evaluates_every_step(recipe):
        hook(merger.step, merger.output_dir, merger.state)


def publish_result(output_dir: Path, recipe: MergeRecipe, *, token: str | None, licenses: dict, create_pr: bool,
                   commit_message: str | None = None) -> MergeResult:
    """Save the recipe, write the card, push and publish the Space of a finished merge folder: what
    a merge does after its last step (and a rerun whose steps were all done before a crash)."""
    # The output folder is a local detail: the published recipe reproduces the merge anywhere.
    recipe.replace(output=None).save(output_dir)
    write_card(output_dir, repo_id=recipe.push_to_hub, licenses=licenses, space_id=recipe.space)
    _, steps = MergeFolder(output_dir).lineage()
    result = MergeResult(output_dir=output_dir, recipe=recipe, steps=steps, accuracy=average_accuracy(output_dir, len(steps)))
    if recipe.push_to_hub:
        result.commit_url = push_merge(output_dir, recipe.push_to_hub, token=token, private=recipe.private,
                                           create_pr=create_pr, commit_message=commit_message)
        logger.info("Pushed %s", result.commit_url)
    if recipe.space:
        if not recipe.push_to_hub:
            raise UsageError("a Space needs a published model: set push_to_hub as well as space")
        from hf_merge.publish.space import publish_space

        # The card pushed above already links the Space, so the model repo keeps one commit per run.
        result.space_url = publish_space(recipe.push_to_hub, recipe.space, token=token, private=recipe.private, link_card=False)
    return result


def previous_licenses(output_dir: Path) -> dict[str, str | None]:
    """The parents' licences recorded by the previous run (unknown for parents not named there)."""
    folder = MergeFolder(output_dir)
    base, experts = folder.lineage()
    recorded = folder.licenses()
    names = [e.get("name") or e.get("repo_id") or e.get("path") or "local folder" for e in [base, *experts]]
    return {str(name): recorded.get(str(name)) for name in names}


