"""Checks an expert must pass before it touches the merged state, and which tensors get merged.

Every check reads headers and configs only (NaN and Inf are caught as the merge reads each tensor:
:meth:`hf_merge.io.checkpoint.Checkpoint.require_finite`). Failures are one line naming the first
offending tensor or config field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from hf_merge.errors import IncompatibleExpertError, UsageError
from hf_merge.log import get_logger

logger = get_logger(__name__)

SCOPES: dict[str, tuple[str, ...]] = {
    "vision": ("vision_model.", "visual_projection."),
    "text": ("text_model.", "text_projection."),
    "all": ("",),
}
_TOWER_TYPES = {"clip_vision_model": "vision", "clip_text_model": "text"}
# Fields of a CLIP config that change what the weights mean without always changing their shapes.
_CLIP_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
    "patch_size", "num_channels", "hidden_act", "vocab_size", "max_position_embeddings", "projection_dim",
)


class TensorSet(Protocol):
    """What the checks read of a model: its config and its tensors' names, shapes and dtypes
    (a :class:`~hf_merge.io.checkpoint.Checkpoint`, or :class:`TensorHeaders` from headers alone)."""

    config: dict[str, Any]

    def names(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...


def merged_names(checkpoint: TensorSet, scope: str | Sequence[str]) -> list[str]:
    """The floating-point tensors of ``checkpoint`` in ``scope`` (a scope name or name prefixes), sorted."""
    prefixes = _prefixes(scope)
    names = [
        n for n in checkpoint.names()
        if n.startswith(prefixes) and checkpoint.dtype(n).is_floating_point
    ]
    if not names:
        raise UsageError(f"scope {scope!r} selects no floating-point tensor in {getattr(checkpoint, 'path', 'the base')}")
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


def tower_configs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``vision`` and ``text`` tower configs a CLIP-family config describes.

    A ``CLIPModel`` config nests both; a ``CLIPVisionModel`` (``clip_vision_model``) or
    ``CLIPTextModel`` (``clip_text_model``) config *is* its tower's config."""
    model_type = config.get("model_type")
    if model_type in _TOWER_TYPES:
        return {_TOWER_TYPES[model_type]: config}
    return {tower: config.get(f"{tower}_config") or {} for tower in ("vision", "text") if config.get(f"{tower}_config")}


def config_difference(base: dict[str, Any], expert: dict[str, Any]) -> str | None:
    """The first field of the shared towers' configs that changes the architecture, as
    ``"vision_config.hidden_size is 48 instead of 32"``; ``None`` when they agree.

    Fields that do not change the weights' meaning (``transformers_version``, ``torch_dtype``,
    ``_name_or_path``, ``architectures``, ``id2label`` ...) are never compared."""
    if base.get("model_type") == expert.get("model_type") == "clip":
        if base.get("projection_dim") != expert.get("projection_dim"):
            return f"projection_dim is {expert.get('projection_dim')!r} instead of {base.get('projection_dim')!r}"
    left, right = tower_configs(base), tower_configs(expert)
    for tower in ("vision", "text"):
        if tower not in left or tower not in right:
            continue
        for key in _CLIP_FIELDS:
            if key in left[tower] and key in right[tower] and left[tower][key] != right[tower][key]:
                return f"{tower}_config.{key} is {right[tower][key]!r} instead of {left[tower][key]!r}"
    return None


def _same_family(base: dict[str, Any], expert: dict[str, Any]) -> bool:
    types = {base.get("model_type"), expert.get("model_type")}
    if len(types) == 1:
        return base.get("model_type") in _CLIP_MODEL_TYPES or base.get("architectures") == expert.get("architectures")
    return types <= _CLIP_MODEL_TYPES


@dataclass(frozen=True)
class MergePlan:
    """Which tensors a run merges and which it takes from the base, decided once per run.

    Attributes:
        names: The merged tensors, sorted: the scope's floating-point tensors of the base that
            the first expert has. Every later expert must have them all.
        from_base: Tensors of the scope kept from the base, with the reason (a module the
            experts' architecture does not have, e.g. ``visual_projection`` of a ``CLIPVisionModel``).
    """

    names: list[str]
    from_base: dict[str, str] = field(default_factory=dict)


def plan_merge(base: TensorSet, expert: TensorSet, scope: str | Sequence[str], label: str) -> MergePlan:
    """The :class:`MergePlan` of a run whose first expert is ``expert`` (checked with
    :func:`check_compatible` too). A scope tensor the expert lacks comes from the base only when
    the expert lacks its whole module *and* is a model of another class (a tower-only model);
    anything else missing is an :class:`IncompatibleExpertError` naming the tensor."""
    check_architecture(base.config, expert.config, label)
    in_scope = merged_names(base, scope)
    expert_modules = {n.split(".", 1)[0] for n in expert.names()}
    tower_only = base.config.get("model_type") != expert.config.get("model_type")
    names, from_base = [], {}
    for name in in_scope:
        if name in expert:
            names.append(name)
        elif tower_only and name.split(".", 1)[0] not in expert_modules:
            arch = "/".join(expert.config.get("architectures") or []) or str(expert.config.get("model_type"))
            from_base[name] = f"the expert does not have it: it is a {arch}"
        else:
            raise IncompatibleExpertError(f"expert {label} has no tensor '{name}', which scope {_scope_label(scope)} merges")
    if not names:
        raise IncompatibleExpertError(f"expert {label} has none of the tensors scope {_scope_label(scope)} merges")
    plan = MergePlan(names=names, from_base=from_base)
    check_compatible(base, expert, label, plan.names, scope)
    return plan


def check_architecture(base_config: dict[str, Any], expert_config: dict[str, Any], label: str) -> None:
    """Same model family and the same architecture fields in the towers both have."""
    if not _same_family(base_config, expert_config):
        raise IncompatibleExpertError(
            f"expert {label} is a {_architecture(expert_config)}, the base is a {_architecture(base_config)}"
        )


def check_compatible(
    base: TensorSet, expert: TensorSet, label: str, names: Sequence[str], scope: str | Sequence[str] = "all"
) -> None:
    """The expert has every merged tensor in the base's shape and no floating-point tensor of the
    scope that the base lacks; raises :class:`IncompatibleExpertError` naming the first difference.

    Integer buffers (``position_ids``, kept by older checkpoints, absent from newer ones) are
    never compared: they come from the base."""
    check_architecture(base.config, expert.config, label)
    difference = config_difference(base.config, expert.config)
    hint = f"; {difference}" if difference else ""
    for name in names:
        if name not in expert:
            raise IncompatibleExpertError(f"expert {label} has no tensor '{name}', which the merge needs{hint}")
        if tuple(expert.shape(name)) != tuple(base.shape(name)):
            raise IncompatibleExpertError(
                f"expert {label}: tensor '{name}' has shape {list(expert.shape(name))}, "
                f"the base has {list(base.shape(name))}{hint}"
            )
        if not expert.dtype(name).is_floating_point:
            raise IncompatibleExpertError(f"expert {label}: tensor '{name}' is {expert.dtype(name)}, not floating point")
    prefixes = _prefixes(scope)
    extra = sorted(
        n for n in expert.names()
        if n not in base and n.startswith(prefixes) and expert.dtype(n).is_floating_point
    )
    if extra:
        raise IncompatibleExpertError(f"expert {label} has tensor '{extra[0]}', which the base does not have")
    if difference:
        raise IncompatibleExpertError(f"expert {label} differs from the base: {difference}")


def _prefixes(scope: str | Sequence[str]) -> tuple[str, ...]:
    prefixes = SCOPES.get(scope) if isinstance(scope, str) else tuple(scope)
    if prefixes is None:
        raise UsageError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)} or a list of name prefixes")
    return prefixes


def _scope_label(scope: str | Sequence[str]) -> str:
    return repr(scope) if isinstance(scope, str) else repr(list(scope))


@dataclass
class TensorHeaders:
    """Names, shapes and dtypes of a checkpoint's tensors without their data (safetensors
    headers), with its config: what the checks above need, read before any weights move."""

    config: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    path: str = ""

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name][1]
