"""Checks before a merge moves any weights: every model exists, is readable and fits the base.

Only ``config.json`` and the repo's file list are fetched, so a typo in the eighth expert, a
refused token or an expert of another size is reported in seconds, not after seven merges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from . import hub
from .errors import IncompatibleExpertError
from .sources import split_reference

# Config fields that must agree for two CLIP checkpoints to be merged tensor by tensor.
_ARCHITECTURE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")


def check_models(base: str, experts: Sequence[str], *, token: str | None, allow_pickle: bool = False) -> None:
    """Fail fast, before downloading weights: every model exists, is readable and matches the base.

    Raises:
        ModelNotFoundError, AuthenticationError, CheckpointError: From :mod:`hf_merge.hub`.
        IncompatibleExpertError: An expert's config differs from the base's in a merged dimension.
    """
    reference_config = _config_of(base, token=token, allow_pickle=allow_pickle)
    for expert in experts:
        config = _config_of(expert, token=token, allow_pickle=allow_pickle)
        problem = _architecture_mismatch(reference_config, config)
        if problem:
            raise IncompatibleExpertError(f"expert {expert} does not match the base {base}: {problem}")


def _config_of(reference: str, *, token: str | None, allow_pickle: bool) -> dict[str, Any]:
    path = Path(reference).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise IncompatibleExpertError(f"{reference} has no config.json: it is not a transformers model folder")
        return json.loads(config_path.read_text(encoding="utf-8"))
    repo_id, revision = split_reference(reference)
    hub.check_model(repo_id, revision, token=token, allow_pickle=allow_pickle)
    return hub.fetch_config(repo_id, revision, token=token)


def _architecture_mismatch(base: dict[str, Any], other: dict[str, Any]) -> str | None:
    if base.get("model_type") != other.get("model_type"):
        return f"model_type {other.get('model_type')!r} instead of {base.get('model_type')!r}"
    for tower in ("vision_config", "text_config"):
        a, b = base.get(tower) or {}, other.get(tower) or {}
        for key in _ARCHITECTURE_FIELDS:
            if key in a and a.get(key) != b.get(key):
                return f"{tower}.{key} is {b.get(key)!r} instead of {a.get(key)!r}"
    if base.get("projection_dim") != other.get("projection_dim"):
        return f"projection_dim is {other.get('projection_dim')!r} instead of {base.get('projection_dim')!r}"
    return None
