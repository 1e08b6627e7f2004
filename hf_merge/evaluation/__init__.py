"""Zero-shot classification evaluation of CLIP models, before, during and after a merge.

- :mod:`.tasks`: :class:`Task` / :class:`DatasetSpec` and the registry (``get_task``,
  ``register_task``, ``list_tasks``) with the 20 tasks of the published experiments.
- :mod:`.datasets`: a task's dataset as checked, lazily decoded images and labels.
- :mod:`.preprocessing`: the pinned image processor (PIL by default) and its exact uint8-to-float lookup.
- :mod:`.preprocess_cache`: :class:`PixelCache`, each task's images preprocessed once, in parallel.
- :mod:`.pixel_disk`: the pixel cache's sets on disk, bounded by ``$HF_MERGE_EVAL_CACHE_MAX_GB``
  (least recently used evicted first); :func:`clear_pixel_cache`.
- :mod:`.heads`: zero-shot heads from the text tower, cached while the text tower is unchanged.
- :mod:`.metric`: :class:`ZeroShotAccuracy`, an ``evaluate`` metric (accuracy, top-5, per class).
- :mod:`.runner`: :class:`Evaluator` and :func:`evaluate_model` (``hf-merge eval``).
- :mod:`.validation`: :func:`validation_task`, the task scored on a task's validation data (for tuning).
- :mod:`.continual`: :class:`ContinualEvaluator` (the merge engine's ``on_step`` callback) and
  :class:`EvaluationReport`, saved as ``eval_results.json``.
"""

from hf_merge.evaluation.continual import RESULTS_FILENAME, ContinualEvaluator, EvaluationReport
from hf_merge.evaluation.datasets import TaskData, load_task_data
from hf_merge.evaluation.heads import HeadCache, ZeroShotHead, build_head, text_tower_fingerprint
from hf_merge.evaluation.metric import ZeroShotAccuracy
from hf_merge.evaluation.paper_tasks import PAPER_TASKS_8, PAPER_TASKS_14, PAPER_TASKS_20
from hf_merge.evaluation.pixel_disk import clear_pixel_cache
from hf_merge.evaluation.preprocess_cache import PixelCache, PixelSet
from hf_merge.evaluation.preprocessing import Preprocessing, pin_image_processor
from hf_merge.evaluation.runner import Evaluator, evaluate_model, evaluate_models, load_clip
from hf_merge.evaluation.tasks import DatasetSpec, Task, get_task, list_tasks, register_task
from hf_merge.evaluation.validation import validation_task

__all__ = [
    "PAPER_TASKS_8",
    "PAPER_TASKS_14",
    "PAPER_TASKS_20",
    "RESULTS_FILENAME",
    "ContinualEvaluator",
    "DatasetSpec",
    "EvaluationReport",
    "Evaluator",
    "HeadCache",
    "PixelCache",
    "PixelSet",
    "Preprocessing",
    "Task",
    "TaskData",
    "ZeroShotAccuracy",
    "ZeroShotHead",
    "build_head",
    "clear_pixel_cache",
    "evaluate_model",
    "evaluate_models",
    "get_task",
    "list_tasks",
    "load_clip",
    "load_task_data",
    "pin_image_processor",
    "register_task",
    "text_tower_fingerprint",
    "validation_task",
]
