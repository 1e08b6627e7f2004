"""Validation tasks for tuning: registered ``/val`` tasks, FusionBench's held-out 10 % of a Hub
train split (checked against torch's own ``random_split``), and the one-line refusal for the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_merge.errors import EvaluationError
from hf_merge.evaluation import DatasetSpec, Task, get_task, load_task_data, validation_task
from hf_merge.evaluation.datasets import subsample_indices
from hf_merge.evaluation.validation import holdout_indices


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Every dataset here is a local folder; nothing may reach for the Hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

N = 50
CLASSES = ("zero", "one", "two", "three", "four", "five", "six")


def _train_dataset(folder):
    """A local Hub-style dataset with only a train split: example i has label i % 7 and pixel value i."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    folder.mkdir(parents=True)
    images = [Image.fromarray(np.full((4, 4, 3), i, np.uint8)) for i in range(N)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASSES))})
    Dataset.from_dict({"image": images, "label": [i % len(CLASSES) for i in range(N)]}, features=features).to_parquet(
        str(folder / "train.parquet")
    )
    return folder


def _hub_task(folder, name="local-train", split="test"):
    return Task(name, CLASSES, ("a photo of {}.",), DatasetSpec(kind="hub", path=str(folder), split=split))


def _reference_val_indices(total):
    """What FusionBench's train_validation_split(fraction 0.1, seed 0, return_split="val") keeps."""
    n_val = int(total * 0.1)
    _, val = torch.utils.data.random_split(range(total), [total - n_val, n_val], generator=torch.Generator().manual_seed(0))
    return list(val.indices)


def _indices_of(data):
    # The pixel value of each image is its index in the train split.
    return [data.image(i).getpixel((0, 0))[0] for i in range(len(data))]


def test_holdout_indices_match_random_split():
    for total in (50, 10, 397, 1001):
        assert holdout_indices(total, 0.1, 0) == _reference_val_indices(total)
    assert holdout_indices(9, 0.1, 0) == []
    assert holdout_indices(50, 0.1, 1) != holdout_indices(50, 0.1, 0)


def test_hub_holdout_loads_exactly_the_validation_part(tmp_path):
    folder = _train_dataset(tmp_path / "ds")
    val = validation_task(_hub_task(folder))
    assert val.name == "local-train/val" and val.classes == CLASSES and val.templates == ("a photo of {}.",)
    assert val.dataset.split == "train" and val.dataset.holdout_fraction == 0.1 and val.dataset.holdout_seed == 0
    data = load_task_data(val)
    expected = _reference_val_indices(N)
    assert len(data) == int(N * 0.1) == 5
    assert _indices_of(data) == expected  # the same examples, in random_split's order
    assert data.labels == [i % len(CLASSES) for i in expected]
    assert data.source == f"{folder} (train, held-out 10 % seed 0)"

    limited = load_task_data(val, limit=3)
    # The limit subsamples the held-out set, not the whole train split.
    assert _indices_of(limited) == [expected[i] for i in subsample_indices(5, 3)] == [expected[0], expected[2], expected[4]]


def test_holdout_fingerprint_differs_from_the_plain_train_split(tmp_path):
    folder = _train_dataset(tmp_path / "ds")
    plain = load_task_data(_hub_task(folder, split="train"))
    val = validation_task(_hub_task(folder))
    held = load_task_data(val)
    other_seed = Task(val.name, val.classes, val.templates, DatasetSpec(kind="hub", path=str(folder), split="train",
                                                                      holdout_fraction=0.1, holdout_seed=1))
    fingerprints = {plain.fingerprint, held.fingerprint, load_task_data(val, limit=3).fingerprint,
                    load_task_data(other_seed).fingerprint}
    assert len(fingerprints) == 4
    assert load_task_data(val).fingerprint == held.fingerprint  # stable, so the pixel cache is reused
    assert len(plain) == N


def test_holdout_of_too_small_a_split_is_one_line(tmp_path):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    folder = tmp_path / "small"
    folder.mkdir()
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASSES))})
    images = [Image.fromarray(np.zeros((4, 4, 3), np.uint8))] * 5
    Dataset.from_dict({"image": images, "label": [0] * 5}, features=features).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(EvaluationError) as info:
        load_task_data(validation_task(_hub_task(folder, name="tiny")))
    assert "\n" not in str(info.value) and "tiny/val" in str(info.value) and "no examples" in str(info.value)


def test_dataset_spec_checks_the_holdout():
    assert DatasetSpec(kind="hub", path="x", split="train").describe() == "x (train)"
    assert DatasetSpec(kind="hub", path="x", config="c", split="train", holdout_fraction=0.25, holdout_seed=3).describe() == (
        "x/c (train, held-out 25 % seed 3)"
    )
    for fraction in (0, 1, 1.5, -0.1, True, "0.1"):
        with pytest.raises(EvaluationError, match="holdout_fraction"):
            DatasetSpec(kind="hub", path="x", holdout_fraction=fraction)
    with pytest.raises(EvaluationError, match="hub datasets only"):
        DatasetSpec(kind="python", path="m:f", holdout_fraction=0.1)
    with pytest.raises(EvaluationError, match="holdout_seed"):
        DatasetSpec(kind="hub", path="x", holdout_fraction=0.1, holdout_seed=0.5)


def test_paper_task_maps_to_fusionbench_holdout():
    sun = get_task("sun397")
    val = validation_task("sun397")
    assert val.name == "sun397/val" and val.classes == sun.classes and val.templates == sun.templates
    assert val.dataset == DatasetSpec(kind="hub", path="tanganke/sun397", split="train", holdout_fraction=0.1, holdout_seed=0)
    assert val.dataset.describe() == "tanganke/sun397 (train, held-out 10 % seed 0)"
    svhn = validation_task("svhn").dataset
    assert (svhn.path, svhn.config, svhn.split, svhn.holdout_fraction) == ("ufldl-stanford/svhn", "cropped_digits", "train", 0.1)
    assert validation_task(val) is val  # already a validation task
    assert validation_task("Stanford_Cars").name == "stanford-cars/val"  # names matched as get_task matches them


def test_zoo_tasks_resolve_to_their_registered_val_split():
    import hf_merge.zoo

    hf_merge.zoo.register_offline_tasks()
    val = validation_task("offline/mnist")
    assert val is get_task("offline/mnist/val")
    assert val.dataset.options["split"] == "val"
    assert validation_task("OFFLINE/MNIST") is val
    assert validation_task(val) is val
    assert validation_task("offline/mnist/val") is val


def _refused(task, name):
    with pytest.raises(EvaluationError) as info:
        validation_task(task)
    message = str(info.value)
    assert "\n" not in message, message
    assert f"task {name} " in message and f"'{name}/val'" in message and "register_task" in message, message
    return message


def test_tasks_without_validation_data_are_refused(tmp_path):
    generated = Task("generated/shapes", ("circle", "square"), ("a {}.",),
                     DatasetSpec(kind="python", path="hf_merge.evaluation.synthetic:solid_colors"))
    _refused(generated, "generated/shapes")
    folder = tmp_path / "flowers"
    for label in ("rose", "tulip"):
        (folder / label).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / label / "a.png")
    _refused(Task.from_image_folder(folder), "flowers")
    _refused(str(folder), "flowers")
    # A hub task tested on its train split has no train data left that is not test data.
    message = _refused(_hub_task(tmp_path / "ds", name="on-train", split="train"), "on-train")
    assert "train split" in message


def test_the_colour_task_has_a_validation_split_of_other_images():
    val = validation_task("synthetic/colors")
    assert val.name == "synthetic/colors/val"
    test_data, val_data = load_task_data(get_task("synthetic/colors")), load_task_data(val)
    assert val.classes == get_task("synthetic/colors").classes and len(val_data) == len(test_data)
    assert val_data.fingerprint != test_data.fingerprint
    first_test, first_val = np.asarray(test_data.images(0, 1)[0]), np.asarray(val_data.images(0, 1)[0])
    assert not np.array_equal(first_test, first_val)  # the same colour, other noise: not the test images


def test_a_hub_task_validation_name_works_wherever_a_task_name_does():
    """``sun397/val`` (not registered) is found by name: the tuner, the watcher's gate and
    ``hf-merge eval`` all look tasks up by name."""
    derived = get_task("sun397/val")
    assert derived == validation_task("sun397")
    assert derived.dataset.split == "train" and derived.dataset.holdout_fraction == 0.1
    assert get_task("Stanford_Cars/val").name == "stanford-cars/val"
    with pytest.raises(EvaluationError, match="unknown task 'synthetic/nothing/val'"):
        get_task("synthetic/nothing/val")
