"""Where the zoo keeps what it builds: ``$HF_MERGE_CACHE/zoo`` or ``~/.cache/hf-merge/zoo``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root folder of the zoo cache (created on demand)."""
    base = os.environ.get("HF_MERGE_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "hf-merge"
    path = root / "zoo"
    path.mkdir(parents=True, exist_ok=True)
    return path
