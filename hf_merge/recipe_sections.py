"""Recipe sections other packages own: the recipe reads and writes them without importing their owner.

The watcher's ``watch:`` section is the first: :mod:`hf_merge.watch.policy` calls
:func:`register_section` when imported, and installed packages name the modules that register
sections as ``hf_merge.recipe_sections`` entry points, loaded the first time a recipe is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecipeSection:
    """A top-level recipe key another package owns: how its value is read and written back."""

    name: str
    parse: Callable[[Any, str], Any]
    dump: Callable[[Any], Any]


_SECTIONS: dict[str, RecipeSection] = {}
_LOADED_ENTRY_POINTS: list[bool] = []


def register_section(name: str, parse: Callable[[Any, str], Any], dump: Callable[[Any], Any]) -> None:
    """Let recipes carry a ``name:`` section: ``parse(value, source)`` validates it (raising
    :class:`RecipeError`), ``dump(parsed)`` gives its plain data back for ``recipe.yaml``."""
    _SECTIONS[name] = RecipeSection(name, parse, dump)


def sections() -> dict[str, RecipeSection]:
    """Every registered section by key (the entry points' modules imported on the first call)."""
    if not _LOADED_ENTRY_POINTS:
        _LOADED_ENTRY_POINTS.append(True)
        from importlib.metadata import entry_points

        # Installed packages declare their sections as entry points; loading one registers it.
        for entry in entry_points(group="hf_merge.recipe_sections"):
            try:
                entry.load()
            except ImportError:  # an uninstalled optional part: its key stays unknown
                continue
    return _SECTIONS
