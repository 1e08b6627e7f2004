"""The replicas of the paper's 8 evaluation datasets load through ``datasets`` from the local Hub,
with the real repo ids, configs, splits, parquet layout and class names, and evaluation reads them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import datasets
import pytest

from hf_merge.evaluation.datasets import load_task_data
from hf_merge.evaluation.tasks import get_task
from hf_merge.testing.replica_datasets import REAL_DATASETS, present_classes
from hf_merge.testing.replicas import publish_replicas


@pytest.fixture(scope="module")
def replica_datasets(hub_server):
    return publish_replicas(hub_server.api.storage, Path(tempfile.gettempdir()) / "hf-merge-replicas", models=False)


@pytest.mark.parametrize("spec", REAL_DATASETS, ids=lambda d: d.task)
def test_dataset_loads_like_the_real_one(replica_datasets, spec, hub_api):
    task = get_task(spec.task)
    assert task.dataset.path == spec.repo_id and (task.dataset.config or spec.config) == spec.config
    files = set(hub_api.list_repo_files(spec.repo_id, repo_type="dataset"))
    assert {f for s in spec.shards for f in spec.files(s)} <= files
    test = datasets.load_dataset(spec.repo_id, task.dataset.config, split=task.dataset.split)
    assert test.column_names == ["image", "label"]
    assert test.features["label"].names == list(task.classes)  # every real name, in the real order
    assert set(test["label"]) == set(present_classes(task.num_classes))
    data = load_task_data(task)
    assert len(data) == len(test) and data.images(0, 1)[0].mode == "RGB"
