"""Recipes built from a base recipe and overrides: one rule for the API's keyword fields, the
CLI's flags over ``--config`` and ``hf-merge add``'s continued recipe."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_merge.errors import RecipeError
from hf_merge.recipe import EvalSpec, MergeRecipe


def build_recipe(recipe: MergeRecipe | str | Path | None = None, overrides: Mapping[str, Any] | None = None, *,
                 source: str = "arguments") -> MergeRecipe:
    """The one way a recipe is built from a base recipe (or file) and overrides, for the API and the CLI.

    Overrides replace the recipe's fields, except that ``eval`` is merged key by key (``--eval-limit``
    keeps the recipe's tasks) and ``parameters`` belong to a method: they are merged with the
    recipe's when the method stays, and dropped when the overrides choose another method.
    """
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    if recipe is None:
        missing = [f"`{key}`" for key in ("base", "experts") if not changes.get(key)]
        if missing:
            raise RecipeError(f"{' and '.join(missing)} required (or a recipe file)")
        return MergeRecipe.from_dict(changes, source=source)
    if isinstance(recipe, (str, Path)):
        recipe = MergeRecipe.load(recipe)
    if not changes:
        return recipe
    data = recipe.to_dict()
    same_method = changes.get("method", recipe.method) == recipe.method
    parameters = dict(data.get("parameters") or {}) if same_method else {}
    parameters.update(changes.pop("parameters", None) or {})
    evaluation = changes.pop("eval", None)
    if isinstance(evaluation, EvalSpec):
        data["eval"] = evaluation.to_dict()
    elif isinstance(evaluation, Mapping):
        data["eval"] = {**(data.get("eval") or {}), **evaluation}
    elif evaluation is not None:
        data["eval"] = evaluation
    data.update(changes)
    data["parameters"] = parameters
    return MergeRecipe.from_dict(data, source=source)
