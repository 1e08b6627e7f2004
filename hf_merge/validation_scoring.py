"""What ``--tune`` scores a candidate merge by: accuracy on the validation data of the tasks merged so far.

:func:`tuner_for` checks, before anything is downloaded, that the recipe can be tuned (a method that
declares a tune grid, evaluation tasks, a validation split for each: the task's registered
``<task>/val``, or for a Hub dataset the held-out 10 % of its train split that FusionBench's
validation configs use; see :func:`hf_merge.evaluation.validation_task`), and builds the engine's
:class:`~hf_merge.merging.tuning.StepTuner` around a :class:`ValidationScorer`. Test splits are never
used to choose anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_merge.errors import EvaluationError, RecipeError
from hf_merge.merging.methods import get_method
from hf_merge.merging.tuning import StepTuner, tuned_parameter
from hf_merge.recipe import MergeRecipe


class ValidationScorer:
    """Scores a candidate merge after step t: its mean accuracy on the validation tasks of experts 1..t.

    One resident model (the base's, read once) takes each candidate's merged tensors in place, and
    the evaluator's pixel cache serves every later candidate and step, so a candidate costs one
    forward pass over the validation images and nothing else.

    Args:
        base: The base model (folder or ``REPO[@REV]``): the tensors outside the merge are its.
        tasks: Validation task names. ``per_expert``: one per expert in merge order, and step t is
            scored on the first t; otherwise every step is scored on all of them.
        limit, dtype, fast_preprocessing: As in the recipe's ``eval`` section.
    """

    def __init__(self, base: str, tasks: Sequence[str], *, per_expert: bool, limit: int | None = None,
                 dtype: str = "float32", fast_preprocessing: bool = False, token: str | None = None):
        from hf_merge.evaluation import Evaluator

        self.base, self.tasks, self.per_expert = base, list(tasks), per_expert
        self.evaluator = Evaluator(list(dict.fromkeys(self.tasks)), limit=limit, token=token, dtype=dtype,
                                   fast_preprocessing=fast_preprocessing)
        self._resident: tuple[Any, Any] | None = None

    def __call__(self, step: int, weights: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        from hf_merge.evaluation.continual import load_weights

        if self._resident is None:
            self._resident = self.evaluator.prepare(self.base)
        model, processor = self._resident
        if not load_weights(model, weights):
            raise EvaluationError(f"the merged tensors do not fit the model of {self.base}; --tune cannot score them")
        scored = self.tasks[:step] if self.per_expert else self.tasks
        names = list(dict.fromkeys(scored))
        results = self.evaluator.evaluate(model, processor, tasks=names)
        accuracy = {name: float(results[name]["accuracy"]) for name in names}
        return sum(accuracy[name] for name in scored) / len(scored), accuracy


def tuner_for(recipe: MergeRecipe, tasks: Sequence[str], experts: int, *, base: str,
              token: str | None = None) -> StepTuner | None:
    """The engine's tuner for ``recipe`` (``None`` unless ``recipe.tune``); ``tasks`` are the
    evaluation tasks, one per expert when there are ``experts`` of them.

    Raises:
        UsageError: The method has nothing to tune.
        RecipeError: No evaluation tasks, or a task without validation data (the message names it).
    """
    if not recipe.tune:
        return None
    tuned_parameter(get_method(recipe.method))
    if recipe.eval is None or not tasks:
        raise RecipeError("--tune scores each candidate on the validation data of the evaluation tasks: "
                          "name them with --eval TASK ... (one per expert, in merge order)")
    from hf_merge.evaluation import validation_task

    names = []
    for task in tasks:
        try:
            names.append(validation_task(task).name)
        except EvaluationError as error:
            raise RecipeError(f"--tune: {error}") from None
    scorer = ValidationScorer(base, names, per_expert=len(names) == experts, limit=recipe.eval.limit,
                              dtype=recipe.eval.dtype, fast_preprocessing=recipe.eval.fast_preprocessing, token=token)
    return StepTuner(scorer)
