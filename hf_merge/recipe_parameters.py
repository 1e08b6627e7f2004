"""A recipe's ``method`` and ``parameters``, checked against the methods' own declarations.

No defaults table exists outside a method: names, types, ranges and defaults come from each
method's :class:`~hf_merge.merging.methods.base.Parameter` declarations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hf_merge.declared import excerpt, suggest
from hf_merge.errors import RecipeError, UsageError

# Spellings people use for the same knob (the paper writes λ for the scaling factor, TIES keeps
# the top-k entries); an alias applies only where the method declares its target.
_PARAMETER_ALIASES = {
    "lambda": "scaling_factor", "lambda_": "scaling_factor", "lam": "scaling_factor", "scaling": "scaling_factor",
    "keep": "threshold", "k": "threshold", "top_k": "threshold",
}


def method_parameters(method: str) -> dict[str, Any]:
    """The parameters ``method`` declares, with their defaults.

    Raises:
        RecipeError: ``method`` is not a known merge method (the message suggests the closest).
    """
    return dict(method_class(method).defaults)


def known_methods() -> list[str]:
    """Names of every registered merge method."""
    from hf_merge.merging.methods.registry import METHODS

    return sorted(METHODS)


def method_class(method: str) -> Any:
    """The registered method class ``method``; :class:`RecipeError` suggesting the closest name."""
    from hf_merge.merging.methods.registry import METHODS

    if method not in METHODS:
        raise RecipeError(f"unknown merge method {excerpt(method)}{suggest(str(method), METHODS)}; "
                          f"choose from {', '.join(sorted(METHODS))}")
    return METHODS[method]


def checked_parameters(method: str, values: Any) -> dict[str, Any]:
    """``values`` (only those set) checked by the method's declarations, aliases resolved."""
    cls = method_class(method)
    if not isinstance(values, Mapping):
        raise RecipeError(f"`parameters` must be a mapping of {method} parameters, got {excerpt(values)}")
    declared = cls.defaults
    named: dict[str, Any] = {}
    for raw_name, value in values.items():
        name = str(raw_name)
        if name not in declared and _PARAMETER_ALIASES.get(name) in declared:
            name = _PARAMETER_ALIASES[name]
        if name not in declared:
            valid = ", ".join(sorted(declared)) or "none"
            raise RecipeError(f"unknown parameter {excerpt(raw_name)} for method {method!r}{suggest(name, declared)} (valid: {valid})")
        named[name] = value
    try:
        checked = cls.check_parameters(named)
    except UsageError as error:
        raise RecipeError(str(error)) from None
    return {name: checked[name] for name in named}
