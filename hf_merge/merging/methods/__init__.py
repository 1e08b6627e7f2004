"""Merge methods: one file each, one interface (:class:`MergeMethod`), one registry."""

from hf_merge.merging.methods.base import MergeContext, MergeMethod, release_scratch
from hf_merge.merging.methods.registry import METHODS, get_method, register_method

__all__ = ["METHODS", "MergeContext", "MergeMethod", "get_method", "register_method", "available_methods", "release_scratch"]


def available_methods() -> list[str]:
    """Names accepted by ``method=``."""
    return sorted(METHODS)
