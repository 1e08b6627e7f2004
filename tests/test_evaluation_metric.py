"""ZeroShotAccuracy through evaluate's API, offline, on hand-made predictions."""

from __future__ import annotations

import datasets
import evaluate
import pytest

from hf_merge.evaluation import ZeroShotAccuracy
from hf_merge.evaluation.metric import accuracy_scores

# 6 examples, 3 classes. Ranked predictions (best first):
RANKED = [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0], [0, 2, 1], [2, 0, 1]]
REFERENCES = [0, 1, 1, 2, 2, 2]
# top-1 = [0, 2, 1, 1, 0, 2] -> correct: ex0, ex2, ex5 -> 3/6
# top-2 hits: ex0 (0 in [0,1]), ex1 (1 in [2,1]), ex2, ex3 (2 in [1,2]), ex4 (2 in [0,2]), ex5 -> 6/6
# per class: class 0: 1/1; class 1: ex1 wrong, ex2 right -> 1/2; class 2: ex3, ex4 wrong, ex5 right -> 1/3


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_compute_with_class_ids():
    metric = ZeroShotAccuracy()
    result = metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 1])
    # Class 2 is predicted but never a reference: it has a slot, with no accuracy.
    assert result == {"accuracy": 0.5, "per_class_accuracy": [0.5, 0.5, None], "num_samples": 4}


def test_compute_with_ranked_predictions():
    result = ZeroShotAccuracy().compute(predictions=RANKED, references=REFERENCES, top_k=2)
    assert result["accuracy"] == 0.5
    assert result["top2_accuracy"] == 1.0
    assert result["per_class_accuracy"] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert result["num_samples"] == 6
    default = ZeroShotAccuracy().compute(predictions=RANKED, references=REFERENCES)
    assert default["top5_accuracy"] == 1.0  # k larger than the lists: every label is in the list


def test_num_classes_pads_per_class_with_none():
    result = ZeroShotAccuracy().compute(predictions=[0, 0], references=[0, 1], num_classes=4)
    assert result["per_class_accuracy"] == [1.0, 0.0, None, None]


def test_add_batch_equals_one_compute():
    metric = ZeroShotAccuracy(keep_in_memory=True)
    metric.add_batch(predictions=RANKED[:4], references=REFERENCES[:4])
    metric.add_batch(predictions=RANKED[4:], references=REFERENCES[4:])
    batched = metric.compute(top_k=2, num_classes=3)
    assert batched == ZeroShotAccuracy().compute(predictions=RANKED, references=REFERENCES, top_k=2, num_classes=3)
    single = ZeroShotAccuracy(keep_in_memory=True)
    for p, r in zip([0, 2, 1], [0, 1, 1], strict=False):
        single.add(prediction=p, reference=r)
    assert single.compute()["accuracy"] == pytest.approx(2 / 3)


class _Count(evaluate.Metric):
    """A second metric to combine with (evaluate.combine needs no Hub for local instances)."""

    def _info(self):
        features = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
        return evaluate.MetricInfo(description="count", citation="", inputs_description="", features=features)

    def _compute(self, predictions, references):
        return {"count": len(predictions)}


def test_evaluate_combine():
    combined = evaluate.combine([ZeroShotAccuracy(), _Count()])
    result = combined.compute(predictions=[0, 2, 1, 1, 0, 2], references=REFERENCES)
    assert result == {
        "accuracy": 0.5,
        "per_class_accuracy": [1.0, 0.5, pytest.approx(1 / 3)],
        "num_samples": 6,
        "count": 6,
    }
    alone = evaluate.combine([ZeroShotAccuracy()])
    alone.add_batch(predictions=RANKED, references=REFERENCES)
    assert alone.compute()["top5_accuracy"] == 1.0


def test_info_and_plain_function():
    metric = ZeroShotAccuracy()
    assert metric.name == "zero_shot_accuracy"
    assert "top-k" in metric.description
    empty = accuracy_scores([], [], num_classes=2)
    assert empty == {"accuracy": 0.0, "per_class_accuracy": [None, None], "num_samples": 0}
    with pytest.raises(ValueError):
        accuracy_scores([0], [0, 1])
