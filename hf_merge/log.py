"""One logger per module under the ``hf_merge`` root, verbosity set once (as huggingface_hub does)."""

from __future__ import annotations

import logging

_ROOT = "hf_merge"


def get_logger(name: str) -> logging.Logger:
    """Return the logger for a module (pass ``__name__``)."""
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def set_verbosity(level: int) -> None:
    """Set the level of every hf-merge logger and attach one stderr handler (idempotent)."""
    root = logging.getLogger(_ROOT)
    root.setLevel(level)
    if not any(getattr(h, "_hf_merge", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._hf_merge = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
