"""Evaluate a CLIP model on zero-shot classification tasks.

:class:`Evaluator` holds the tasks, the head cache and the device; ``evaluator.evaluate(model)``
returns one metrics dict per task (the keys of
:class:`~hf_merge.evaluation.metric.ZeroShotAccuracy` plus ``num_classes`` and ``dataset``).
Images are encoded in batches on the Accelerate device (``accelerate.PartialState().device``).
:func:`evaluate_model` is the one-call form used by ``hf-merge eval``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from hf_merge.errors import EvaluationError
from hf_merge.log import get_logger
from hf_merge.progress import inner_bar_allowed
from hf_merge.evaluation.datasets import load_task_data
from hf_merge.evaluation.heads import HeadCache
from hf_merge.evaluation.metric import ZeroShotAccuracy
from hf_merge.evaluation.tasks import Task, get_task

logger = get_logger(__name__)


def default_device() -> torch.device:
    """The device Accelerate assigns to this process (GPU when there is one, else CPU)."""
    from accelerate import PartialState

    return PartialState().device


def load_clip(
    model: str | Path, *, device: torch.device | str | None = None, token: str | bool | None = None,
    base: Any = None,
) -> tuple[Any, Any]:
    """Load ``(CLIPModel, CLIPProcessor)`` from a folder, ``repo_id`` or ``repo_id@revision``.

    Weights are read from safetensors only; the processor comes from the same snapshot. A
    tower-only checkpoint (``CLIPVisionModel``, ``CLIPTextModel``) is evaluated as its model card
    says to use it: the ``base`` CLIP model with that tower's tensors replaced; a PEFT LoRA adapter
    as the ``base`` with the adapter merged in.
    """
    from transformers import CLIPModel, CLIPProcessor

    from hf_merge.hub.sources import resolve

    from hf_merge.io.lora import is_adapter_folder

    source = resolve(model, token=token)
    tower_only = _model_type(source.path) in ("clip_vision_model", "clip_text_model")
    if tower_only or is_adapter_folder(source.path):
        return _with_tower(source, base, device=device, token=token)
    try:
        clip = CLIPModel.from_pretrained(source.path, use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"cannot load a CLIP model from {source.name}: {str(error).splitlines()[0]}") from error
    try:
        processor = CLIPProcessor.from_pretrained(source.path)
    except (OSError, ValueError, TypeError) as error:
        raise EvaluationError(
            f"{source.name} has no usable CLIP processor/tokenizer files: {str(error).splitlines()[0]}"
        ) from error
    clip.eval().to(device if device is not None else default_device())
    return clip, processor


def _model_type(folder: Path) -> str | None:
    import json

    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def _with_tower(source: Any, base: Any, *, device: Any, token: Any) -> tuple[Any, Any]:
    from hf_merge.io.checkpoint import Checkpoint

    if base is None:
        raise EvaluationError(f"{source.name} holds one CLIP tower only; evaluating it needs the base CLIP model")
    if isinstance(base, tuple):
        import copy

        clip, processor = copy.deepcopy(base[0]), base[1]
    else:
        clip, processor = load_clip(base, device="cpu", token=token)
    from hf_merge.io.lora import is_adapter_folder
    from hf_merge.io.lora_checkpoint import open_adapter

    opened: Checkpoint
    if is_adapter_folder(source.path):  # a LoRA adapter: the tensors of the model it stands for
        state = {n: t.detach().to("cpu") for n, t in clip.state_dict().items()}
        opened = open_adapter(source.path, Checkpoint(source.path, clip.config.to_dict(), [], state), source.name)
    else:
        opened = Checkpoint.open(source.path)
    with opened as checkpoint:
        tensors = {name: checkpoint.get(name) for name in checkpoint.names()}
    own = clip.state_dict()
    unknown = [n for n in tensors if n not in own and not n.endswith("position_ids")]
    if unknown:
        raise EvaluationError(f"{source.name}: tensor '{unknown[0]}' is not a tensor of the base CLIP model")
    clip.load_state_dict({n: t for n, t in tensors.items() if n in own}, strict=False)
    clip.eval().to(device if device is not None else default_device())
    return clip, processor


class Evaluator:
    """Zero-shot evaluation of CLIP models on a fixed list of tasks.

    Args:
        tasks: Task names or :class:`Task` objects.
        limit: Keep at most this many examples per task (evenly spaced; ``None`` keeps all).
        batch_size: Images encoded per forward pass.
        device: Where to run; defaults to the Accelerate device.
        head_cache: Shared :class:`HeadCache`; heads are reused while the text tower is unchanged.
        token: Hub token for models given as repo ids (never logged).
    """

    def __init__(
        self,
        tasks: Sequence[str | Task],
        *,
        limit: int | None = None,
        batch_size: int = 64,
        device: torch.device | str | None = None,
        head_cache: HeadCache | None = None,
        token: str | bool | None = None,
    ):
        self.token = token
        self.tasks = [get_task(t) for t in tasks]
        self.limit = limit
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else default_device()
        self.head_cache = head_cache if head_cache is not None else HeadCache()
        self._data: dict[str, Any] = {}

    def evaluate(
        self, model: Any, processor: Any = None, tasks: Sequence[str | Task] | None = None, *, base: Any = None
    ) -> dict[str, dict[str, Any]]:
        """Metrics of ``model`` per task name (all of this evaluator's tasks unless ``tasks`` is given).

        ``model`` is a folder, a ``repo_id[@revision]`` or a ``CLIPModel`` (moved to this
        evaluator's device). A ``CLIPModel`` needs ``processor`` unless it was loaded from a folder
        that holds its processor files. ``base`` completes a tower-only checkpoint (see :func:`load_clip`).
        """
        if not hasattr(model, "get_image_features"):
            model, loaded = load_clip(model, device=self.device, token=self.token, base=base)
            processor = processor or loaded
        elif processor is None:
            processor = _processor_beside(model)
        model.eval().to(self.device)
        selected = [get_task(t) for t in tasks] if tasks is not None else self.tasks
        return {task.name: self.evaluate_task(model, processor, task) for task in selected}

    @torch.no_grad()
    def evaluate_task(self, model: Any, processor: Any, task: Task) -> dict[str, Any]:
        """Accuracy, top-5 accuracy and per-class accuracy of ``model`` on one task."""
        data = self._data.get(task.name)
        if data is None or data.task != task:
            data = self._data[task.name] = load_task_data(task, limit=self.limit)
        head = self.head_cache.get(model, _tokenizer(processor), task, device=self.device)
        metric = ZeroShotAccuracy(keep_in_memory=True)
        top_k = min(5, task.num_classes)
        batches = data.batches(self.batch_size)
        if inner_bar_allowed():
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-len(data) // self.batch_size), desc=task.name, leave=False)
        for images, labels in batches:
            pixels = _image_processor(processor)(images=images, return_tensors="pt")["pixel_values"]
            embeds = model.get_image_features(pixel_values=pixels.to(self.device, model.dtype)).pooler_output
            ranked = head.logits(embeds).topk(top_k, dim=-1).indices.cpu().tolist()
            metric.add_batch(predictions=ranked, references=labels)
        result = metric.compute(num_classes=task.num_classes, top_k=top_k)
        # With fewer than 5 classes the top 5 is every class; one key name for every task.
        result["top5_accuracy"] = result.pop(f"top{top_k}_accuracy")
        result["num_classes"] = task.num_classes
        result["dataset"] = data.source
        logger.info("%s: accuracy %.4f on %d examples", task.name, result["accuracy"], result["num_samples"])
        return result


def evaluate_model(
    model: str | Path | Any,
    tasks: Sequence[str | Task],
    limit: int | None = None,
    processor: Any = None,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    token: str | bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate one model (folder, ``repo_id[@revision]`` or ``CLIPModel``) on ``tasks``.

    Returns ``{task name: metrics}``; see :meth:`Evaluator.evaluate_task` for the keys.
    """
    if not tasks:
        raise EvaluationError("no tasks to evaluate; pass at least one task name")
    evaluator = Evaluator(tasks, limit=limit, batch_size=batch_size, device=device, token=token)
    return evaluator.evaluate(model, processor)


def _processor_beside(model: Any) -> Any:
    """The processor saved with a model loaded from a local folder; models built in memory need one passed."""
    folder = Path(getattr(model, "name_or_path", "") or "")
    if str(folder) and folder.is_dir() and (folder / "preprocessor_config.json").is_file():
        from transformers import CLIPProcessor

        return CLIPProcessor.from_pretrained(folder)
    raise EvaluationError("evaluating a CLIPModel object needs its processor: pass processor=CLIPProcessor(...)")


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _image_processor(processor: Any) -> Any:
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise EvaluationError("the processor has no image processor; pass a CLIPProcessor")
    return image_processor
