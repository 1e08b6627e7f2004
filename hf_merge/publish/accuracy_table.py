"""Per-step accuracy of a merge, read from ``eval_results.json``, as the card and the Space show it.

:class:`AccuracyTable` holds the accuracy after each step on the tasks seen so far, with the base's
zero-shot and each expert's own accuracy as references; :func:`plot_accuracy` draws it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_merge.evaluation.continual import backward_transfer
from hf_merge.io.merge_folder import MergeFolder
from hf_merge.log import get_logger
from hf_merge.publish.escape import markdown_text

logger = get_logger(__name__)

@dataclass
class AccuracyTable:
    """Accuracy (%) after each step on the tasks seen so far, ready for the card and the plot."""

    tasks: list[str]
    steps: list[int]
    # accuracy[s][task] in [0, 1]; a task missing from a step was not evaluated there.
    accuracy: list[dict[str, float]]
    limit: int | None = None
    datasets: dict[str, str] = field(default_factory=dict)
    reported_bwt: float | None = None
    # column label -> task name (they differ where one task is the task of several experts)
    task_of: dict[str, str] = field(default_factory=dict)
    # References the paper reports beside the merge: the base's zero-shot accuracy on each task
    # and each expert's own accuracy on its task (column label -> [0, 1]).
    base: dict[str, float] = field(default_factory=dict)
    experts: dict[str, float] = field(default_factory=dict)

    def averages(self) -> list[float]:
        return [sum(row.values()) / len(row) if row else 0.0 for row in self.accuracy]

    def final(self) -> dict[str, float]:
        return self.accuracy[-1] if self.accuracy else {}

    def bwt(self) -> float | None:
        """Backward transfer: mean over earlier tasks of (final accuracy - accuracy when first merged)."""
        if self.reported_bwt is not None:
            return self.reported_bwt
        # Tasks first evaluated at the last step have no "before": only earlier ones count.
        final, pairs = self.final(), []
        for task in self.tasks:
            first = next((i for i, row in enumerate(self.accuracy) if task in row), None)
            if first is not None and task in final and first < len(self.accuracy) - 1:
                pairs.append((self.accuracy[first][task], final[task]))
        return backward_transfer(pairs)


def load_accuracy(output_dir: str | Path | MergeFolder) -> AccuracyTable | None:
    """Per-step accuracies of a merge folder, or ``None`` when the merge was not evaluated."""
    folder = output_dir if isinstance(output_dir, MergeFolder) else MergeFolder(output_dir)
    data = folder.results_data()
    return accuracy_from_report(data) if data is not None else None


def accuracy_from_report(data: Mapping[str, Any]) -> AccuracyTable | None:
    """Normalise ``eval_results.json`` data (``EvaluationReport.to_dict``) into an :class:`AccuracyTable`.

    ``tasks[i]`` is the task of the i-th expert and ``accuracy_matrix[t-1][i]`` the accuracy after
    step t on it; a task used by several experts gets one column per expert.
    """
    tasks = [str(t) for t in data.get("tasks") or []]
    matrix = data.get("accuracy_matrix") or data.get("matrix") or []
    if not tasks or not matrix:
        return None
    labels = _column_labels(tasks)
    saved_steps = data.get("steps") or []
    steps = [int(s.get("step", i + 1)) for i, s in enumerate(saved_steps)]
    if len(steps) != len(matrix):
        steps = list(range(1, len(matrix) + 1))
    rows = [
        {labels[j]: _fraction(v) for j, v in enumerate(row) if v is not None and j < len(labels)}
        for row in matrix
    ]
    datasets: dict[str, str] = {}
    for step in saved_steps:
        for task, metrics in (step.get("results") or {}).items():
            if isinstance(metrics, Mapping) and metrics.get("dataset"):
                datasets[str(task)] = str(metrics["dataset"])
    label_datasets = {label: datasets.get(task, task) for label, task in zip(labels, tasks, strict=False)}
    table = AccuracyTable(
        tasks=labels, steps=steps, accuracy=rows, limit=data.get("limit"), datasets=label_datasets,
        task_of=dict(zip(labels, tasks, strict=False)),
    )
    if data.get("bwt") is not None:
        table.reported_bwt = float(data["bwt"])
    for name, values in (("base", data.get("base_accuracy")), ("experts", data.get("expert_accuracy"))):
        setattr(table, name, {label: _fraction(v) for label, v in zip(labels, values or [], strict=False) if v is not None})
    return table


def _column_labels(tasks: Sequence[str]) -> list[str]:
    """Task names, numbered where one task is the task of several experts."""
    counts = {t: tasks.count(t) for t in tasks}
    seen: dict[str, int] = {}
    labels = []
    for task in tasks:
        seen[task] = seen.get(task, 0) + 1
        labels.append(task if counts[task] == 1 else f"{task} ({seen[task]})")
    return labels


def _fraction(value: Any) -> float:
    if isinstance(value, Mapping):
        value = value.get("accuracy", value.get("top1"))
    value = float(value)
    return value / 100.0 if value > 1.0 else value



def plot_accuracy(accuracy: AccuracyTable, path: str | Path) -> Path:
    """Draw accuracy (%) after each step, one line per task plus the average, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for task in accuracy.tasks:
        points = [(s, 100 * row[task]) for s, row in zip(accuracy.steps, accuracy.accuracy, strict=False) if task in row]
        if points:
            ax.plot(*zip(*points, strict=False), marker="o", linewidth=1, alpha=0.7, label=task)
    ax.plot(accuracy.steps, [100 * a for a in accuracy.averages()], color="black", linewidth=2.5, marker="s", label="average")
    if accuracy.base:
        # The bar a merge has to clear: the base's zero-shot average over the same tasks.
        baseline = [
            100 * sum(accuracy.base[t] for t in row if t in accuracy.base) / max(1, sum(t in accuracy.base for t in row))
            for row in accuracy.accuracy
        ]
        ax.plot(accuracy.steps, baseline, color="grey", linewidth=1.5, linestyle="--", label="zero-shot base (average)")
    ax.set_xlabel("merge step (experts merged)")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(accuracy.steps)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)


def evaluation_settings(output_dir: str | Path) -> dict[str, Any]:
    """For the card, from ``eval_results.json``: the image processor and dtype of the evaluation, and
    per task the images that could not be decoded (``{}`` without results)."""
    data = MergeFolder(output_dir).results_data()
    if not isinstance(data, dict):
        return {}
    undecodable: dict[str, int] = {}
    for step in data.get("steps") or []:
        for task, metrics in (step.get("results") or {}).items():
            undecodable[task] = max(undecodable.get(task, 0), int(metrics.get("undecodable") or 0))
    preprocessing = data.get("preprocessing")
    return {"preprocessing": markdown_text(preprocessing) if preprocessing else None,
            "eval_dtype": markdown_text(data.get("eval_dtype") or "float32"),
            "undecodable": [{"task": markdown_text(t), "count": n} for t, n in undecodable.items() if n]}
