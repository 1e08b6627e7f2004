"""Evaluate a CLIP model on zero-shot classification tasks.

:class:`Evaluator` holds the tasks, the head cache and the device; ``evaluator.evaluate(model)``
returns one metrics dict per task (the keys of
:class:`~hf_merge.evaluation.metric.ZeroShotAccuracy` plus ``num_classes`` and ``dataset``).
Images are encoded in batches on the Accelerate device (``accelerate.PartialState().device``).
:func:`evaluate_model` is the one-call form used by ``hf-merge eval``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_merge.errors import EvaluationError
from hf_merge.evaluation.datasets import load_task_data
from hf_merge.evaluation.heads import HeadCache
from hf_merge.evaluation.metric import accuracy_scores
from hf_merge.evaluation.preprocess_cache import PixelCache
from hf_merge.evaluation.preprocessing import Preprocessing, pin_image_processor
from hf_merge.evaluation.tasks import Task, get_task
from hf_merge.log import get_logger
from hf_merge.progress import inner_bar_allowed

logger = get_logger(__name__)

EVAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """The device Accelerate assigns to this process (GPU when there is one, else CPU)."""
    from accelerate import PartialState

    return PartialState().device


def load_clip(
    model: str | Path, *, device: torch.device | str | None = None, token: str | None = None,
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

    Each task's images are preprocessed once (by ``workers`` processes) into a :class:`PixelCache`
    that every later evaluation reads: the next merge step, the base, each expert.

    Args:
        tasks: Task names or :class:`Task` objects.
        limit: Keep at most this many examples per task (evenly spaced; ``None`` keeps all).
        batch_size: Images encoded per forward pass (default 256 on CUDA, 64 elsewhere). Out of GPU
            memory, it is halved (said once) rather than failing.
        device: Where to run; defaults to the Accelerate device.
        head_cache: Shared :class:`HeadCache`; heads are reused while the text tower is unchanged.
        token: Hub token for models given as repo ids (never logged).
        dtype: ``"float32"`` (default, the paper's), ``"bfloat16"`` or ``"float16"``: the dtype of the
            model's forward pass.
        fast_preprocessing: Use transformers' torchvision image processor instead of the PIL one the
            reference evaluation uses.
        workers: Preprocessing processes (default one per core, at most 8; 0: this process).
        pixel_cache: Shared :class:`PixelCache` (overrides ``workers``).
    """

    def __init__(
        self,
        tasks: Sequence[str | Task],
        *,
        limit: int | None = None,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        head_cache: HeadCache | None = None,
        token: str | bool | None = None,
        dtype: str = "float32",
        fast_preprocessing: bool = False,
        workers: int | None = None,
        pixel_cache: PixelCache | None = None,
    ):
        if dtype not in EVAL_DTYPES:
            raise EvaluationError(f"eval dtype must be one of {', '.join(EVAL_DTYPES)}, got {dtype!r}")
        if batch_size is not None and batch_size <= 0:
            raise EvaluationError(f"batch size must be positive, got {batch_size}")
        self.token = token
        self.tasks = [get_task(t) for t in tasks]
        self.limit = limit
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 64)
        self.dtype_name = dtype
        self.dtype = EVAL_DTYPES[dtype]
        self.fast_preprocessing = fast_preprocessing
        self.head_cache = head_cache if head_cache is not None else HeadCache()
        self.pixel_cache = pixel_cache if pixel_cache is not None else PixelCache(workers=workers)
        self.preprocessing: Preprocessing | None = None  # the last one used, for the report
        self._data: dict[str, Any] = {}
        self._fits: int | None = None  # the batch size that fits the GPU, once one did not

    def evaluate(
        self, model: Any, processor: Any = None, tasks: Sequence[str | Task] | None = None, *, base: Any = None
    ) -> dict[str, dict[str, Any]]:
        """Metrics of ``model`` per task name (all of this evaluator's tasks unless ``tasks`` is given).

        ``model`` is a folder, a ``repo_id[@revision]`` or a ``CLIPModel`` (moved to this
        evaluator's device and dtype). A ``CLIPModel`` needs ``processor`` unless it was loaded from a
        folder that holds its processor files. ``base`` completes a tower-only checkpoint (see :func:`load_clip`).
        """
        model, processor = self.prepare(model, processor, base=base)
        preprocessing = pin_image_processor(processor, fast=self.fast_preprocessing)
        self.preprocessing = preprocessing
        selected = [get_task(t) for t in tasks] if tasks is not None else self.tasks
        return {task.name: self.evaluate_task(model, processor, task, preprocessing) for task in selected}

    def prepare(self, model: Any, processor: Any = None, *, base: Any = None) -> tuple[Any, Any]:
        """``(CLIPModel, processor)`` on this evaluator's device and dtype, loading ``model`` if it is a name."""
        if not hasattr(model, "get_image_features"):
            model, loaded = load_clip(model, device=self.device, token=self.token if isinstance(self.token, str) else None, base=base)
            processor = processor or loaded
        elif processor is None:
            processor = _processor_beside(model)
        model.eval().to(self.device, self.dtype)
        return model, processor

    @torch.no_grad()
    def evaluate_task(
        self, model: Any, processor: Any, task: Task, preprocessing: Preprocessing | None = None
    ) -> dict[str, Any]:
        """Accuracy, top-5 accuracy, per-class accuracy and undecodable images of ``model`` on one task."""
        self.head_cache.get(model, _tokenizer(processor), task, device=self.device)  # not part of images/s
        started = time.perf_counter()
        builds = self.pixel_cache.builds
        ranked, labels, undecodable = self.predictions(model, processor, task, preprocessing)
        seconds = time.perf_counter() - started
        top_k = min(5, task.num_classes)
        result = accuracy_scores(ranked, labels, num_classes=task.num_classes, top_k=top_k)
        # With fewer than 5 classes the top 5 is every class; one key name for every task.
        result["top5_accuracy"] = result.pop(f"top{top_k}_accuracy")
        result["num_classes"] = task.num_classes
        result["dataset"] = self._data[task.name].source
        result["undecodable"] = undecodable
        fresh = "preprocessed now" if self.pixel_cache.builds > builds else "cached pixels"
        logger.info("%s: accuracy %.4f on %d images, %.0f images/s (%s)", task.name, result["accuracy"],
                    result["num_samples"], len(labels) / max(seconds, 1e-9), fresh)
        return result

    @torch.no_grad()
    def predictions(
        self, model: Any, processor: Any, task: Task, preprocessing: Preprocessing | None = None
    ) -> tuple[list[list[int]], list[int], int]:
        """``(ranked class ids per image, labels, undecodable images)`` of ``model`` on ``task``."""
        data = self._data.get(task.name)
        if data is None or data.task != task:
            data = self._data[task.name] = load_task_data(task, limit=self.limit)
        preprocessing = preprocessing or pin_image_processor(processor, fast=self.fast_preprocessing)
        head = self.head_cache.get(model, _tokenizer(processor), task, device=self.device)
        top_k = min(5, task.num_classes)
        ranked: list[list[int]] = []
        pixel_set = None
        bar = _progress(task.name, len(data))
        for batch, pixel_set in self.pixel_cache.batches(data, preprocessing, self.batch_size):
            embeds = self._encode(model, batch, pixel_set.lookup)
            ranked.extend(head.logits(embeds).topk(top_k, dim=-1).indices.cpu().tolist())
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        assert pixel_set is not None  # a task has at least one decodable image, or the cache raised
        labels = [data.labels[i] for i in pixel_set.kept]
        return ranked, labels, len(pixel_set.undecodable)

    def _encode(self, model: Any, batch: Any, lookup: Any) -> torch.Tensor:
        """Image embeddings of one stored batch: copied to the device (pinned, non-blocking on CUDA)."""
        tensor = torch.from_numpy(batch if batch.flags.writeable else np.array(batch))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        else:
            tensor = tensor.to(self.device)
        pixels = lookup(tensor) if lookup is not None else tensor
        return self._forward(model, pixels.to(model.dtype))

    def _forward(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        size = self._fits or len(pixels)
        if len(pixels) > size:
            return torch.cat([self._forward(model, part) for part in pixels.split(size)])
        try:
            return model.get_image_features(pixel_values=pixels).pooler_output
        except torch.cuda.OutOfMemoryError:
            if len(pixels) == 1:
                raise EvaluationError("out of GPU memory with one image per batch; evaluate on a larger GPU or the CPU") from None
            torch.cuda.empty_cache()
            if self._fits is None:
                logger.warning("Out of GPU memory at batch size %d: continuing with batches of %d",
                               len(pixels), (len(pixels) + 1) // 2)
            self._fits = (len(pixels) + 1) // 2
            return self._forward(model, pixels)


def _progress(name: str, total: int) -> Any:
    if not inner_bar_allowed():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="img", leave=False)


def evaluate_model(
    model: str | Path | Any,
    tasks: Sequence[str | Task],
    limit: int | None = None,
    processor: Any = None,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    token: str | bool | None = None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate one model (folder, ``repo_id[@revision]`` or ``CLIPModel``) on ``tasks``.

    Returns ``{task name: metrics}``; see :meth:`Evaluator.evaluate_task` for the keys. ``options``
    are :class:`Evaluator`'s (``dtype``, ``fast_preprocessing``, ``workers``).
    """
    if not tasks:
        raise EvaluationError("no tasks to evaluate; pass at least one task name")
    evaluator = Evaluator(tasks, limit=limit, batch_size=batch_size, device=device, token=token, **options)
    return evaluator.evaluate(model, processor)


def evaluate_models(
    models: Sequence[str | Path], tasks: Sequence[str | Task], limit: int | None = None, *, base: Any = None,
    **options: Any,
) -> list[dict[str, dict[str, Any]]]:
    """Evaluate several models on the same ``tasks``, preprocessing each task's images once for all.

    ``base`` completes tower-only checkpoints among ``models``. Returns one ``{task name: metrics}``
    per model, in order; ``options`` are :class:`Evaluator`'s.
    """
    if not tasks:
        raise EvaluationError("no tasks to evaluate; pass at least one task name")
    if not models:
        raise EvaluationError("no models to evaluate; pass at least one folder or repo id")
    evaluator = Evaluator(tasks, limit=limit, **options)
    results = []
    for model in models:
        logger.info("Evaluating %s", model)
        results.append(evaluator.evaluate(model, base=base))
    return results


def _processor_beside(model: Any) -> Any:
    """The processor saved with a model loaded from a local folder; models built in memory need one passed."""
    folder = Path(getattr(model, "name_or_path", "") or "")
    if str(folder) and folder.is_dir() and (folder / "preprocessor_config.json").is_file():
        from transformers import CLIPProcessor

        return CLIPProcessor.from_pretrained(folder)
    raise EvaluationError("evaluating a CLIPModel object needs its processor: pass processor=CLIPProcessor(...)")


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)
