"""PEFT LoRA adapters as experts: the full checkpoint an adapter stands for, built lazily.

A LoRA adapter repo holds ``adapter_config.json`` and ``adapter_model.safetensors`` (pairs
``<module>.lora_A.weight`` (r × in) and ``<module>.lora_B.weight`` (out × r) under PEFT's
``base_model.model.`` prefix). The expert it stands for is, per target module,
``W = W_base + scale · B·A`` (``Bᵀ``-transposed with ``fan_in_fan_out``), with ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override per
module), and the ``modules_to_save`` tensors replacing the base's. :class:`LoraCheckpoint` reads like
a :class:`~hf_merge.io.checkpoint.Checkpoint` (:mod:`hf_merge.io.lora_checkpoint`) and computes each tensor when it is read, from the
base's, so no second model is ever held and ``peft`` is never imported.

An adapter stands for the base with its changes, so it has every tensor of the base. When it is a
merge's first expert and adapts one CLIP tower only (a ``CLIPVisionModel``, or its ``vision_model``
alone, as FusionBench trains them), it decides the merged tensors as that tower's model would, like
a full fine-tuned vision expert: ``visual_projection`` comes from the base, and full vision experts
can follow it in the same merge.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_merge.errors import CheckpointError, IncompatibleExpertError
from hf_merge.io.checkpoint import (
    PICKLE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
)
from hf_merge.log import get_logger

logger = get_logger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_SUFFIX = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.(?:(?P<adapter>[^.]+)\.)?weight$")
# LoRA variants whose merged weight is not W + scale·B·A: refused rather than merged wrongly.
_UNSUPPORTED_FLAGS = ("use_dora", "lora_bias", "use_qalora", "use_bdlora")
# CLIP's towers: name prefix -> (model_type, architecture, config key) of the tower-only model.
_TOWERS = {"vision_model.": ("clip_vision_model", "CLIPVisionModel", "vision_config"),
           "text_model.": ("clip_text_model", "CLIPTextModel", "text_config")}


def is_adapter_folder(path: str | Path) -> bool:
    """A folder with a PEFT adapter's files and no model weights of its own."""
    folder = Path(path)
    adapter = (folder / ADAPTER_CONFIG_NAME).is_file() or (folder / ADAPTER_WEIGHTS_NAME).is_file()
    return adapter and not any(
        (folder / name).is_file() for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, PICKLE_WEIGHTS_NAME))


def is_adapter_repo(files: list[str]) -> bool:
    """A repo file list with a PEFT adapter's files and no model weights of its own."""
    return (ADAPTER_CONFIG_NAME in files or ADAPTER_WEIGHTS_NAME in files) and not any(
        f in files for f in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, PICKLE_WEIGHTS_NAME))


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT ``adapter_config.json`` that decide the merged weights."""

    r: int
    lora_alpha: float
    base_model_name_or_path: str | None
    revision: str | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, label: str) -> AdapterConfig:
        """Checked fields; :class:`CheckpointError` naming the field for anything this merge cannot do."""
        where = f"adapter {label}: {ADAPTER_CONFIG_NAME}"
        if not isinstance(data, dict):
            raise CheckpointError(f"{where} is not a JSON object; re-save the adapter with peft's save_pretrained")
        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            raise CheckpointError(
                f"{where}: peft_type {peft_type!r} is not supported; only LORA adapters can be merged "
                "(merge the adapter into its base with peft and pass that model instead)")
        for flag in _UNSUPPORTED_FLAGS:
            if data.get(flag):
                raise CheckpointError(f"{where}: {flag} is set, which this merge does not support; "
                                      "merge the adapter into its base with peft and pass that model instead")
        if data.get("target_parameters"):
            raise CheckpointError(f"{where}: target_parameters is not supported; merge the adapter with peft first")
        r, alpha = data.get("r"), data.get("lora_alpha")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise CheckpointError(f"{where}: field 'r' must be a positive integer, got {r!r}; fix the adapter's config")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise CheckpointError(f"{where}: field 'lora_alpha' must be a number, got {alpha!r}; fix the adapter's config")
        targets = data.get("target_modules")
        if targets is not None and not isinstance(targets, (str, list)):
            raise CheckpointError(f"{where}: field 'target_modules' must be a list or a regex string, got {targets!r}")
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise CheckpointError(f"{where}: field 'target_modules' is not a valid regex ({err})") from None
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(data.get(key) or {}, dict):
                raise CheckpointError(f"{where}: field '{key}' must be an object, got {data.get(key)!r}")
        base = data.get("base_model_name_or_path")
        if base is not None and not isinstance(base, str):
            raise CheckpointError(f"{where}: field 'base_model_name_or_path' must be a string, got {base!r}")
        config = cls(
            r=r, lora_alpha=float(alpha), base_model_name_or_path=base, revision=data.get("revision"),
            use_rslora=bool(data.get("use_rslora")), fan_in_fan_out=bool(data.get("fan_in_fan_out")),
            target_modules=list(targets) if isinstance(targets, list) else targets,
            modules_to_save=list(data.get("modules_to_save") or []),
            rank_pattern=dict(data.get("rank_pattern") or {}), alpha_pattern=dict(data.get("alpha_pattern") or {}),
        )
        for module_key in [""] + list(config.rank_pattern) + list(config.alpha_pattern):
            rank, scale = config.rank_of(module_key), config.scale_of(module_key)
            if not math.isfinite(scale) or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                field_name = "lora_alpha / r" if not module_key else f"rank_pattern/alpha_pattern[{module_key!r}]"
                raise CheckpointError(
                    f"{where}: the scale {field_name} is {scale} (r={rank}), not a finite number; fix the adapter's config")
        return config

    @classmethod
    def load(cls, path: str | Path, label: str) -> AdapterConfig:
        """Read and check ``adapter_config.json`` in ``path`` (a folder or the file itself)."""
        file = Path(path)
        if file.is_dir():
            file = file / ADAPTER_CONFIG_NAME
        if not file.is_file():
            raise CheckpointError(f"adapter {label} has no {ADAPTER_CONFIG_NAME}; it is not a PEFT adapter")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"adapter {label}: {ADAPTER_CONFIG_NAME} is not valid JSON ({err}); "
                                  "re-save the adapter with peft's save_pretrained") from None
        return cls.from_dict(data, label)

    def _pattern(self, patterns: Mapping[str, Any], module: str) -> Any:
        # As PEFT: the first pattern key that matches the end of the module's name, at a dot.
        for key in patterns:
            if module and re.match(rf"(.*\.)?({key})$", module):
                return patterns[key]
        return None

    def rank_of(self, module: str) -> Any:
        """The rank of ``module`` (its ``rank_pattern`` entry, else ``r``)."""
        found = self._pattern(self.rank_pattern, module)
        return self.r if found is None else found

    def scale_of(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) of ``module``."""
        rank = self.rank_of(module)
        alpha = self._pattern(self.alpha_pattern, module)
        alpha = self.lora_alpha if alpha is None else float(alpha)
        if not isinstance(rank, (int, float)) or rank <= 0:
            return math.nan
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool:
        """Whether ``target_modules`` names ``module`` as PEFT matches it: a string is a full
        regex match of the module name, a list matches a whole name or a suffix at a dot."""
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        return module in self.target_modules or any(module.endswith(f".{t}") for t in self.target_modules)


@dataclass(frozen=True)
class LoraModule:
    """One adapted ``nn.Linear``: its low-rank factors' tensor names and its scale."""

    a: str
    b: str
    rank: int
    scale: float


@dataclass
class AdapterPlan:
    """How an adapter's tensors map onto the base's.

    Attributes:
        deltas: Base weight name -> the :class:`LoraModule` added to it.
        replaced: Base tensor name -> adapter tensor name (``modules_to_save``).
        tower: ``"vision_model."`` or ``"text_model."`` when every tensor is in that CLIP tower.
    """

    config: AdapterConfig
    deltas: dict[str, LoraModule] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    tower: str | None = None


def plan_adapter(config: AdapterConfig, tensors: Mapping[str, tuple[tuple[int, ...], Any]],
                 base: Any, label: str) -> AdapterPlan:
    """Map the adapter's tensors (name -> (shape, dtype)) onto ``base`` (a
    :class:`~hf_merge.io.validation.TensorSet`) and check every shape, from headers alone.

    Raises :class:`IncompatibleExpertError` naming the tensor (a module the base lacks, factors
    whose ranks differ, a product of another shape) or :class:`CheckpointError` (no LoRA tensor)."""
    plan = AdapterPlan(config)
    factors: dict[str, dict[str, str]] = {}
    for name in sorted(tensors):
        inner = name.removeprefix(PEFT_PREFIX)
        match = _LORA_SUFFIX.match(inner)
        if match is None:
            if ".lora_" in inner or "lora_magnitude_vector" in inner:
                raise CheckpointError(f"adapter {label}: tensor '{name}' is of a LoRA variant this merge does not "
                                      "support; merge the adapter with peft first")
            target = _base_name(_strip_saved(inner), base)
            if target is None:
                raise IncompatibleExpertError(f"adapter {label}: tensor '{name}' (modules_to_save) has no counterpart "
                                              "in the base; the adapter was trained on another model")
            _check_shape(label, name, tensors[name][0], base.shape(target), target)
            plan.replaced[target] = name
            continue
        factors.setdefault(match["module"], {})[match["part"]] = name
    for module, parts in sorted(factors.items()):
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise IncompatibleExpertError(f"adapter {label}: tensor '{next(iter(parts.values()))}' has no {missing} "
                                          "partner; the adapter file is incomplete, download it again")
        target = _base_name(module + ".weight", base)
        if target is None:
            raise IncompatibleExpertError(
                f"adapter {label}: tensor '{parts['A']}' adapts module '{module}', which the base does not have; "
                "the adapter was trained on another model")
        shape_a, shape_b = tuple(tensors[parts["A"]][0]), tuple(tensors[parts["B"]][0])
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1]:
            raise IncompatibleExpertError(
                f"adapter {label}: tensor '{parts['A']}' has shape {list(shape_a)} and '{parts['B']}' {list(shape_b)}: "
                "their ranks differ; the adapter file is corrupt, download or re-save it")
        module_key = target[: -len(".weight")]
        rank = config.rank_of(module_key)
        if shape_a[0] != rank:
            raise IncompatibleExpertError(
                f"adapter {label}: tensor '{parts['A']}' has rank {shape_a[0]}, but {ADAPTER_CONFIG_NAME} says r={rank}; "
                "the adapter's config and weights do not belong together")
        product = (shape_b[0], shape_a[1])
        _check_shape(label, parts["B"], product[::-1] if config.fan_in_fan_out else product, base.shape(target), target)
        plan.deltas[target] = LoraModule(parts["A"], parts["B"], rank, config.scale_of(module_key))
    if not plan.deltas and not plan.replaced:
        raise CheckpointError(f"adapter {label}: {ADAPTER_WEIGHTS_NAME} holds no LoRA tensor; download it again")
    if config.target_modules is not None and plan.deltas and not any(
            config.targets(name[: -len(".weight")]) for name in plan.deltas):
        raise IncompatibleExpertError(
            f"adapter {label}: target_modules {config.target_modules!r} matches none of its adapted modules in the base; "
            "fix the adapter's config")
    touched = list(plan.deltas) + list(plan.replaced)
    for tower in _TOWERS:
        if base.config.get("model_type") == "clip" and all(n.startswith(tower) for n in touched):
            plan.tower = tower
    return plan


def _strip_saved(name: str) -> str:
    # PEFT saves modules_to_save without their wrapper; older files may keep `modules_to_save.<adapter>.`.
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def _base_name(name: str, base: Any) -> str | None:
    """The base tensor ``name`` stands for: itself, or under ``vision_model.`` when the adapter
    wrapped a bare vision transformer (FusionBench's) or transformers 5's ``CLIPVisionModel``,
    whose module names have no ``vision_model.`` prefix."""
    for candidate in (name, "vision_model." + name):
        if candidate in base:
            return candidate
    return None


def _check_shape(label: str, name: str, shape: tuple[int, ...], expected: tuple[int, ...], target: str) -> None:
    if tuple(shape) != tuple(expected):
        raise IncompatibleExpertError(
            f"adapter {label}: tensor '{name}' gives shape {list(shape)} for '{target}', the base has {list(expected)}")


def view_config(base_config: dict[str, Any], plan: AdapterPlan) -> dict[str, Any]:
    """The config of the model an adapter stands for: the base's, or its tower's."""
    if plan.tower is None:
        return dict(base_config)
    model_type, architecture, key = _TOWERS[plan.tower]
    config = dict(base_config.get(key) or {})
    config.update(model_type=model_type, architectures=[architecture])
    if "projection_dim" in base_config:  # a tower config that has its own keeps it
        config.setdefault("projection_dim", base_config["projection_dim"])
    return config


def view_names(base_names: list[str], plan: AdapterPlan) -> list[str]:
    """The tensors of the model an adapter stands for (the base's, or its tower's)."""
    return [n for n in base_names if plan.tower is None or n.startswith(plan.tower)]


def check_base(config: AdapterConfig, label: str, *, repo_id: str | None, revision: str | None,
               commit_sha: str | None, base_config: Mapping[str, Any], base_path: str | Path | None = None) -> None:
    """The adapter was trained on this merge's base: same repo (a revision that differs is a warning).

    A local base folder is accepted when the adapter names that folder, or the repo its
    ``config.json`` records (``_name_or_path``)."""
    named = config.base_model_name_or_path
    if not named:
        raise IncompatibleExpertError(
            f"adapter {label}: {ADAPTER_CONFIG_NAME} has no base_model_name_or_path, so it cannot be checked against "
            "the base; set it to the repo the adapter was trained on")
    accepted = {str(v).rstrip("/").lower() for v in (repo_id, base_config.get("_name_or_path")) if v}
    if base_path is not None:
        accepted.add(str(Path(base_path).resolve()).lower())
    candidate = named.rstrip("/").lower()
    if candidate not in accepted and str(Path(named).expanduser().resolve()).lower() not in accepted:
        base = repo_id or str(base_path or "the base")
        raise IncompatibleExpertError(
            f"adapter {label} was trained on {named}, not on the merge's base {base}; merge it into a merge of {named}")
    pinned = revision or commit_sha
    if config.revision and pinned and config.revision not in (revision, commit_sha) and not (
            commit_sha or "").startswith(config.revision):
        logger.warning("adapter %s was trained on %s@%s; the merge's base is at %s", label, named, config.revision, pinned)
