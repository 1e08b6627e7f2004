"""Continual evaluation: after merge step t, accuracy on the tasks of experts 1..t.

:class:`ContinualEvaluator` is the engine's ``on_step(step, output_dir, state)`` callback. Step
``t`` (1-based: ``t`` experts merged) evaluates the merged model (read from ``output_dir`` once, then
updated in place with the merged tensors the engine passes as ``weights``)
on the tasks of experts 1..t, giving row ``t`` of the accuracy matrix. It can also evaluate the
base model (zero-shot reference) and each expert on its own task (fine-tuned reference). After
every step the :class:`EvaluationReport` is written to ``<output_dir>/eval_results.json``.

``eval_results.json`` schema (version 1); the model card and the Space read it:

```
{
  "schema_version": 1,
  "metric": "zero-shot top-1 accuracy",          # what the numbers in the matrix are
  "limit": null | int,                            # examples kept per task (null: whole split)
  "preprocessing": "CLIPImageProcessorPil (PIL, as the reference)",  # image processor used (optional)
  "eval_dtype": "float32",                        # dtype of the forward pass (optional; float32)
  "tasks": ["sun397", "stanford-cars", ...],      # tasks[i] = task of expert i+1, merge order
  "experts": ["org/expert-a", ...] | null,        # names of the experts, same order (optional)
  "accuracy_matrix": [[a11, null, ...],           # accuracy_matrix[t-1][i-1] = accuracy after
                      [a21, a22, null], ...],     #   step t on task i; null for i > t (square T x T)
  "average_accuracy_per_step": [..],              # mean of row t over tasks 1..t, per step
  "average_accuracy": float | null,               # mean of the last row (the final model)
  "bwt": float | null,                            # mean over i < T of (acc[T,i] - acc[i,i]);
                                                  #   null while T < 2
  "base_accuracy": [float | null, ...] | null,    # zero-shot accuracy of the base on tasks[i]
  "expert_accuracy": [float | null, ...] | null,  # accuracy of expert i on its own task tasks[i]
  "steps": [                                      # full metrics per step
    {"step": 1, "results": {"sun397": {"accuracy": .., "top5_accuracy": .., "num_samples": ..,
                                       "num_classes": .., "dataset": "..",
                                       "undecodable": 0}}}, ...]   # images skipped: not decodable
}
```
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_merge.errors import EvaluationError
from hf_merge.evaluation.runner import Evaluator
from hf_merge.evaluation.tasks import Task, get_task
from hf_merge.io.merge_folder import RESULTS_FILENAME, MergeFolder
from hf_merge.log import get_logger

logger = get_logger(__name__)

SCHEMA_VERSION = 1
# Per-class lists are left out of the saved steps: they are large and the card does not use them.
_SAVED_KEYS = ("accuracy", "top5_accuracy", "num_samples", "num_classes", "dataset", "undecodable")


def backward_transfer(pairs: Sequence[tuple[float, float]]) -> float | None:
    """BWT, the one definition: the mean of (final accuracy - accuracy right after the task was
    merged) over the ``(when merged, final)`` pairs of the earlier tasks; ``None`` without any."""
    return sum(final - first for first, final in pairs) / len(pairs) if pairs else None


@dataclass
class EvaluationReport:
    """The accuracy matrix of a continual merge and its summary numbers (see the module docstring).

    ``rows[t-1]`` holds the accuracies after step ``t`` on tasks 1..t (ragged, lower-triangular);
    :meth:`accuracy_matrix` pads it to a square matrix.
    """

    tasks: list[str] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    base_accuracy: list[float | None] | None = None
    expert_accuracy: list[float | None] | None = None
    experts: list[str] | None = None
    limit: int | None = None
    metric: str = "zero-shot top-1 accuracy"
    preprocessing: str | None = None
    eval_dtype: str = "float32"

    @property
    def num_steps(self) -> int:
        """Number of merge steps evaluated."""
        return len(self.rows)

    def accuracy_matrix(self) -> list[list[float | None]]:
        """Square ``T x T`` matrix: entry ``[t-1][i-1]`` is the accuracy after step t on task i."""
        size = self.num_steps
        return [list(row) + [None] * (size - len(row)) for row in self.rows]

    def average_accuracy_per_step(self) -> list[float]:
        """Mean accuracy over tasks 1..t after each step t."""
        return [sum(row) / len(row) for row in self.rows]

    @property
    def average_accuracy(self) -> float | None:
        """Mean accuracy of the final model over every task merged so far."""
        return self.average_accuracy_per_step()[-1] if self.rows else None

    @property
    def bwt(self) -> float | None:
        """Backward transfer: mean over i < T of (acc[T, i] - acc[i, i]); ``None`` while T < 2."""
        return backward_transfer([(self.rows[i][i], self.rows[-1][i]) for i in range(self.num_steps - 1)])

    def add_step(self, step: int, results: dict[str, dict[str, Any]], tasks: Sequence[str]) -> None:
        """Record the results of step ``step`` (1-based) on ``tasks`` (the tasks of experts 1..step)."""
        if step != self.num_steps + 1:
            raise EvaluationError(f"evaluation of step {step} out of order: {self.num_steps} steps recorded")
        self.tasks = list(tasks)
        self.rows.append([float(results[name]["accuracy"]) for name in tasks])
        saved = {name: {k: v for k, v in metrics.items() if k in _SAVED_KEYS} for name, metrics in results.items()}
        self.steps.append({"step": step, "results": saved})

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the module docstring."""
        return {
            "schema_version": SCHEMA_VERSION,
            "metric": self.metric,
            "limit": self.limit,
            "preprocessing": self.preprocessing,
            "eval_dtype": self.eval_dtype,
            "tasks": list(self.tasks),
            "experts": self.experts,
            "accuracy_matrix": self.accuracy_matrix(),
            "average_accuracy_per_step": self.average_accuracy_per_step(),
            "average_accuracy": self.average_accuracy,
            "bwt": self.bwt,
            "base_accuracy": self.base_accuracy,
            "expert_accuracy": self.expert_accuracy,
            "steps": self.steps,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise; with ``path`` (a file, or a folder that gets ``eval_results.json``) also write it atomically."""
        text = json.dumps(_finite(self.to_dict()), indent=2, ensure_ascii=False) + "\n"
        if path is not None:
            target = Path(path)
            if target.is_dir():
                target = target / RESULTS_FILENAME
            _atomic_write(target, text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`to_dict`."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise EvaluationError(f"evaluation results have schema version {version}; expected {SCHEMA_VERSION}")
        matrix = data.get("accuracy_matrix") or []
        return cls(
            tasks=list(data.get("tasks") or []),
            rows=[[float(v) for v in row[: t + 1]] for t, row in enumerate(matrix)],
            steps=list(data.get("steps") or []),
            base_accuracy=data.get("base_accuracy"),
            expert_accuracy=data.get("expert_accuracy"),
            experts=data.get("experts"),
            limit=data.get("limit"),
            metric=data.get("metric", "zero-shot top-1 accuracy"),
            preprocessing=data.get("preprocessing"),
            eval_dtype=data.get("eval_dtype") or "float32",
        )

    @classmethod
    def from_json(cls, source: str | Path) -> EvaluationReport:
        """Read a report from a JSON string, a file, or a folder holding ``eval_results.json``."""
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            path = Path(source)
            if path.is_dir():
                path = path / RESULTS_FILENAME
            try:
                source = path.read_text(encoding="utf-8")
            except OSError as error:
                raise EvaluationError(f"cannot read evaluation results {path}: {error.strerror}") from error
        try:
            return cls.from_dict(json.loads(source))
        except (json.JSONDecodeError, TypeError, ValueError, IndexError) as error:
            raise EvaluationError(
                f"evaluation results are not valid JSON of schema {SCHEMA_VERSION}: {error}"
            ) from error


class ContinualEvaluator:
    """The engine's ``on_step`` callback that fills an :class:`EvaluationReport`.

    Args:
        tasks: ``tasks[i]`` is the task of the ``i``-th expert merged (name or :class:`Task`).
        base: Optional base model (folder / repo id / ``(CLIPModel, processor)``); its zero-shot
            accuracy on every task is the lower reference.
        experts: Optional expert models in merge order; expert ``i`` is evaluated on ``tasks[i]``
            at step ``i + 1`` (the upper reference).
        limit: Examples kept per task (``None``: the whole split).
        evaluator: Share an :class:`Evaluator` (and its head cache); built from the other
            arguments when omitted.
        report: Continue an earlier report (e.g. read back with :meth:`EvaluationReport.from_json`).
        expert_names: Names recorded in the report's ``experts`` field.
    """

    def __init__(
        self,
        tasks: Sequence[str | Task],
        *,
        base: Any = None,
        experts: Sequence[Any] | None = None,
        limit: int | None = None,
        batch_size: int | None = None,
        device: Any = None,
        evaluator: Evaluator | None = None,
        report: EvaluationReport | None = None,
        expert_names: Sequence[str] | None = None,
    ):
        self._resident: tuple[Any, Any, Path] | None = None  # (model, processor, folder) of the last step
        self.tasks = [get_task(t) for t in tasks]
        if experts is not None and len(experts) > len(self.tasks):
            raise EvaluationError(f"{len(experts)} experts but only {len(self.tasks)} tasks: give one task per expert")
        self.evaluator = evaluator or Evaluator(self.tasks, limit=limit, batch_size=batch_size, device=device)
        self.base = base
        self.experts = list(experts) if experts is not None else None
        self.report = report or EvaluationReport(limit=self.evaluator.limit)
        if expert_names is not None:
            self.report.experts = list(expert_names)
        if self.report.base_accuracy is None and base is not None:
            self.report.base_accuracy = [None] * len(self.tasks)
        if self.report.expert_accuracy is None and experts is not None:
            self.report.expert_accuracy = [None] * len(self.tasks)
        # A continued report covers the earlier experts only: room for the new ones.
        for name in ("base_accuracy", "expert_accuracy"):
            values = getattr(self.report, name)
            if values is not None and len(values) < len(self.tasks):
                setattr(self.report, name, values + [None] * (len(self.tasks) - len(values)))

    @classmethod
    def resume(cls, output_dir: str | Path, tasks: Sequence[str | Task], **options: Any) -> ContinualEvaluator:
        """Continue the report saved in ``output_dir`` (if any), e.g. when more experts are added later.

        ``tasks`` lists the tasks of every expert, the earlier ones included.
        """
        folder = MergeFolder(output_dir)
        report = EvaluationReport.from_json(folder.path / RESULTS_FILENAME) if folder.has_results() else None
        if report is not None and report.tasks != [get_task(t).name for t in tasks][: len(report.tasks)]:
            raise EvaluationError(
                f"{folder.path / RESULTS_FILENAME}: the saved results are for tasks {report.tasks}, which do not start the given task list"
            )
        return cls(tasks, report=report, **options)

    # The engine passes the merged tensors it holds (``weights=``) to callbacks that say they take them.
    receives_weights = True

    def __call__(
        self, step: int, output_dir: str | Path, state: Any = None, weights: Mapping[str, torch.Tensor] | None = None
    ) -> EvaluationReport:
        """Evaluate the model saved in ``output_dir`` after step ``step`` and save the report there.

        With ``weights`` (the merged tensors by name, as the engine holds them) the model of the
        previous step is updated in place instead of being read again from ``output_dir``.
        """
        if step < 1 or step > len(self.tasks):
            raise EvaluationError(f"step {step} has no task: {len(self.tasks)} tasks were given, one per expert")
        current = self.tasks[:step]
        if self.base is not None and self.report.base_accuracy is not None:
            self._reference("base", self.report.base_accuracy, self.base, range(len(self.tasks)))
        if self.experts is not None and self.report.expert_accuracy is not None and step <= len(self.experts):
            self._reference("expert", self.report.expert_accuracy, self.experts[step - 1], [step - 1])
        # One task can be the task of several experts: evaluate it once.
        model, processor = self._merged(Path(output_dir), weights)
        results = self.evaluator.evaluate(model, processor, tasks=list({t.name: t for t in current}.values()))
        self.report.add_step(step, results, [t.name for t in current])
        self._describe_evaluation()
        MergeFolder(output_dir).write_results_text(self.report.to_json())
        logger.info(
            "Step %d: average accuracy %.4f over %d tasks%s", step, self.report.average_accuracy, step,
            f", BWT {self.report.bwt:+.4f}" if self.report.bwt is not None else "",
        )
        return self.report

    def _merged(self, output_dir: Path, weights: Mapping[str, torch.Tensor] | None) -> tuple[Any, Any]:
        """The merged model: the resident one updated with ``weights``, else read from ``output_dir``."""
        if self._resident is not None and weights is not None and self._resident[2] == output_dir:
            model, processor, _ = self._resident
            if load_weights(model, weights):
                return model, processor
        model, processor = self.evaluator.prepare(str(output_dir))
        self._resident = (model, processor, output_dir)
        return model, processor

    def _describe_evaluation(self) -> None:
        if self.evaluator.preprocessing is not None:
            self.report.preprocessing = self.evaluator.preprocessing.label
        self.report.eval_dtype = self.evaluator.dtype_name

    def _reference(self, kind: str, values: list[float | None], model: Any, indices: Any) -> None:
        missing = [i for i in indices if values[i] is None]
        if not missing:
            return
        # Several positions can share one task: evaluate each task once.
        names = list(dict.fromkeys(self.tasks[i].name for i in missing))
        logger.info("Evaluating the %s model on %s", kind, ", ".join(names))
        processor = None
        if isinstance(model, tuple):
            model, processor = model
        by_name = {t.name: t for t in self.tasks}
        # A tower-only expert (CLIPVisionModel) is evaluated inside the base, as its card says to use it.
        base = self.base if kind == "expert" else None
        results = self.evaluator.evaluate(model, processor, tasks=[by_name[n] for n in names], base=base)
        for i in missing:
            values[i] = float(results[self.tasks[i].name]["accuracy"])
        self._describe_evaluation()


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> bool:
    """Copy ``weights`` (tensor name to tensor) into ``model`` in place; ``False``, and nothing copied,
    when a name or shape is not the model's."""
    own = model.state_dict()  # shares storage with the parameters
    if any(name not in own or own[name].shape != tensor.shape for name, tensor in weights.items()):
        return False
    with torch.no_grad():
        for name, tensor in weights.items():
            own[name].copy_(tensor)
    return True


def _finite(value: Any) -> Any:
    """Replace NaN/inf by None so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

