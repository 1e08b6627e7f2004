"""Merge methods: one file each, one interface (:class:`MergeMethod`), one registry."""

from .base import METHODS, MergeContext, MergeMethod, get_method, register_method

__all__ = ["METHODS", "MergeContext", "MergeMethod", "get_method", "register_method", "available_methods"]


def available_methods() -> list[str]:
    """Names accepted by ``method=``."""
    get_method("opcm")  # imports every built-in method module
    return sorted(METHODS)
