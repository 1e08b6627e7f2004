"""Paths of the files hf-merge ships beside its code: Jinja templates and the Space app."""

from __future__ import annotations

from pathlib import Path

_RESOURCES = Path(__file__).resolve().parent / "_resources"


def templates_dir() -> Path:
    """Folder holding ``model_card.md`` and ``space_readme.md``."""
    return _RESOURCES / "templates"


def space_app_dir() -> Path:
    """Folder holding the Gradio Space (``app.py``, ``requirements.txt``, example images)."""
    return _RESOURCES / "spaces"
