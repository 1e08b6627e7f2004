"""The checkpoint a PEFT LoRA adapter stands for, read tensor by tensor from the base's.

The format, the checks and the mapping of names are :mod:`hf_merge.io.lora`; this is the lazy view a
merge reads as an expert, and what opens an expert folder either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hf_merge.errors import CheckpointError
from hf_merge.io.checkpoint import Checkpoint, SafetensorsFile, all_finite
from hf_merge.io.lora import (
    ADAPTER_WEIGHTS_NAME,
    AdapterConfig,
    AdapterPlan,
    check_base,
    is_adapter_folder,
    plan_adapter,
    view_config,
    view_names,
)
from hf_merge.io.validation import TensorHeaders, TensorSet


class LoraCheckpoint(Checkpoint):
    """The checkpoint a LoRA adapter stands for, read tensor by tensor from the base's.

    Use :func:`open_adapter`. Config, names, shapes and dtypes are the base's, so the view has
    whatever tensor a merge needs; :meth:`get` adds ``scale · B·A`` to an adapted weight as it is
    read. Which tensors a merge takes from its first expert is decided on :meth:`planning_view`."""

    def __init__(self, path: Path, base: Checkpoint, weights: SafetensorsFile, plan: AdapterPlan, label: str):
        super().__init__(path, dict(base.config), [weights], {})
        self.base = base
        self.weights = weights
        self.plan = plan
        self._label = label
        self._names = base.names()
        self._known = frozenset(self._names)

    def planning_view(self) -> TensorSet:
        """The model the adapter stands for when it decides a merge's tensors: for an adapter of one
        CLIP tower, that tower's model (``CLIPVisionModel``), as a full fine-tuned vision expert
        would, so ``visual_projection`` comes from the base and full vision experts can follow."""
        if self.plan.tower is None:
            return self
        names = view_names(self._names, self.plan)
        return TensorHeaders(view_config(self.base.config, self.plan),
                             {n: (self.base.shape(n), self.base.dtype(n)) for n in names}, self._label)

    def describe(self) -> dict[str, Any]:
        """What the lineage records of the adapter (JSON-ready)."""
        config = self.plan.config
        return {"type": "lora", "r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
                "base_model_name_or_path": config.base_model_name_or_path,
                "modules": len(self.plan.deltas), "modules_to_save": len(self.plan.replaced)}

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._known

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        saved = self.plan.replaced.get(name)
        if saved is not None:
            value = self.weights.get(saved)
            tensor = value.to(self.base.dtype(name)) if out is None else out.copy_(value)
        else:
            tensor = self.base.get(name, out)
        module = self.plan.deltas.get(name)
        if module is not None:
            # As PEFT merges: B·A in the factors' precision (float32 for half ones), then scaled.
            lora_a, lora_b = self.weights.get(module.a), self.weights.get(module.b)
            if lora_a.dtype in (torch.float16, torch.bfloat16):
                lora_a, lora_b = lora_a.float(), lora_b.float()
            delta = lora_b @ lora_a
            if self.plan.config.fan_in_fan_out:
                delta = delta.T
            delta.mul_(module.scale)
            tensor.add_(delta.to(tensor.dtype))
        if name in self._finite and not all_finite(tensor):
            raise CheckpointError(f"expert {self._label}: tensor '{name}' contains NaN or Inf values")
        return tensor

    def read_raw(self, name: str, out: memoryview, start: int = 0) -> None:
        tensor = self.get(name)
        stored = tensor.reshape(-1).view(torch.uint8).numpy().data
        out[:] = stored[start: start + len(out)]

    def close(self) -> None:
        self.weights.close()


def open_adapter(path: str | Path, base: Checkpoint, label: str, base_source: Any = None) -> LoraCheckpoint:
    """Open the adapter in folder ``path`` over ``base`` (opened). With ``base_source`` (a
    :class:`~hf_merge.hub.sources.ModelSource` of the base) the adapter must name that base."""
    folder = Path(path)
    config = AdapterConfig.load(folder, label)
    if base_source is not None:
        check_base(config, label, repo_id=base_source.repo_id, revision=base_source.revision,
                   commit_sha=base_source.commit_sha, base_config=base.config, base_path=base_source.path)
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"adapter {label} has no {ADAPTER_WEIGHTS_NAME} (safetensors); "
                              "re-save it with peft's save_pretrained(safe_serialization=True)")
    weights = SafetensorsFile(folder / ADAPTER_WEIGHTS_NAME)
    try:
        tensors = {n: (info.shape, info.dtype) for n, info in weights.tensors.items()}
        plan = plan_adapter(config, tensors, base, label)
    except BaseException:
        weights.close()
        raise
    return LoraCheckpoint(folder, base, weights, plan, label)


def open_expert(path: str | Path, label: str, base: Checkpoint, base_source: Any, allow_pickle: bool = False) -> Checkpoint:
    """An expert folder opened for a merge into ``base``: a :class:`LoraCheckpoint` for a PEFT
    adapter (checked against ``base_source``, a :class:`~hf_merge.hub.sources.ModelSource`), else
    the checkpoint itself."""
    if not is_adapter_folder(path):
        return Checkpoint.open(path, allow_pickle=allow_pickle)
    return open_adapter(path, base, label, base_source)


def planning_view(checkpoint: Checkpoint) -> TensorSet:
    """What :func:`~hf_merge.io.validation.plan_merge` reads of a first expert (see
    :meth:`LoraCheckpoint.planning_view`): the checkpoint itself unless it is an adapter."""
    return checkpoint.planning_view() if isinstance(checkpoint, LoraCheckpoint) else checkpoint


def lineage_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """``{"adapter": ...}`` for a :class:`LoraCheckpoint` (what the lineage and card show), else ``{}``."""
    return {"adapter": checkpoint.describe()} if isinstance(checkpoint, LoraCheckpoint) else {}
