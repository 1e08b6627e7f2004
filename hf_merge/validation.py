"""Checks an expert must pass before it touches the merged state, and which tensors get merged.

Every check reads headers and configs only (NaN and Inf are caught as the merge reads each tensor:
:meth:`hf_merge.checkpoint.Checkpoint.require_finite`). Failures are one line naming the first
offending tensor or config field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import IncompatibleExpertError, UsageError
from .log import get_logger

logger = get_logger(__name__)

SCOPES: dict[str, tuple[str, ...]] = {
    "vision": ("vision_model.", "visual_projection."),
    "all": ("",),
}
# Fields of a CLIP config that change what the weights mean without always changing their shapes.
_CLIP_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
    "patch_size", "num_channels", "hidden_act", "vocab_size", "max_position_embeddings", "projection_dim",
)


def merged_names(checkpoint: Checkpoint, scope: str | Sequence[str]) -> list[str]:
    """The floating-point tensors in ``scope`` (a scope name or name prefixes), sorted."""
    prefixes = SCOPES.get(scope) if isinstance(scope, str) else tuple(scope)
    if prefixes is None:
        raise UsageError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)} or a list of name prefixes")
    names = [
        n for n in checkpoint.names()
        if n.startswith(prefixes) and checkpoint.dtype(n).is_floating_point
    ]
    if not names:
        raise UsageError(f"scope {scope!r} selects no floating-point tensor in {checkpoint.path}")
    return names


# The nn.Linear layers of transformers' CLIP models, by module name. Knowing them spares importing
# transformers' CLIP modelling (150 MiB of resident memory) in every merge; a test checks this
# table against the models built on the meta device.
_CLIP_MODEL_TYPES = {"clip", "clip_vision_model", "clip_text_model"}
_CLIP_LINEAR_SUFFIXES = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".out_proj.weight", ".fc1.weight", ".fc2.weight")
_CLIP_LINEAR_NAMES = {"visual_projection.weight", "text_projection.weight"}


def linear_weight_names(config: dict[str, Any], names: Sequence[str]) -> frozenset[str]:
    """Which of ``names`` are weights of an ``nn.Linear``.

    CLIP's are known by name; other architectures are built from their config on the meta device
    (no memory, no remote code). Falls back to a naming rule (``*.weight`` outside embeddings and
    norms) when the architecture is unknown to transformers."""
    if config.get("model_type") in _CLIP_MODEL_TYPES:
        return frozenset(n for n in names if n.endswith(_CLIP_LINEAR_SUFFIXES) or n in _CLIP_LINEAR_NAMES)
    return _linear_weights_of_model(config, names)


def _linear_weights_of_model(config: dict[str, Any], names: Sequence[str]) -> frozenset[str]:
    try:
        import transformers

        model_type = config["model_type"]
        arch = (config.get("architectures") or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        cfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
        with torch.device("meta"):
            model = model_cls._from_config(cfg) if model_cls is not None else transformers.AutoModel.from_config(cfg)
        linears = {f"{m}.weight" for m, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        found = frozenset(n for n in names if n in linears)
        if found:
            return found
    except Exception as err:  # any failure to build the model means: use the naming rule
        logger.debug("cannot build the model on the meta device (%s); using the naming rule", err)
    return frozenset(
        n for n in names if n.endswith(".weight") and "embed" not in n and "norm" not in n and "." in n
    )


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return f"{'/'.join(archs) or 'unknown architecture'} (model_type {config.get('model_type')!r})"


def _config_difference(base: dict[str, Any], expert: dict[str, Any]) -> str | None:
    for key in ("projection_dim",):
        if key in base and key in expert and base[key] != expert[key]:
            return f"config {key}: {expert[key]} (base: {base[key]})"
    for section in ("vision_config", "text_config"):
        left, right = base.get(section) or {}, expert.get(section) or {}
        for key in _CLIP_FIELDS:
            if key in left and key in right and left[key] != right[key]:
                return f"config {section}.{key}: {right[key]} (base: {left[key]})"
    return None


def check_compatible(base: Checkpoint, expert: Checkpoint, label: str, *, only: Sequence[str] | None = None) -> None:
    """Same architecture, same tensor names and shapes, same CLIP config; raises
    :class:`IncompatibleExpertError` naming the first difference.

    ``only``: compare only the base's tensors under these name prefixes (an expert downloaded in
    part holds no others)."""
    if (base.config.get("model_type"), base.config.get("architectures")) != (
        expert.config.get("model_type"), expert.config.get("architectures")
    ):
        raise IncompatibleExpertError(
            f"expert {label} is a {_architecture(expert.config)}, the base is a {_architecture(base.config)}"
        )
    config_hint = _config_difference(base.config, expert.config)
    hint = f"; {config_hint}" if config_hint else ""
    for name in base.names():
        if only is not None and not name.startswith(tuple(only)):
            continue
        if name not in expert:
            raise IncompatibleExpertError(f"expert {label} has no tensor '{name}'{hint}")
        if expert.shape(name) != base.shape(name):
            raise IncompatibleExpertError(
                f"expert {label}: tensor '{name}' has shape {list(expert.shape(name))}, "
                f"the base has {list(base.shape(name))}{hint}"
            )
    extra = sorted(set(expert.names()) - set(base.names()))
    if extra:
        raise IncompatibleExpertError(f"expert {label} has tensor '{extra[0]}', which the base does not have")
    if config_hint:
        raise IncompatibleExpertError(f"expert {label} differs from the base: {config_hint}")
