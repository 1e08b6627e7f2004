"""hf-merge: continual merging of fine-tuned CLIP models from the Hugging Face Hub.

    >>> from hf_merge import merge
    >>> result = merge(base="openai/clip-vit-base-patch32",
    ...                experts=["tanganke/clip-vit-base-patch32_sun397", "tanganke/clip-vit-base-patch32_dtd"],
    ...                method="opcm", parameters={"alpha": 0.5}, push_to_hub="me/clip-opcm")

The public API is this short list of names, imported lazily so that ``import hf_merge`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # The user-facing flow: recipe -> merge -> evaluate -> card -> push -> Space.
    "merge": "hf_merge.api",
    "add": "hf_merge.api",
    "push": "hf_merge.api",
    "card": "hf_merge.api",
    "MergeResult": "hf_merge.api",
    "MergeRecipe": "hf_merge.recipe",
    "EvalSpec": "hf_merge.recipe",
    # Step by step, on local folders or resolved sources.
    "ContinualMerger": "hf_merge.merging.engine",
    "MergeState": "hf_merge.merging.state",
    "ModelSource": "hf_merge.hub.sources",
    "resolve": "hf_merge.hub.sources",
    "get_method": "hf_merge.merging.methods",
    # Evaluation and the Space.
    "evaluate_model": "hf_merge.evaluation",
    "ContinualEvaluator": "hf_merge.evaluation",
    "EvaluationReport": "hf_merge.evaluation",
    "publish_space": "hf_merge.publish.space",
    "run_space": "hf_merge.publish.space",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_merge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
