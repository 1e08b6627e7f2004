"""The registry of merge methods: one line per method, by its ``name``.

Adding a method is one file (a :class:`~hf_merge.methods.base.MergeMethod` subclass) and one line
here; :func:`register_method` adds one from outside the package.
"""

from __future__ import annotations

from ..errors import UsageError
from .average import ContinualAverage
from .base import MergeMethod
from .magmax import MagMax
from .opcm import OPCM
from .task_arithmetic import TaskArithmetic
from .ties import ContinualTies

METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls for cls in (OPCM, ContinualAverage, TaskArithmetic, ContinualTies, MagMax)
}


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Add a method to :data:`METHODS` under ``cls.name`` (usable as a class decorator)."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[MergeMethod]:
    """The method class registered as ``name``; :class:`UsageError` naming the known ones if absent."""
    if name not in METHODS:
        raise UsageError(f"unknown merge method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]
