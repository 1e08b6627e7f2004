"""Declared configuration: pydantic models' errors as hf-merge's one-line messages.

The recipe, its evaluation spec and the watcher's admission policy are pydantic models; this module
turns the first error pydantic reports into one :class:`~hf_merge.errors.RecipeError` line that
names the key, says what it must be and shows at most a short excerpt of the bad value, with the
closest valid spelling of an unknown key. A field may say what it expects in its metadata
(``Field(json_schema_extra={"expects": "a positive integer"})``); otherwise the type says it.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonDict

from hf_merge.errors import RecipeError

#: The most characters of a bad value an error message shows: a value can be megabytes long.
EXCERPT_CHARS = 80

# What a value of each pydantic type error must be, in the wording of the messages.
_TYPE_WORDS = {
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
#: Field metadata of a count that starts at 1: one message for a wrong type and a value below 1.
POSITIVE_INTEGER: JsonDict = {"expects": "a positive integer", "expects_range": True}

_RANGE_WORDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
                "less_than": ("<", "lt")}


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (a bad value is shown, never dumped)."""
    if isinstance(value, (str, bytes)) and len(value) > 4 * limit:
        value = value[: 4 * limit]  # repr of a huge string costs its whole length
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {prefix + matches[0]!r}?" if matches else ""


def one_line(error: ValidationError, model: type[BaseModel], *, source: str, prefix: str = "",
             extra_keys: Iterable[str] = ()) -> RecipeError:
    """The first problem in ``error`` as a :class:`RecipeError` (exit code 2).

    Args:
        error: What pydantic raised validating ``model``.
        model: The model validated (its fields give unknown keys their suggestion).
        source: Where the data came from (``recipe.yaml``, ``the command line``), named for unknown keys.
        prefix: Dotted path of ``model`` inside the recipe (``"watch."``).
        extra_keys: Further valid top-level keys (registered recipe sections).
    """
    first = error.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    name = prefix + ".".join(loc)
    kind = first["type"]
    value = first.get("input")
    owner, field = _field_owner(model, loc)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        valid = list(owner.model_fields) if owner is not None else []
        if owner is model:
            valid += list(extra_keys)
        return unknown_key(loc[-1], valid, source=source, section=prefix + "".join(part + "." for part in loc[:-1]))
    if kind in ("missing", "missing_argument"):
        return RecipeError(f"{source} is missing `{name}`")
    if kind in ("value_error", "assertion_error"):
        return RecipeError(str(first.get("ctx", {}).get("error", first["msg"])))
    extra = _extra(field)
    if kind in _RANGE_WORDS and "expects_range" not in extra:
        symbol, key = _RANGE_WORDS[kind]
        bound = first.get("ctx", {}).get(key)
        bound_text = f"{bound:g}" if isinstance(bound, (int, float)) else str(bound)
        return RecipeError(f"`{name}` must be {symbol} {bound_text}, got {excerpt(value)}")
    expects = extra.get("expects") or _TYPE_WORDS.get(kind) or first["msg"].lower()
    return RecipeError(f"`{name}` must be {expects}, got {excerpt(value)}")


def unknown_key(key: str, valid: Iterable[str], *, source: str, section: str = "") -> RecipeError:
    """``unknown key 'eval.x' in recipe.yaml; did you mean 'eval.y'?`` (or the valid keys when none is close)."""
    valid = list(valid)
    hint = suggest(key, valid, prefix=section) or f" (valid: {', '.join(valid)})"
    return RecipeError(f"unknown key {excerpt(section + key)} in {source}{hint}")


def _field_owner(model: type[BaseModel], loc: list[str]) -> tuple[type[BaseModel] | None, Any]:
    """The model that holds the last part of ``loc``, and that field's info (``None`` if unknown)."""
    owner: type[BaseModel] | None = model
    for depth, part in enumerate(loc):
        if owner is None:
            return None, None
        info = owner.model_fields.get(part)
        if depth == len(loc) - 1 or info is None:
            return owner, info
        owner = _nested_model(info.annotation)
    return owner, None


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _nested_model(arg)
            if found is not None:
                return found
    return None


def _extra(field: Any) -> dict[str, Any]:
    extra = getattr(field, "json_schema_extra", None)
    return extra if isinstance(extra, dict) else {}
