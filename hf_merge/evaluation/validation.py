"""The validation task of an evaluation task: what hyperparameter tuning scores on, never the test split.

:func:`validation_task` maps a task to the task scored on its validation data:

1. A registered ``<name>/val`` task (the offline zoo registers ``offline/mnist`` and
   ``offline/mnist/val``) is that validation task; a task that already is a validation task (its
   name ends in ``/val`` or its dataset is a holdout) is returned unchanged.
2. A Hub dataset task gets FusionBench's validation split: a seeded random 10 % of the dataset's
   *train* split (see :func:`holdout_indices`), as a task named ``<name>/val``.
3. Any other task has no validation data, and asking for it is an
   :class:`~hf_merge.errors.EvaluationError`.

FusionBench reference (github.com/tanganke/fusion_bench): the validation configs of the 8 paper
tasks, e.g. ``config/dataset/image_classification/val/sun397.yaml`` lines 1-10, call
``fusion_bench.utils.data.train_validation_split`` on ``load_dataset(path, split="train")`` with
``validation_fraction: 0.1``, ``random_seed: 0`` and ``return_split: val``.
"""

from __future__ import annotations

from hf_merge.errors import EvaluationError
from hf_merge.evaluation.tasks import VALIDATION_SUFFIX, Task, get_task, held_out_validation_task, registered_task


def holdout_indices(total: int, fraction: float, seed: int) -> list[int]:
    """Indices, in order, of the examples that FusionBench's ``train_validation_split`` returns as
    its validation part of a dataset of ``total`` examples.

    Reference: ``fusion_bench/utils/data.py`` (github.com/tanganke/fusion_bench), lines 163-220:
    ``num_validation_samples = int(num_samples * validation_fraction)`` (line 197), the rest are
    training samples, and ``torch.utils.data.random_split(dataset, [n_train, n_val],
    generator=torch.Generator().manual_seed(random_seed))`` (line 210) whose second part is returned
    (line 220). ``random_split`` takes ``torch.randperm(total, generator=...)`` and gives its
    consecutive slices to the parts, so the validation part is ``randperm(...)[n_train:]``.
    """
    import torch

    if not 0 < fraction < 1:
        raise EvaluationError(f"holdout fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    # int(total * fraction), not round(): the float product is FusionBench's, bit for bit.
    held_out = int(total * fraction)
    permutation = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return permutation[total - held_out:]


def is_validation_task(task: Task) -> bool:
    """Whether ``task`` already scores on validation data (a ``/val`` name or a holdout dataset)."""
    if task.name.strip().lower().endswith(VALIDATION_SUFFIX):
        return True
    return task.dataset is not None and task.dataset.holdout_fraction is not None


def validation_task(task: str | Task) -> Task:
    """The task scored on ``task``'s validation data; EvaluationError (one line naming the task and
    what to do) when it has none. See the module docstring for the rules, in order."""
    resolved = get_task(task)
    if is_validation_task(resolved):
        return resolved
    registered = registered_task(resolved.name + VALIDATION_SUFFIX)
    if registered is not None:
        return registered
    spec = resolved.dataset
    name = resolved.name
    if spec is not None and spec.kind == "hub":
        return held_out_validation_task(resolved)
    raise EvaluationError(
        f"task {name} has no validation split: register a '{name}{VALIDATION_SUFFIX}' task "
        "(hf_merge.evaluation.register_task) or evaluate a Hub dataset task; --tune never scores on test data"
    )
