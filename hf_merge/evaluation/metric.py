"""Classification accuracy as an ``evaluate`` metric that lives in this package (no Hub download).

:class:`ZeroShotAccuracy` works with evaluate's whole API: ``compute``, ``add``, ``add_batch`` and
``evaluate.combine([ZeroShotAccuracy(), ...])``. Predictions are either class ids, or ranked lists
of class ids (best first, e.g. the top 5 logits); the second form also gives top-k accuracy.

Result keys: ``accuracy`` (top-1), ``top5_accuracy`` (only for ranked predictions; ``top_k`` sets
k and the key name), ``per_class_accuracy`` (list indexed by class id; ``None`` for a class with no
reference) and ``num_samples``.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

_DESCRIPTION = """Top-1 accuracy, top-k accuracy and per-class accuracy of a classifier.
Predictions are class ids, or ranked lists of class ids (best first) for top-k accuracy."""

_INPUTS = """
Args:
    predictions: class id (int) per example, or a list of class ids ranked best first.
    references: true class id (int) per example.
    num_classes: length of ``per_class_accuracy``; defaults to the largest id seen plus one.
    top_k: k of the top-k accuracy (default 5); reported as ``top{k}_accuracy``.
Returns:
    accuracy, top{k}_accuracy (ranked predictions only), per_class_accuracy, num_samples.
Example:
    >>> metric = ZeroShotAccuracy()
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]
    0.6666666666666666
"""

_CITATION = """@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and others}, booktitle={ICML}, year={2021}}"""


class ZeroShotAccuracy(evaluate.Metric):
    """Accuracy, top-k accuracy and per-class accuracy; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            # evaluate picks the first feature set that matches the first example.
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(
        self,
        predictions: list[Any],
        references: list[int],
        num_classes: int | None = None,
        top_k: int = 5,
    ) -> dict[str, Any]:
        return accuracy_scores(predictions, references, num_classes=num_classes, top_k=top_k)


def accuracy_scores(
    predictions: list[Any], references: list[int], *, num_classes: int | None = None, top_k: int = 5
) -> dict[str, Any]:
    """The metric's arithmetic, usable without ``evaluate`` (same keys as :class:`ZeroShotAccuracy`)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    ranked = bool(predictions) and isinstance(predictions[0], (list, tuple))
    top1 = [(p[0] if p else -1) if ranked else p for p in predictions]
    total = len(references)
    result: dict[str, Any] = {
        "accuracy": sum(int(p == r) for p, r in zip(top1, references, strict=False)) / total if total else 0.0
    }
    if ranked:
        hits = sum(int(r in list(p)[:top_k]) for p, r in zip(predictions, references, strict=False))
        result[f"top{top_k}_accuracy"] = hits / total if total else 0.0
    seen = [int(r) for r in references] + [int(p) for p in top1 if p is not None and p >= 0]
    size = num_classes if num_classes is not None else (max(seen) + 1 if seen else 0)
    correct, count = [0] * size, [0] * size
    for p, r in zip(top1, references, strict=False):
        if 0 <= r < size:
            count[r] += 1
            correct[r] += int(p == r)
    result["per_class_accuracy"] = [c / n if n else None for c, n in zip(correct, count, strict=False)]
    result["num_samples"] = total
    return result
