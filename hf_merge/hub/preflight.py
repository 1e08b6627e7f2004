"""Checks before a merge moves any weights: every model exists, is readable and fits the base.

Only ``config.json``, the repo's file list and the safetensors headers (range requests of a few
kilobytes) are fetched, so a typo in the eighth expert, a refused token, an expert of another
size or one that lacks a tensor is reported in seconds, not after seven merges. Local folders are
checked the same way, and their headers are read in full, so a truncated file fails here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_merge.errors import CheckpointError, IncompatibleExpertError
from hf_merge.hub import client as hub
from hf_merge.hub.remote_file import remote_tensor_table
from hf_merge.hub.sources import split_reference
from hf_merge.io.checkpoint import Checkpoint, SafetensorsFile
from hf_merge.io.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterConfig,
    check_base,
    is_adapter_folder,
    is_adapter_repo,
    plan_adapter,
    view_config,
    view_names,
)
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
        model = _model_of(expert, token=token, allow_pickle=allow_pickle, base=(base, reference))
        problem = config_difference(reference.config, model.config)
        if problem:
            raise IncompatibleExpertError(f"expert {expert} does not match the base {base}: {problem}")
        check_architecture(reference.config, model.config, expert)
        if not (reference.tensors and model.tensors):
            continue  # pickle weights: their names are known only once loaded, and the merge checks them then
        if names is None:  # an adapter plans as the model it stands for (AdapterHeaders.planning)
            names = plan_merge(reference, getattr(model, "planning", None) or model, scope, expert).names
        else:
            check_compatible(reference, model, expert, names, scope)


def _model_of(reference: str, *, token: str | None, allow_pickle: bool,
              base: tuple[str, TensorHeaders] | None = None) -> TensorHeaders:
    """Config and tensor headers of a model; of the model it stands for, for a LoRA adapter of ``base``."""
    path = Path(reference).expanduser()
    if base is not None and path.is_dir() and is_adapter_folder(path):
        # Parsing the header opens the file only for that: nothing to close.
        own = {n: (i.shape, i.dtype) for n, i in SafetensorsFile(_adapter_weights(path, reference)).tensors.items()}
        return _adapter_view(reference, AdapterConfig.load(path, reference), own, base)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise IncompatibleExpertError(f"{reference} has no config.json: it is not a transformers model folder")
        # Opening parses (and checks) every safetensors header; no tensor data is read.
        with Checkpoint.open(path, allow_pickle=allow_pickle) as checkpoint:
            tensors = {n: (checkpoint.shape(n), checkpoint.dtype(n)) for n in checkpoint.names()}
            return TensorHeaders(dict(checkpoint.config), tensors, str(path))
    repo_id, revision = split_reference(reference)
    weights = hub.check_model(repo_id, revision, token=token, allow_pickle=allow_pickle)
    if base is not None and is_adapter_repo(weights.files):
        return _hub_adapter(reference, repo_id, weights, token=token, base=base)
    config: dict[str, Any] = hub.fetch_config(repo_id, weights.commit_sha or revision, token=token, reference=reference)
    tensors = {}
    if weights.has_safetensors:
        with hub.hub_errors(reference, token=token):
            table = hub.tensor_table(repo_id, weights.commit_sha or revision or "main", token=hub.resolve_token(token))
        tensors = {name: (shape, _torch_dtype(dtype)) for name, (dtype, shape) in table.items()}
    return TensorHeaders(config, tensors, reference)


def _adapter_weights(path: Path, reference: str) -> Path:
    if not (path / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"adapter {reference} has no {ADAPTER_WEIGHTS_NAME} (safetensors); "
                              "re-save it with peft's save_pretrained(safe_serialization=True)")
    return path / ADAPTER_WEIGHTS_NAME


def _hub_adapter(reference: str, repo_id: str, weights: Any, *, token: str | None,
                 base: tuple[str, TensorHeaders]) -> TensorHeaders:
    """A Hub adapter's config and safetensors header (a range request), checked against the base."""
    import json

    import huggingface_hub

    if ADAPTER_CONFIG_NAME not in weights.files:
        raise CheckpointError(f"adapter {reference} has no {ADAPTER_CONFIG_NAME}; it is not a PEFT adapter "
                              "(ask its author to upload the adapter_config.json peft writes)")
    if ADAPTER_WEIGHTS_NAME not in weights.files:
        raise CheckpointError(f"adapter {reference} has no {ADAPTER_WEIGHTS_NAME} (safetensors); "
                              "ask its author to upload the safetensors file peft writes")
    token = hub.resolve_token(token)
    with hub.hub_errors(reference, token=token):
        config_path = huggingface_hub.hf_hub_download(repo_id, ADAPTER_CONFIG_NAME, revision=weights.commit_sha,
                                                      token=token if token else False, endpoint=hub.endpoint())
        # The header alone, by range requests, checked as every other safetensors header is.
        header = remote_tensor_table(repo_id, weights.commit_sha, [ADAPTER_WEIGHTS_NAME], token=token)
    try:
        data = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"adapter {reference}: {ADAPTER_CONFIG_NAME} is not valid JSON ({err}); "
                              "ask its author to re-save the adapter with peft") from None
    table = {name: (tuple(shape), _torch_dtype(dtype)) for name, (dtype, shape) in header.items()}
    return _adapter_view(reference, AdapterConfig.from_dict(data, reference), table, base)


def _adapter_view(reference: str, config: AdapterConfig, table: dict, base: tuple[str, TensorHeaders]) -> TensorHeaders:
    """The headers of the model the adapter stands for, checked against the base."""
    base_reference, headers = base
    local = Path(base_reference).expanduser()
    repo_id, revision = (None, None) if local.is_dir() else split_reference(base_reference)
    check_base(config, reference, repo_id=repo_id, revision=revision, commit_sha=None, base_config=headers.config,
               base_path=local if local.is_dir() else None)
    if not headers.tensors:  # a pickle base: its names are known once loaded, and the merge checks then
        return TensorHeaders(dict(headers.config), {}, reference)
    plan = plan_adapter(config, table, headers, reference)
    tower = {n: headers.tensors[n] for n in view_names(headers.names(), plan)}
    return AdapterHeaders(dict(headers.config), dict(headers.tensors), reference,
                          planning=TensorHeaders(view_config(headers.config, plan), tower, reference))


@dataclass
class AdapterHeaders(TensorHeaders):
    """The headers of the model an adapter stands for (the base's), and those it decides a merge's
    tensors on (its tower's, see :meth:`hf_merge.io.lora_checkpoint.LoraCheckpoint.planning_view`)."""

    planning: TensorHeaders | None = None


def _torch_dtype(name: str) -> Any:
    import torch

    from hf_merge.io.checkpoint import DTYPE_NAMES

    by_name = {dtype_name: dtype for dtype, dtype_name in DTYPE_NAMES.items()}
    return by_name.get(name, torch.uint8)
