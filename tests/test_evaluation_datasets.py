"""Loading task datasets (hub, image folder, python) and the one-line errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hf_merge.errors import EvaluationError
from hf_merge.evaluation import DatasetSpec, Task, get_task, load_task_data
from hf_merge.evaluation.datasets import subsample_indices
from hf_merge.evaluation.synthetic import COLOR_NAMES, solid_colors

CLASSES = ("dark", "mid", "light")


def _images(n):
    return [Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)) for i in range(n)]


def _parquet_dataset(folder, columns, features):
    """A local dataset folder that ``datasets.load_dataset(folder, split="test")`` reads."""
    from datasets import Dataset

    folder.mkdir(parents=True)
    Dataset.from_dict(columns, features=features).to_parquet(str(folder / "test.parquet"))
    return folder


def _hub_task(folder, classes=CLASSES, **spec):
    return Task("local-hub", classes, ("a {} square.",), DatasetSpec(kind="hub", path=str(folder), **spec))


def _features(label_names=CLASSES, label_column="label"):
    from datasets import ClassLabel, Features
    from datasets import Image as ImageFeature

    return Features({"image": ImageFeature(), label_column: ClassLabel(names=list(label_names))})


def _one_line_error(task, match, limit=None):
    with pytest.raises(EvaluationError) as info:
        data = load_task_data(task, limit=limit)
        list(data.batches(4))
    message = str(info.value)
    assert "\n" not in message, message
    assert f"task {task.name}" in message, message
    assert match in message, message
    return message


def test_hub_dataset_loads_images_and_labels(tmp_path):
    folder = _parquet_dataset(tmp_path / "ds", {"image": _images(5), "label": [0, 1, 2, 1, 0]}, _features())
    data = load_task_data(_hub_task(folder))
    assert len(data) == 5 and data.labels == [0, 1, 2, 1, 0]
    images = data.images(1, 3)
    assert [im.mode for im in images] == ["RGB", "RGB"] and images[1].getpixel((0, 0)) == (80, 80, 80)
    limited = load_task_data(_hub_task(folder), limit=3)
    assert limited.labels == [0, 2, 0]  # indices 0, 2, 4: spread over the split, not the first three


def test_hub_missing_label_column(tmp_path):
    folder = _parquet_dataset(
        tmp_path / "ds", {"image": _images(3), "target": [0, 1, 2]}, _features(label_column="target")
    )
    _one_line_error(_hub_task(folder), "label column 'label' not in dataset")


def test_hub_class_count_mismatch(tmp_path):
    folder = _parquet_dataset(tmp_path / "ds", {"image": _images(3), "label": [0, 1, 1]}, _features(("a", "b")))
    _one_line_error(_hub_task(folder), "has 2 classes but the task has 3 class names")


def test_hub_empty_split(tmp_path):
    folder = _parquet_dataset(tmp_path / "ds", {"image": [], "label": []}, _features())
    _one_line_error(_hub_task(folder), "split 'test'")


def test_hub_unreadable_image(tmp_path):
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    good = _images(1)[0]
    import io

    buffer = io.BytesIO()
    good.save(buffer, format="PNG")
    images = [{"bytes": buffer.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}]
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    folder = _parquet_dataset(tmp_path / "ds", {"image": images, "label": [0, 1]}, features)
    message = _one_line_error(_hub_task(folder), "unreadable image at index 1")
    assert "not an image" not in message


def test_hub_label_out_of_range_and_missing_dataset(tmp_path):
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": Value("int64")})
    folder = _parquet_dataset(tmp_path / "ds", {"image": _images(2), "label": [0, 7]}, features)
    _one_line_error(_hub_task(folder), "label 7 at index 1 is outside 0..2")
    _one_line_error(_hub_task(tmp_path / "nowhere"), "cannot load dataset")


def _write_folder(root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(_images(n)):
            image.save(root / name / f"{i}.png")
    return root


def test_image_folder_by_class_name_and_by_order(tmp_path):
    root = _write_folder(tmp_path / "named", {"light": 1, "dark": 2})
    data = load_task_data(Task("f", CLASSES, ("{}",), DatasetSpec(kind="imagefolder", path=str(root))))
    assert data.labels == [0, 0, 2]  # matched by name: "dark" is class 0, "light" class 2
    root = _write_folder(tmp_path / "ordered", {"x": 1, "y": 1, "z": 2})
    data = load_task_data(Task("f", CLASSES, ("{}",), DatasetSpec(kind="imagefolder", path=str(root))))
    assert data.labels == [0, 1, 2, 2]  # sorted sub-folders are labels 0, 1, 2


def test_image_folder_errors(tmp_path):
    root = _write_folder(tmp_path / "two", {"x": 1, "y": 1})
    task = Task("folder-task", CLASSES, ("{}",), DatasetSpec(kind="imagefolder", path=str(root)))
    _one_line_error(task, "has 2 class sub-folders but the task has 3 class names")
    root = _write_folder(tmp_path / "bad", {"x": 0, "y": 1, "z": 1})
    (root / "x" / "broken.png").write_bytes(b"\x89PNG garbage")
    task = Task("folder-task", CLASSES, ("{}",), DatasetSpec(kind="imagefolder", path=str(root)))
    _one_line_error(task, "unreadable image")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    task = Task("folder-task", ("x",), ("{}",), DatasetSpec(kind="imagefolder", path=str(tmp_path / "empty")))
    _one_line_error(task, "contains no images")


def make_arrays(n=4, bad=None):
    """Python dataset used below: uint8 grey images; ``bad`` breaks it on purpose."""
    images = np.stack([np.full((5, 5), 50 * i, np.uint8) for i in range(n)])
    labels = [i % 3 for i in range(n)]
    if bad == "count":
        labels = labels[:-1]
    if bad == "label":
        labels[2] = 3
    if bad == "empty":
        return images[:0], []
    if bad == "object":
        return ["not an image"] * n, labels
    return images, labels


def _python_task(**options):
    spec = DatasetSpec(kind="python", path=f"{__name__}:make_arrays", options=options)
    return Task("py-task", CLASSES, ("a {} square.",), spec)


def test_python_dataset_from_uint8_array():
    data = load_task_data(_python_task(n=4))
    assert data.labels == [0, 1, 2, 0]
    image = data.images(3, 4)[0]
    assert image.mode == "RGB" and image.size == (5, 5) and image.getpixel((2, 2)) == (150, 150, 150)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("count", "returned 4 images but 3 labels"),
        ("label", "label 3 at index 2 is outside 0..2"),
        ("empty", "returned no examples"),
        ("object", "unreadable image at index 0"),
    ],
)
def test_python_dataset_errors(bad, match):
    _one_line_error(_python_task(bad=bad), match)


def test_python_dataset_import_error():
    task = Task("py-task", CLASSES, ("{}",), DatasetSpec(kind="python", path="no.such.module:fn"))
    _one_line_error(task, "cannot import no.such.module:fn")


def test_synthetic_colors_is_deterministic_and_balanced():
    images, labels = solid_colors(n_per_class=3)
    again, _ = solid_colors(n_per_class=3)
    assert len(images) == 3 * len(COLOR_NAMES) and labels[: len(COLOR_NAMES)] == list(range(len(COLOR_NAMES)))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=False))
    red = np.asarray(images[0]).reshape(-1, 3).mean(axis=0)
    assert red[0] > 180 and red[1] < 60 and red[2] < 60
    data = load_task_data(get_task("synthetic/colors"), limit=16)
    assert len(data) == 16 and set(data.labels) == set(range(len(COLOR_NAMES)))


def test_subsample_indices():
    assert subsample_indices(5, None) == [0, 1, 2, 3, 4]
    assert subsample_indices(5, 10) == [0, 1, 2, 3, 4]
    assert subsample_indices(9, 3) == [0, 4, 8]
    with pytest.raises(EvaluationError):
        subsample_indices(5, 0)
