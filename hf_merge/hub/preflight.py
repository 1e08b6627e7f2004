"""Checks before a merge moves any weights: every model exists, is readable and fits the base.

Only ``config.json``, the repo's file list and the safetensors headers (range requests of a few
kilobytes) are fetched, so a typo in the eighth expert, a refused token, an expert of another
size or one that lacks a tensor is reported in seconds, not after seven merges. Local folders are
checked the same way, and their headers are read in full, so a truncated file fails here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_merge.errors import IncompatibleExpertError
from hf_merge.hub import client as hub
from hf_merge.hub.sources import split_reference
from hf_merge.io.checkpoint import Checkpoint
from hf_merge.io.validation import (
    TensorHeaders,
    check_architecture,
    check_compatible,
    config_difference,
    plan_merge,
)
from hf_merge.log import get_logger

logger = get_logger(__name__)


def check_models(
    base: str,
    experts: Sequence[str],
    *,
    token: str | None,
    allow_pickle: bool = False,
    scope: str | Sequence[str] = "vision",
    merged_names: Sequence[str] | None = None,
) -> None:
    """Fail fast, before downloading weights: every model exists, is readable and matches the base.

    The merged tensors are those of the first expert (or ``merged_names``, recorded by a merge
    being continued); every expert must have them all, in the base's shapes.

    Raises:
        ModelNotFoundError, AuthenticationError, CheckpointError: From :mod:`hf_merge.hub.client`.
        IncompatibleExpertError: An expert differs from the base in an architecture field or a
            merged tensor.
    """
    reference = _model_of(base, token=token, allow_pickle=allow_pickle)
    names = list(merged_names) if merged_names else None
    for expert in experts:
        model = _model_of(expert, token=token, allow_pickle=allow_pickle)
        problem = config_difference(reference.config, model.config)
        if problem:
            raise IncompatibleExpertError(f"expert {expert} does not match the base {base}: {problem}")
        check_architecture(reference.config, model.config, expert)
        if not (reference.tensors and model.tensors):
            continue  # pickle weights: their names are known only once loaded, and the merge checks them then
        if names is None:
            names = plan_merge(reference, model, scope, expert).names
        else:
            check_compatible(reference, model, expert, names, scope)


def _model_of(reference: str, *, token: str | None, allow_pickle: bool) -> TensorHeaders:
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise IncompatibleExpertError(f"{reference} has no config.json: it is not a transformers model folder")
        # Opening parses (and checks) every safetensors header; no tensor data is read.
        with Checkpoint.open(path, allow_pickle=allow_pickle) as checkpoint:
            tensors = {n: (checkpoint.shape(n), checkpoint.dtype(n)) for n in checkpoint.names()}
            return TensorHeaders(dict(checkpoint.config), tensors, str(path))
    repo_id, revision = split_reference(reference)
    weights = hub.check_model(repo_id, revision, token=token, allow_pickle=allow_pickle)
    config: dict[str, Any] = hub.fetch_config(repo_id, weights.commit_sha or revision, token=token, reference=reference)
    tensors = {}
    if weights.has_safetensors:
        with hub.hub_errors(reference, token=token):
            table = hub.tensor_table(repo_id, weights.commit_sha or revision or "main", token=hub.resolve_token(token))
        tensors = {name: (shape, _torch_dtype(dtype)) for name, (dtype, shape) in table.items()}
    return TensorHeaders(config, tensors, reference)


def _torch_dtype(name: str):
    import torch

    from hf_merge.io.checkpoint import DTYPE_NAMES

    by_name = {dtype_name: dtype for dtype, dtype_name in DTYPE_NAMES.items()}
    return by_name.get(name, torch.uint8)
