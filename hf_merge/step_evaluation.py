"""Evaluation between merge steps: the engine's ``on_step`` callbacks that :mod:`hf_merge.api` builds.

With ``eval.every_step`` the merged model is scored on the tasks of experts 1..t after step t (and
the references beside it: the base's zero-shot accuracy, each expert's own); otherwise only the final
model is scored. A continued merge (``hf-merge add``) extends the saved per-step report row by row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hf_merge.errors import RecipeError
from hf_merge.io.merge_folder import MergeFolder
from hf_merge.log import get_logger
from hf_merge.publish.accuracy_table import load_accuracy
from hf_merge.recipe import EvalSpec, MergeRecipe

logger = get_logger(__name__)


def evaluation_hook(
    spec: EvalSpec | None, tasks: Sequence[str], experts: Sequence[str], *, done: int, output_dir: Path | None = None,
    base: str | None = None, token: str | None = None,
) -> Callable | None:
    """The callback ``(step, output_dir, state)`` that evaluates the merged model, or ``None`` without
    evaluation: with ``every_step`` the engine's ``on_step``, otherwise called once on the final model.

    ``every_step``: after step t, accuracy on the tasks of experts 1..t (one task per expert, in merge
    order), plus the references the paper reports beside it: the base's zero-shot accuracy on every
    task and each expert's accuracy on its own task (evaluated while the expert is still cached).
    Otherwise only the final model is evaluated, on every task.
    """
    if spec is None or not tasks:
        return None
    from hf_merge.errors import EvaluationError
    from hf_merge.evaluation import ContinualEvaluator, EvaluationReport, get_task

    for task in tasks:
        try:
            get_task(task)
        except EvaluationError as error:
            raise RecipeError(str(error)) from None
    total = len(experts)
    if spec.every_step:
        from hf_merge.evaluation import Evaluator

        def continual(task_list: Sequence[str], expert_list: Sequence[str], report: Any = None) -> Any:
            evaluator = Evaluator(task_list, limit=spec.limit, token=token, dtype=spec.dtype,
                                  fast_preprocessing=spec.fast_preprocessing)
            return ContinualEvaluator(task_list, base=base, experts=list(expert_list), expert_names=list(expert_list),
                                      report=report, evaluator=evaluator)

        if done and len(tasks) == total - done:  # tasks given for the new experts only
            return _FromStep(continual(tasks, list(experts)[done:]), done)
        if len(tasks) != total:
            raise RecipeError(
                f"eval.every_step needs one task per expert, in merge order ({total} experts, {len(tasks)} tasks)"
            )
        report = None
        if done and output_dir is not None and MergeFolder(output_dir).has_results():
            report = EvaluationReport.from_json(output_dir)
            if report.num_steps != done:
                report = None  # an older or partial evaluation cannot be continued row by row
        if done and report is None:
            logger.warning("No per-step evaluation of the first %d steps to continue; evaluating from step %d on", done, done + 1)
            return _FromStep(continual(tasks[done:], list(experts)[done:]), done)
        return continual(tasks, list(experts), report)
    return _FinalEvaluation(list(tasks), spec, final_step=total, token=token)


class _FromStep:
    """Shift step numbers so an evaluator that starts fresh can follow an earlier, unevaluated part."""

    receives_weights = True  # passed on to the evaluator (see ContinualEvaluator)

    def __init__(self, evaluator: Callable, offset: int):
        self.evaluator, self.offset = evaluator, offset

    def __call__(self, step: int, output_dir: Path, state: Any = None, weights: Any = None) -> Any:
        report = self.evaluator(step - self.offset, output_dir, state, weights=weights)
        # The saved rows keep the real step numbers, so the card's table and plot line up.
        report.steps[-1]["step"] = step
        MergeFolder(output_dir).write_results_text(report.to_json())
        return report


class _FinalEvaluation:
    """Evaluate only the final model, on every task (``eval.every_step: false``)."""

    def __init__(self, tasks: list[str], spec: EvalSpec, *, final_step: int, token: str | None = None):
        self.tasks, self.spec, self.final_step, self.token = tasks, spec, final_step, token

    def __call__(self, step: int, output_dir: Path, state: Any = None) -> None:
        if step != self.final_step:
            return
        from hf_merge.evaluation import EvaluationReport, Evaluator

        unique = list(dict.fromkeys(self.tasks))
        evaluator = Evaluator(unique, limit=self.spec.limit, token=self.token, dtype=self.spec.dtype,
                              fast_preprocessing=self.spec.fast_preprocessing)
        results = evaluator.evaluate(str(output_dir), tasks=unique)
        report = EvaluationReport(limit=self.spec.limit, eval_dtype=self.spec.dtype,
                                  preprocessing=evaluator.preprocessing.label if evaluator.preprocessing else None)
        report.add_step(1, results, unique)
        report.steps[0]["step"] = step  # one row: the final model after `step` experts
        MergeFolder(output_dir).write_results_text(report.to_json())


def continued_tasks(recipe: MergeRecipe, spec: EvalSpec | None, done: int, new: int) -> tuple[list[str], EvalSpec | None]:
    """Evaluation of a continued merge: ``(tasks, eval)``, the tasks evaluated (the recipe's, plus
    those given for the new experts) and the recipe's new ``eval`` section (``None``: unchanged)."""
    if spec is None:
        if recipe.eval is None:
            return [], None
        if recipe.eval.every_step and len(recipe.eval.tasks) == done:
            logger.warning("No evaluation tasks given for the new experts (--eval TASK ...): evaluation skipped")
            return [], None
        return list(recipe.eval.tasks), None
    previous = list(recipe.eval.tasks) if recipe.eval is not None else []
    every_step = spec.every_step or (recipe.eval.every_step if recipe.eval is not None else False)
    tasks = previous + list(spec.tasks) if every_step and len(spec.tasks) == new and len(previous) == done else list(spec.tasks)
    limit = spec.limit if spec.limit is not None else (recipe.eval.limit if recipe.eval else None)
    return tasks, EvalSpec(tasks=tasks, every_step=every_step, limit=limit, dtype=spec.dtype,
                           fast_preprocessing=spec.fast_preprocessing)


def average_accuracy(output_dir: Path, n_steps: int) -> list[float | None]:

    table = load_accuracy(output_dir)
    if table is None:
        return [None] * n_steps
    by_step = dict(zip(table.steps, table.averages(), strict=False))
    return [by_step.get(step) for step in range(1, n_steps + 1)]


def final_only_unless_continual(spec: EvalSpec | None, method: Any) -> EvalSpec | None:
    """``spec`` with ``every_step`` off for an all-at-once ``method`` (a method class): there is no
    model between its steps, so only the final one is evaluated (one log line says so)."""
    if spec is None or not spec.every_step or method.continual:
        return spec
    logger.info("%s merges every expert at once, so there is no model between steps: evaluating the final model only",
                method.name)
    return spec.model_copy(update={"every_step": False})
