"""The registry of merge methods: one line per method, by its ``name``.

Adding a method is one file (a :class:`~hf_merge.merging.methods.base.MergeMethod` subclass) and one line
here; :func:`register_method` adds one from outside the package.
"""

from __future__ import annotations

from hf_merge.errors import NotContinualError, UsageError
from hf_merge.merging.methods.average import ContinualAverage
from hf_merge.merging.methods.base import MergeMethod
from hf_merge.merging.methods.dop import DOP
from hf_merge.merging.methods.iso_c import IsoC
from hf_merge.merging.methods.iso_cts import IsoCTS
from hf_merge.merging.methods.magmax import MagMax
from hf_merge.merging.methods.opcm import OPCM
from hf_merge.merging.methods.task_arithmetic import TaskArithmetic
from hf_merge.merging.methods.ties import ContinualTies
from hf_merge.merging.methods.tsv_m import TSVM
from hf_merge.merging.methods.wudi import WUDI

METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls for cls in (OPCM, ContinualAverage, TaskArithmetic, ContinualTies, MagMax, IsoC, TSVM, IsoCTS, WUDI, DOP)
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


def require_continual(method: str, merged: object) -> None:
    """:class:`NotContinualError` (one line, saying to re-run ``merge``) when ``merged`` was made by a
    registered all-at-once method, which cannot take one more expert."""
    if method in METHODS and not METHODS[method].continual:
        raise NotContinualError(f"{merged} was merged with '{method}', which merges every expert at once and cannot "
                                "take one more; re-run `hf-merge merge` with all the experts, the merged ones and the new")
