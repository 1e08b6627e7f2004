"""The 20 image classification tasks of the continual-merging experiments, read from ``paper_tasks.yaml``.

Each entry gives the Hub dataset the published experiments evaluated on (id, config, split and
columns), the class names in label order, and the CLIP prompt templates (``{}`` is replaced by a
class name). Names and templates follow the ones used for the published figures, so that zero-shot
heads built here match theirs. ``PAPER_TASKS_8``, ``PAPER_TASKS_14`` and ``PAPER_TASKS_20`` are the
task sequences in the published order.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from hf_merge.io.yaml_file import read_yaml

_DATA_FILE = Path(__file__).with_name("paper_tasks.yaml")


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return read_yaml(_DATA_FILE)


def paper_tasks() -> dict[str, dict[str, Any]]:
    """Task name -> ``{"dataset", "config"?, "split", "templates", "classes"}``, in published order."""
    return _table()["tasks"]


PAPER_TASKS_8: tuple[str, ...] = tuple(_table()["sequences"]["paper-8"])
PAPER_TASKS_14: tuple[str, ...] = tuple(_table()["sequences"]["paper-14"])
PAPER_TASKS_20: tuple[str, ...] = tuple(_table()["sequences"]["paper-20"])
