"""``--tune``: a method's hyperparameter chosen on data at every step, not guessed.

At step t the engine merges expert t once per candidate value of the method's tuned parameter (its
declaration's ``tune_grid``), each time from the same state after step t−1, and asks a
:data:`Scorer` (the validation accuracy on the tasks of experts 1..t, built by
:mod:`hf_merge.validation_scoring`) to score each candidate merge. The best candidate is kept (ties:
the first in the grid), its value becomes the method's hyperparameter from then on, and the step's
:class:`TuningRecord` (grid, scores, choice) goes into ``merge_state.json``. An all-at-once method is
tuned the same way once, over its single merge of every expert.

The method object stays the same (the engine's writer holds its ``output``): candidates are tried by
restoring its state in place, which is exactly what a resume restores (``state_dict()`` plus the
buffer), so a tuned step equals a plain step run with the chosen value. Memory: a copy of the buffer
before the step, besides the candidate being scored. A parameter that only scales the output
(a :class:`~hf_merge.merging.methods.scaled_output.ScaledOutputMethod`'s: Iso-C's and TSV-M's ``scaling_factor``) needs neither: the step is
merged once and every value is scored from the same merged task vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hf_merge.errors import UsageError
from hf_merge.io.checkpoint import Checkpoint
from hf_merge.io.merge_folder import MergeState
from hf_merge.log import get_logger
from hf_merge.merging.methods.base import AllAtOnceMethod, MergeMethod, Parameter
from hf_merge.merging.methods.scaled_output import ScaledOutputMethod

logger = get_logger(__name__)

#: ``scorer(step, weights)``: ``(score, details)``, the candidate merge's score (higher is better; the
#: mean validation accuracy) and what to record beside it (accuracy per task). ``weights`` maps every
#: merged tensor name to the candidate's tensor (the method's own: read, never write).
Scorer = Callable[[int, Mapping[str, torch.Tensor]], tuple[float, dict[str, float]]]


@dataclass
class TuningRecord:
    """One tuned step, as ``merge_state.json`` and the card show it.

    Attributes:
        step: The step (experts merged) the choice was made at.
        parameter: The tuned hyperparameter.
        grid: The candidate values, in the order tried.
        scores: The score of each candidate (mean validation accuracy, 0-1).
        per_task: Each candidate's accuracy per validation task.
        chosen: The value kept.
    """

    step: int
    parameter: str
    grid: list[float]
    scores: list[float]
    chosen: float
    per_task: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def read(cls, data: Any) -> TuningRecord | None:
        """The record ``data`` holds, or ``None`` when it is not one: ``merge_state.json`` may come
        from another repo, and any JSON value may stand where a record is expected."""
        if not isinstance(data, Mapping):
            return None
        step, parameter, chosen = data.get("step"), data.get("parameter"), data.get("chosen")
        grid, scores, per_task = data.get("grid"), data.get("scores"), data.get("per_task") or []
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(parameter, str):
            return None
        if not isinstance(chosen, (int, float)) or not _is_number(chosen):
            return None
        if not isinstance(grid, list) or not isinstance(scores, list) or not grid or len(grid) != len(scores):
            return None
        if not all(_is_number(v) for v in [*grid, *scores]) or chosen not in grid:
            return None
        if not isinstance(per_task, list) or (per_task and len(per_task) != len(grid)):
            return None
        if not all(isinstance(d, Mapping) and all(isinstance(k, str) and _is_number(v) for k, v in d.items()) for d in per_task):
            return None
        return cls(step, parameter, [float(v) for v in grid], [float(v) for v in scores], float(chosen),
                   [{k: float(v) for k, v in d.items()} for d in per_task])

    def kept_scores(self) -> dict[str, float] | None:
        """The validation accuracy per task of the value kept (``None``: not recorded)."""
        return dict(self.per_task[self.grid.index(self.chosen)]) if self.per_task else None


def tuning_records(value: Any) -> list[TuningRecord]:
    """The well-formed records of a saved ``tuning`` list (anything else is left out)."""
    records = (TuningRecord.read(item) for item in (value if isinstance(value, list) else []))
    return [record for record in records if record is not None]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def tuned_parameter(method: type[MergeMethod]) -> Parameter:
    """The parameter ``--tune`` chooses for ``method``: the first one declaring a ``tune_grid``;
    :class:`UsageError` (one line) for a method without one."""
    for parameter in method.parameters:
        if parameter.tune_grid:
            return parameter
    tunable = ", ".join(sorted(_tunable_methods())) or "none"
    raise UsageError(f"method '{method.name}' has no hyperparameter to tune; drop --tune or use one of: {tunable}")


def _tunable_methods() -> list[str]:
    from hf_merge.merging.methods import available_methods, get_method

    return [name for name in available_methods() if any(p.tune_grid for p in get_method(name).parameters)]


def best_index(scores: Sequence[float]) -> int:
    """The first of the highest scores (a tie keeps the earlier grid value)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


class StepTuner:
    """Runs a step once per candidate value and keeps the best (see the module docstring).

    Args:
        scorer: Scores a candidate merge (see :data:`Scorer`).
        grid: The candidates; default: the tuned parameter's declared ``tune_grid``.
    """

    def __init__(self, scorer: Scorer, grid: Sequence[float] | None = None):
        self.scorer = scorer
        self.grid = list(grid) if grid is not None else None
        self.records: list[TuningRecord] = []

    def candidates(self, method: MergeMethod) -> tuple[Parameter, list[Any]]:
        """The tuned parameter of ``method`` and its candidate values, each checked against the declaration."""
        parameter = tuned_parameter(type(method))
        grid = self.grid if self.grid is not None else list(parameter.tune_grid)
        if not grid:
            raise UsageError(f"--tune needs at least one candidate value for '{parameter.name}'")
        return parameter, [parameter.check(value, method.name) for value in grid]

    def step(self, method: MergeMethod, expert: Checkpoint, step: int) -> dict[str, float]:
        """Merge ``expert`` (step ``step``) with every candidate, leave ``method`` at the best one's
        result, and return that step's metrics. ``method.ready`` (the writer's early start) only
        sees the kept result."""
        return self._choose(method, step, lambda: plain_step(method, expert))

    def merge_all(self, method: AllAtOnceMethod, run: Callable[[], dict[str, float]], count: int) -> dict[str, float]:
        """The all-at-once form: ``run()`` merges every expert into ``method``; tuned as one step."""
        return self._choose(method, count, run)

    def _choose(self, method: MergeMethod, step: int, run: Callable[[], dict[str, float]]) -> dict[str, float]:
        parameter, grid = self.candidates(method)
        ready, method.ready = method.ready, None  # no candidate reaches the output files
        try:
            if isinstance(method, ScaledOutputMethod) and parameter.name == method.scaled_output:
                metrics, scores, details = self._score_scales(method, step, run, parameter.name, grid)
            else:
                metrics, scores, details = self._score_states(method, step, run, parameter.name, grid)
        finally:
            method.ready = ready
        return self._keep(method, step, parameter.name, grid, scores, details, metrics, ready)

    def _score_states(self, method: MergeMethod, step: int, run: Callable[[], dict[str, float]], parameter: str,
                      grid: list[Any]) -> tuple[dict[str, float], list[float], list[dict[str, float]]]:
        """Each value merged from the state before the step and scored; the method is left at the best's result."""
        saved_state, saved = method.state_dict(), {name: tensor.clone() for name, tensor in method.buffer.items()}
        scores: list[float] = []
        details: list[dict[str, float]] = []
        metrics: dict[str, float] = {}
        for i, value in enumerate(grid):
            if i:
                _restore(method, saved_state, saved)
            _set(method, parameter, value)
            metrics = run()
            self._score(step, {name: method.output(name) for name in method.context.names}, parameter, value, scores, details)
        best = best_index(scores)
        if best != len(grid) - 1:  # the last candidate is in the buffer; the best must be merged again
            _restore(method, saved_state, saved, copy=False)
            _set(method, parameter, grid[best])
            metrics = run()
        return metrics, scores, details

    def _score_scales(self, method: ScaledOutputMethod, step: int, run: Callable[[], dict[str, float]], parameter: str,
                      grid: list[Any]) -> tuple[dict[str, float], list[float], list[dict[str, float]]]:
        """A parameter that only scales the output: one merge, every value scored from the same
        merged task vectors (an Iso-C or TSV-M step decomposes each matrix once, not once per value)."""
        metrics = run()
        names = method.context.names
        vectors = {name: method.merged_task_vector(name) for name in names}
        scores: list[float] = []
        details: list[dict[str, float]] = []
        for value in grid:
            self._score(step, {name: method.scaled(name, vectors[name], value) for name in names}, parameter, value,
                        scores, details)
        return metrics, scores, details

    def _score(self, step: int, weights: Mapping[str, torch.Tensor], parameter: str, value: Any, scores: list[float],
               details: list[dict[str, float]]) -> None:
        """Score one candidate (``parameter`` = ``value``) and note the result."""
        score, per_task = self.scorer(step, weights)
        scores.append(float(score))
        details.append(dict(per_task))
        logger.info("tune step %d: %s=%g -> %.4f", step, parameter, value, score)

    def _keep(self, method: MergeMethod, step: int, parameter: str, grid: list[Any], scores: list[float],
              details: list[dict[str, float]], metrics: dict[str, float], ready: Callable[[str], None] | None) -> dict[str, float]:
        best = best_index(scores)
        _set(method, parameter, grid[best])
        if ready is not None:
            for name in method.context.names:
                ready(name)
        self.records.append(TuningRecord(step, parameter, [float(v) for v in grid], scores, float(grid[best]), details))
        logger.info("tune step %d: kept %s=%g (validation %.4f)", step, parameter, grid[best], scores[best])
        return {**metrics, f"tuned_{parameter}": float(grid[best])}


def plain_step(method: MergeMethod, expert: Checkpoint) -> dict[str, float]:
    """One untuned continual step: ``step`` then ``finalize``; the step's metrics."""
    metrics = method.step(expert)
    method.finalize()
    return metrics


def record_tuning(state: MergeState, tuner: StepTuner | None, method: MergeMethod) -> None:
    """Move ``tuner``'s new records into ``state.tuning``, and the value kept into the state's
    hyperparameters (a resumed merge goes on with it)."""
    if tuner is None or not tuner.records:
        return
    state.tuning = [*(state.tuning or []), *(record.to_dict() for record in tuner.records)]
    tuner.records.clear()
    state.hyperparameters = dict(method.hyperparameters)


def _set(method: MergeMethod, name: str, value: Any) -> None:
    method.hyperparameters = method.check_parameters({**method.hyperparameters, name: value})
    method.validate()


def _restore(method: MergeMethod, state: dict[str, Any], buffer: Mapping[str, torch.Tensor], *, copy: bool = True) -> None:
    """Put ``method`` back to the saved state, in place (a fresh copy of the saved buffer unless
    this is its last use)."""
    if isinstance(method, AllAtOnceMethod):
        method.buffer = {}
        method.step_count = int(state["step"])
        return
    method.buffer = {}
    method.load_state_dict(state, {name: tensor.clone() if copy else tensor for name, tensor in buffer.items()})
