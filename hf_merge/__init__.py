"""hf-merge: continual merging of fine-tuned CLIP models from the Hugging Face Hub.

The public API is this short list of names, imported lazily so that ``import hf_merge`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ModelSource": "hf_merge.sources",
    "resolve": "hf_merge.sources",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_merge' has no attribute {name!r}")
