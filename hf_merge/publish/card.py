"""The model card of a merge result: Hub metadata + a README rendered from ``templates/model_card.md``.

Everything on the card is read from the merge folder itself (its state, recipe and evaluation
results, through :class:`~hf_merge.io.merge_folder.MergeFolder`), so ``hf-merge card DIR``
regenerates the same card at any time. Packages above this one add sections of their own with
:func:`register_card_section` (the watcher lists the candidates it refused).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_merge.errors import RecipeError
from hf_merge.io.merge_folder import CARD_FILENAME, PLOT_FILENAME, MergeFolder, MergeState, lineage, parse_yaml_field
from hf_merge.io.yaml_file import load_yaml
from hf_merge.log import get_logger
from hf_merge.publish.accuracy_table import AccuracyTable, load_accuracy, plot_accuracy
from hf_merge.resources import templates_dir

logger = get_logger(__name__)
_HUB_DATASET_ID = re.compile(r"[\w.-]+/[\w.-]+")

def method_description(method: str) -> tuple[str, str]:
    """``(title, summary)`` of a method for the card, from the method's own declaration: its
    display name, and its one-line summary with the paper's link (an unknown method: its name)."""
    from hf_merge.merging.methods.registry import METHODS

    cls = METHODS.get(method)
    if cls is None:
        return method, f"Merged with the `{method}` method."
    title = cls.display_name or method
    paper = f" ([{title} paper, arXiv:{cls.paper.rsplit('/', 1)[-1]}]({cls.paper}))" if cls.paper else ""
    return title, f"{cls.summary}{paper}"


CardSection = Callable[[Path], Any]
_CARD_SECTIONS: dict[str, CardSection] = {}


def register_card_section(name: str, provider: CardSection) -> None:
    """Give the card template a variable ``name``: ``provider(folder)`` computes it from the merge
    folder (the watcher's ``considered``: the candidates it refused)."""
    _CARD_SECTIONS[name] = provider


def _card_sections(folder: Path) -> dict[str, Any]:
    if not _LOADED_ENTRY_POINTS:
        _LOADED_ENTRY_POINTS.append(True)
        from importlib.metadata import entry_points

        for entry in entry_points(group="hf_merge.card_sections"):
            try:
                entry.load()
            except ImportError:  # an optional part not installed: its section stays out
                continue
    return {name: provider(folder) for name, provider in _CARD_SECTIONS.items()}


_LOADED_ENTRY_POINTS: list[bool] = []

SCOPE_DESCRIPTIONS = {
    "vision": "vision tower and visual projection (the text tower is the base's)",
    "text": "text tower and text projection (the vision tower is the base's)",
    "all": "vision and text towers",
}


# ------------------------------------------------------------------------------------ reading
def read_license(folder: str | Path | None) -> str | None:
    """The ``license`` in the front matter of a model folder's README.md, if it names one.

    The front matter is someone else's YAML: it is read by the safe loader (size cap, no aliases)
    and anything but a string licence reads as none declared.
    """
    if folder is None:
        return None
    readme = Path(folder) / CARD_FILENAME
    if not readme.is_file():
        return None
    try:
        data = load_yaml(_front_matter(readme.read_text(encoding="utf-8", errors="replace")), source=str(readme))
    except RecipeError:  # a malformed third-party README must not break the merge
        return None
    value = data.get("license") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def _front_matter(text: str) -> str:
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return ""
    for index, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return "\n".join(lines[1:index])
    return ""


def choose_license(licenses: Mapping[str, str | None], base_name: str) -> tuple[str, str | None]:
    """``(license, note)``: the base's license when every parent declares the same one, else ``other``."""
    declared = dict(licenses)
    values = set(declared.values())
    base_license = declared.get(base_name)
    if len(values) == 1 and base_license:
        return base_license, None
    if values == {None}:
        return "other", "none of the parent models declares a license; check each before use."
    described = ", ".join(f"`{name}`: {lic or 'not declared'}" for name, lic in declared.items())
    return "other", f"the parent models do not all declare the same license ({described}); check each before use."


# ------------------------------------------------------------------------------------ rendering
def build_card(
    output_dir: str | Path,
    *,
    repo_id: str | None = None,
    licenses: Mapping[str, str | None] | None = None,
    space_id: str | None = None,
    plot: bool = True,
) -> ModelCard:
    """Render the model card of a merge folder (and write ``accuracy.png`` when evaluated).

    Args:
        output_dir: The merge result folder.
        repo_id: Where it is (or will be) published; the usage snippet loads this id.
        licenses: License of each parent by display name; read from the folder's previous card when
            not given (``hf-merge card`` regenerating a card).
        space_id: The Gradio Space published for the model, linked from the card.
        plot: Draw ``accuracy.png`` (skip in tests that only check metadata).
    """
    from hf_merge.hub.client import endpoint

    output_dir = Path(output_dir)
    folder = MergeFolder(output_dir)
    state = folder.state()
    base, experts = lineage(state)
    hub = endpoint()
    for source in [base, *experts]:
        _decorate(source, hub)
    method = str(state.method or "opcm")
    hyperparameters = dict(state.hyperparameters or {})
    recipe_yaml = folder.recipe_text()
    scope = str(state.scope or parse_yaml_field(recipe_yaml, "scope") or "vision")

    if licenses is None:
        licenses = folder.licenses()
    licenses = {s["name"]: licenses.get(s["name"]) for s in [base, *experts]}
    license_, license_note = choose_license(licenses, base["name"])

    accuracy = load_accuracy(folder)
    hub_base_models = [s["repo_id"] for s in [base, *experts] if s.get("repo_id")]
    title, summary = method_description(method)
    model_id = repo_id or str(output_dir.resolve())
    model_name = (repo_id or output_dir.resolve().name).split("/")[-1]

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        base_model=hub_base_models or None,
        license=license_,
        tags=["merge", "hf-merge", method, "continual-merging", "clip"],
        model_name=model_name if accuracy else None,
        eval_results=_eval_results(accuracy) if accuracy else None,
        base_model_relation="merge",
    )
    context = {
        "model_name": model_name,
        "model_id": model_id,
        "base": base,
        "experts": experts,
        "method": method,
        "method_title": title,
        "method_summary": summary,
        "hyperparameters": hyperparameters,
        "scope": SCOPE_DESCRIPTIONS.get(scope, scope),
        "tensors": _tensor_context(output_dir, state, scope),
        "license_note": license_note,
        "accuracy": _accuracy_context(accuracy, output_dir, plot) if accuracy else None,
        "recipe_yaml": recipe_yaml or "# no recipe.yaml in this folder\n",
        "space_id": space_id,
        "space_url": f"{hub}/spaces/{space_id}" if space_id else None,
        "considered": [],
        **_card_sections(output_dir),
    }
    return ModelCard.from_template(card_data, template_path=str(templates_dir() / "model_card.md"), **context)


def write_card(output_dir: str | Path, **kwargs: Any) -> Path:
    """Render the card with :func:`build_card` and save it as ``README.md`` in the folder; the
    parents' licences given are kept in the merge state, where a regenerated card finds them."""
    folder = MergeFolder(output_dir)
    # Licences read from an old card's comment move into the state now: the new card has no comment.
    licenses = kwargs.pop("licenses", None)
    licenses = dict(licenses) if licenses is not None else folder.licenses()
    if licenses:
        folder.record_licenses(licenses)
    card = build_card(output_dir, licenses=licenses, **kwargs)
    card.save(folder.card_path)
    return folder.card_path


def _decorate(source: dict[str, Any], hub: str) -> None:
    repo_id = source.get("repo_id")
    source.setdefault("name", repo_id or source.get("path") or "local folder")
    sha = source.get("commit_sha")
    if repo_id:
        source["url"] = f"{hub}/{repo_id}" + (f"/tree/{sha}" if sha else "")
    else:
        source["url"] = "#"
    source["commit_display"] = f"`{sha}`" if sha else "local folder"
    pr = source.get("conversion_pr")
    if pr:
        source["commit_display"] += (
            f" (safetensors from the Hub's conversion pull request [{pr['ref']}]({hub}/{repo_id}/discussions/{pr['num']}),"
            f" on top of `{pr['revision_commit']}`, which has only pickle weights)"
        )


def _tensor_context(output_dir: Path, state: MergeState, scope: str) -> dict[str, Any] | None:
    """Which tensors were merged and which came from the base, and why (None for old states)."""
    merged = state.merged_names
    if not merged:
        return None
    from hf_merge.io.checkpoint import Checkpoint

    try:
        with Checkpoint.open(output_dir) as checkpoint:
            floating = {n: checkpoint.dtype(n).is_floating_point for n in checkpoint.names()}
    except Exception:  # a folder without weights (card regenerated elsewhere): no outside-scope list
        floating = dict.fromkeys(merged, True)
    from_base = dict(state.from_base or {})
    rest = [n for n in floating if n not in set(merged) and n not in from_base]
    outside = [n for n in rest if floating[n]]
    buffers = [n for n in rest if not floating[n]]
    return {
        "merged_count": len(merged),
        "merged_groups": _groups(merged),
        "from_base": [{"names": f"`{name}`", "why": why} for name, why in sorted(from_base.items())],
        "outside_count": len(outside),
        "outside_groups": _groups(outside),
        "buffers": ", ".join(f"`{n}`" for n in buffers),
        "scope": scope,
    }


def _groups(names: Sequence[str]) -> str:
    """``vision_model.*`` (199), ``logit_scale``: names summarised by their first component."""
    by_head: dict[str, list[str]] = {}
    for name in names:
        by_head.setdefault(name.split(".", 1)[0], []).append(name)
    return ", ".join(f"`{head}.*` ({len(group)})" if len(group) > 1 else f"`{group[0]}`" for head, group in by_head.items())


def _dataset_id(dataset: str | None, task: str) -> str:
    """The model-index ``dataset.type``: the Hub dataset id, or the task name for local data.

    The Hub groups model-index results by dataset type, so a loader function or a folder shared by
    several tasks would fold them into one entry.
    """
    if dataset and _HUB_DATASET_ID.fullmatch(dataset):
        return dataset
    return task


def _eval_results(accuracy: AccuracyTable) -> list[EvalResult]:
    """One ``model-index`` entry per task: the final model's accuracy."""
    final, results, seen = accuracy.final(), [], set()
    for label in accuracy.tasks:
        task = accuracy.task_of.get(label, label)
        if label not in final or task in seen:
            continue
        seen.add(task)
        results.append(
            EvalResult(
                task_type="zero-shot-image-classification",
                task_name="Zero-shot image classification",
                dataset_type=_dataset_id(accuracy.datasets.get(label), task),
                dataset_name=task,
                dataset_split="test",
                metric_type="accuracy",
                metric_name="accuracy",
                metric_value=round(final[label], 4),
            )
        )
    return results


def _accuracy_context(accuracy: AccuracyTable, output_dir: Path, plot: bool) -> dict[str, Any]:
    averages = accuracy.averages()
    rows = []
    for step, row, average in zip(accuracy.steps, accuracy.accuracy, averages, strict=False):
        cells = [f"{100 * row[t]:.1f}" if t in row else "–" for t in accuracy.tasks]
        rows.append({"step": step, "cells": cells, "average": f"{100 * average:.1f}"})
    references = []
    for label, values in (("zero-shot (base)", accuracy.base), ("individual experts", accuracy.experts)):
        if values:
            cells = [f"{100 * values[t]:.1f}" if t in values else "–" for t in accuracy.tasks]
            references.append({"step": label, "cells": cells,
                               "average": f"{100 * sum(values.values()) / len(values):.1f}"})
    bwt = accuracy.bwt()
    plot_name = None
    if plot:
        plot_accuracy(accuracy, MergeFolder(output_dir).plot_path)
        plot_name = PLOT_FILENAME
    return {
        "tasks": accuracy.tasks,
        "rows": rows,
        "references": references,
        "final_average": f"{100 * averages[-1]:.1f}",
        "bwt": f"{100 * bwt:+.1f}" if bwt is not None else None,
        "limit": accuracy.limit,
        "plot": plot_name,
    }
