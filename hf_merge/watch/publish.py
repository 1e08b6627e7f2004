"""A watcher's pushes: one commit per decision, on top of the commit it was computed from.

The push itself is the one push path of :mod:`hf_merge.hub.push` (parent commit, retry with
backoff); this module names what a watcher pushes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_merge.hub import client as hub
from hf_merge.hub.push import RetryPolicy, StaleParentError, push_files

__all__ = ["RetryPolicy", "StaleParentError", "push_files", "push_result"]


def push_result(folder: Path, repo_id: str, **kwargs: Any) -> str:
    """Push a merge folder's publishable files (weights, card, state, recipe, results, ledger)."""
    return push_files(folder, repo_id, hub.publishable_files(folder), **kwargs)
