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

from hf_merge.io.merge_folder import CARD_FILENAME, PLOT_FILENAME, MergeFolder, MergeState, lineage, parse_yaml_field
from hf_merge.io.yaml_file import load_yaml
from hf_merge.log import get_logger
from hf_merge.merging.tuning import tuning_records
from hf_merge.publish.accuracy_table import AccuracyTable, evaluation_settings, load_accuracy, plot_accuracy
from hf_merge.publish.escape import code_block, code_span, markdown_text, one_line, url_part
from hf_merge.resources import templates_dir

logger = get_logger(__name__)
_HUB_DATASET_ID = re.compile(r"[\w.-]+/[\w.-]+")
# What a licence id looks like on the Hub (``mit``, ``apache-2.0``, ``cc-by-nc-4.0``, ``other``).
_LICENSE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")

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
    except Exception:  # a malformed third-party README (or one over the size cap) must not break the merge
        return None
    return license_id(data.get("license") if isinstance(data, dict) else None)


def _front_matter(text: str) -> str:
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return ""
    for index, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return "\n".join(lines[1:index])
    return ""


def license_id(value: Any) -> str | None:
    """A card's ``license`` field, of whatever YAML type, as one licence id (``None``: not declared).

    The Hub's card metadata holds one licence id. A list of one id is that id; a longer list (dual
    licensing, or a choice), a number, a mapping or a string that is no licence id (spaces, markup)
    is ``other``: hf-merge cannot pick a licence for the user, and the card's note then asks people
    to check each parent."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str) and _LICENSE_ID.fullmatch(value.strip()):
        return value.strip()
    return "other" if not isinstance(value, str) or value.strip() else None


def choose_license(licenses: Mapping[str, Any], base_name: str) -> tuple[str, str | None]:
    """``(license, note)``: the base's license when every parent declares the same one, else ``other``.

    Values of any type are accepted (see :func:`license_id`): a bad card never stops a merge."""
    declared = {str(name): license_id(value) for name, value in licenses.items()}
    values = set(declared.values())
    base_license = declared.get(base_name)
    if len(values) == 1 and base_license:
        return base_license, None
    if values == {None}:
        return "other", "none of the parent models declares a license; check each before use."
    # Markdown, escaped: names and licences come from other people's repos.
    described = ", ".join(f"{code_span(name)}: {markdown_text(lic or 'not declared')}" for name, lic in declared.items())
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
    licenses = {s["name"]: license_id(licenses.get(s["name"])) for s in [base, *experts]}
    license_, license_note = choose_license(licenses, base["name"])

    accuracy = load_accuracy(folder)
    hub_base_models = [s["repo_id"] for s in [base, *experts] if s.get("repo_id")]
    title, summary, continual = describe_method(method)
    # Shown inside code blocks: a local path must not close the string or the fence.
    model_id = one_line(repo_id or str(output_dir.resolve())).replace("`", "").replace('"', "")
    model_name = (repo_id or output_dir.resolve().name).split("/")[-1]

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        base_model=hub_base_models or None,
        license=license_,
        tags=["merge", "hf-merge", method, *(["continual-merging"] if continual else []), "clip"],
        model_name=model_name if accuracy else None,
        eval_results=_eval_results(accuracy) if accuracy else None,
        base_model_relation="merge",
    )
    # Every string below that another repo could have chosen is escaped (hf_merge.publish.escape).
    context = {
        "model_name": markdown_text(model_name),
        "model_id": model_id,
        "base": base,
        "experts": experts,
        "method": code_span(method),
        "method_title": title,
        "method_summary": summary,
        "continual": continual,
        "hyperparameters": {markdown_text(k): code_span(v) for k, v in hyperparameters.items()},
        "scope": SCOPE_DESCRIPTIONS.get(scope, markdown_text(scope)),
        "tensors": _tensor_context(output_dir, state, scope),
        "tuning": tuning_context(state.tuning),
        "license_note": license_note,
        "accuracy": _accuracy_context(accuracy, output_dir, plot) if accuracy else None,
        "recipe_block": code_block(recipe_yaml or "# no recipe.yaml in this folder\n", "yaml"),
        "space_id": markdown_text(space_id) if space_id else None,
        "space_url": f"{hub}/spaces/{url_part(space_id)}" if space_id else None,
        "considered": [],
        **_card_sections(output_dir),
    }
    return ModelCard.from_template(card_data, template_path=str(templates_dir() / "model_card.md"), **context)


def describe_method(method: str) -> tuple[str, str, bool]:
    """``(title, paragraph, continual)`` of a method, from its own declaration."""
    from hf_merge.merging.methods import METHODS

    declared = METHODS.get(method)
    if declared is None:  # a method registered by a package that is not installed here
        return markdown_text(method), f"Merged with the {code_span(method)} method.", True
    paper = f" ([paper]({declared.paper}))" if declared.paper else ""
    return declared.card_title or declared.display_name, declared.description or f"{declared.summary}{paper}", declared.continual


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
    """Display fields of a lineage entry, escaped: a merge state may come from someone else's repo."""
    repo_id = source.get("repo_id")
    source["name"] = str(source.get("name") or repo_id or source.get("path") or "local folder")  # the licences' key
    source["display"] = markdown_text(source["name"])
    source["step"] = markdown_text(source.get("step", ""))
    sha = source.get("commit_sha")
    if repo_id:
        source["url"] = f"{hub}/{url_part(repo_id)}" + (f"/tree/{url_part(sha)}" if sha else "")
    else:
        source["url"] = "#"
    source["commit_display"] = code_span(sha) if sha else "local folder"
    if isinstance(adapter := source.get("adapter"), dict):  # merged as the base plus its low-rank update
        source["commit_display"] += f" (a PEFT LoRA adapter, rank {markdown_text(str(adapter.get('r')))})"
    pr = source.get("conversion_pr")
    if isinstance(pr, dict):
        source["commit_display"] += (
            f" (safetensors from the Hub's conversion pull request [{markdown_text(pr.get('ref'))}]"
            f"({hub}/{url_part(repo_id)}/discussions/{url_part(pr.get('num'))}),"
            f" on top of {code_span(pr.get('revision_commit'))}, which has only pickle weights)"
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
        "from_base": [{"names": code_span(name), "why": markdown_text(why)} for name, why in sorted(from_base.items())],
        "outside_count": len(outside),
        "outside_groups": _groups(outside),
        "buffers": ", ".join(code_span(n) for n in buffers),
        "scope": code_span(scope),
    }


def tuning_context(records: Any) -> dict[str, Any] | None:
    """The card's table of ``--tune``'s choices (one row per tuned step), or ``None`` when untuned."""
    rows = tuning_records(records)
    if not rows:
        return None
    grid = rows[-1].grid
    table = []
    for record in rows:
        scores = dict(zip(record.grid, record.scores, strict=True))
        cells = [("**{:.1f}**" if v == record.chosen else "{:.1f}").format(100 * scores[v]) if v in scores else "" for v in grid]
        table.append({"step": record.step, "cells": cells, "chosen": f"{record.chosen:g}"})
    tasks = ", ".join(rows[-1].per_task[0]) if rows[-1].per_task else ""
    return {"parameter": markdown_text(rows[-1].parameter), "grid": [f"{v:g}" for v in grid], "rows": table,
            "source": markdown_text(f"validation tasks: {tasks}" if tasks else "validation data")}


def _groups(names: Sequence[str]) -> str:
    """``vision_model.*`` (199), ``logit_scale``: names summarised by their first component."""
    by_head: dict[str, list[str]] = {}
    for name in names:
        by_head.setdefault(name.split(".", 1)[0], []).append(name)
    return ", ".join(f"{code_span(head + '.*')} ({len(group)})" if len(group) > 1 else code_span(group[0])
                     for head, group in by_head.items())


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
            references.append({"step": markdown_text(label), "cells": cells,
                               "average": f"{100 * sum(values.values()) / len(values):.1f}"})
    bwt = accuracy.bwt()
    plot_name = None
    if plot:
        plot_accuracy(accuracy, MergeFolder(output_dir).plot_path)
        plot_name = PLOT_FILENAME
    return {
        "tasks": [markdown_text(task) for task in accuracy.tasks],
        "rows": rows,
        "references": references,
        "final_average": f"{100 * averages[-1]:.1f}",
        "bwt": f"{100 * bwt:+.1f}" if bwt is not None else None,
        "limit": accuracy.limit,
        "plot": plot_name,
        **evaluation_settings(output_dir),
    }
