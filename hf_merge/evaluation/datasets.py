"""Turn a task's :class:`~hf_merge.evaluation.tasks.DatasetSpec` into labelled images.

:func:`load_task_data` checks everything that can be checked without decoding every image (the
split exists and is not empty, the columns exist, the labels are integers within the class
list, the dataset's own class count matches the task's) and returns a :class:`TaskData` whose
images are decoded batch by batch, so a large test split is never held in memory. Every problem
is an :class:`~hf_merge.errors.EvaluationError` of one line that names the task.

``limit`` keeps ``limit`` examples evenly spaced over the split (deterministic), not the first
ones: many test splits are sorted by class. A hub spec with a ``holdout_fraction`` keeps only its
held-out examples (:func:`~hf_merge.evaluation.validation.holdout_indices`), before ``limit``.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hf_merge.errors import EvaluationError
from hf_merge.evaluation.tasks import Task
from hf_merge.evaluation.validation import holdout_indices

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class TaskData:
    """The examples of one task: integer labels up front, images decoded on demand.

    Attributes:
        task: The task these examples belong to.
        labels: Label of every kept example.
        source: Human description of where the images come from.
        fingerprint: SHA-256 of what decides the kept examples (the dataset's revision or content,
            split, holdout and limit): the pixel cache is keyed by it.
    """

    task: Task
    labels: list[int]
    source: str
    _fetch: Callable[[int, int], Sequence[Any]]
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, start: int, stop: int) -> list[Image.Image]:
        """Examples ``start`` to ``stop`` (exclusive) as RGB PIL images."""
        raw = self._fetch(start, stop)
        return [_to_rgb(self.task, item, start + offset) for offset, item in enumerate(raw)]

    def image(self, index: int) -> Image.Image:
        """Example ``index`` as an RGB PIL image (an :class:`EvaluationError` naming it if it cannot be decoded)."""
        return self.images(index, index + 1)[0]

    def batches(self, batch_size: int):
        """Yield ``(images, labels)`` in order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield self.images(start, stop), self.labels[start:stop]


def subsample_indices(total: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(total)`` (all of them if ``limit`` is None)."""
    if limit is None or limit >= total:
        return list(range(total))
    if limit <= 0:
        raise EvaluationError(f"limit must be a positive number of examples, got {limit}")
    return sorted({int(i) for i in np.linspace(0, total - 1, num=limit).round()})


def load_task_data(task: Task, limit: int | None = None) -> TaskData:
    """Open ``task``'s dataset and check it; see the module docstring."""
    if task.dataset is None:
        raise EvaluationError(f"task {task.name}: no dataset to evaluate on")
    loaders = {"hub": _load_hub, "imagefolder": _load_image_folder, "python": _load_python}
    return loaders[task.dataset.kind](task, limit)


def _load_hub(task: Task, limit: int | None) -> TaskData:
    import datasets

    spec = task.dataset
    assert spec is not None
    try:
        dataset = datasets.load_dataset(spec.path, spec.config, split=spec.split, revision=spec.revision)
    except Exception as error:  # datasets raises many types; the user needs the one-line reason
        if "corresponds to no data" in str(error):  # how datasets reports a split with no rows
            raise EvaluationError(f"task {task.name}: split {spec.split!r} of {spec.describe()} is empty") from error
        raise EvaluationError(
            f"task {task.name}: cannot load dataset {spec.describe()}: {_first_line(error)}"
        ) from error
    for role, column in (("image", spec.image_column), ("label", spec.label_column)):
        if column not in dataset.column_names:
            raise EvaluationError(
                f"task {task.name}: {role} column {column!r} not in dataset {spec.describe()} "
                f"(columns: {', '.join(dataset.column_names)})"
            )
    if len(dataset) == 0:
        raise EvaluationError(f"task {task.name}: split {spec.split!r} of {spec.describe()} is empty")
    feature = dataset.features.get(spec.label_column)
    declared = getattr(feature, "num_classes", None)
    if declared is not None and declared != task.num_classes:
        raise EvaluationError(
            f"task {task.name}: dataset {spec.describe()} has {declared} classes "
            f"but the task has {task.num_classes} class names"
        )
    # datasets' fingerprint changes with the data files (so with the revision) and with every transform.
    parts = ["hub", spec.describe(), spec.revision, getattr(dataset, "_fingerprint", None), len(dataset), limit]
    if spec.holdout_fraction is not None:
        # Keyed apart from the plain split; appended only here so existing caches keep their keys.
        parts += ["holdout", float(spec.holdout_fraction), spec.holdout_seed]
        held_out = holdout_indices(len(dataset), spec.holdout_fraction, spec.holdout_seed)
        if not held_out:
            raise EvaluationError(
                f"task {task.name}: {spec.describe()} holds out no examples: {len(dataset)} examples are too few"
            )
        # The holdout comes first so that a limit subsamples the validation set, never the whole split.
        dataset = dataset.select(held_out)
    fingerprint = _digest(*parts)
    dataset = dataset.select(subsample_indices(len(dataset), limit))
    labels = _check_labels(task, list(dataset[spec.label_column]))
    images = dataset.select_columns([spec.image_column])

    def fetch(start: int, stop: int) -> list[Any]:
        # Decoding happens here; a corrupt file is reported with its index in the kept subset.
        out = []
        for index in range(start, stop):
            try:
                out.append(images[index][spec.image_column])
            except Exception as error:
                raise EvaluationError(
                    f"task {task.name}: unreadable image at index {index} of {spec.describe()}: "
                    f"{_first_line(error)}"
                ) from error
        return out

    return TaskData(task=task, labels=labels, source=spec.describe(), _fetch=fetch, fingerprint=fingerprint)


def _load_image_folder(task: Task, limit: int | None) -> TaskData:
    spec = task.dataset
    assert spec is not None
    root = Path(spec.path).expanduser()
    if not root.is_dir():
        raise EvaluationError(f"task {task.name}: image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EvaluationError(f"task {task.name}: image folder {root} has no class sub-folders")
    names = [p.name for p in folders]
    if all(name in task.classes for name in names):
        label_of = {name: task.classes.index(name) for name in names}
    elif len(folders) == task.num_classes:
        label_of = {name: i for i, name in enumerate(names)}
    else:
        raise EvaluationError(
            f"task {task.name}: image folder {root} has {len(folders)} class sub-folders "
            f"but the task has {task.num_classes} class names"
        )
    files: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(label_of[folder.name])
    if not files:
        raise EvaluationError(f"task {task.name}: image folder {root} contains no images")
    keep = subsample_indices(len(files), limit)
    files = [files[i] for i in keep]
    labels = [labels[i] for i in keep]
    # A file replaced in place changes its size or modification time.
    fingerprint = _digest("imagefolder", str(root.resolve()), labels,
                          [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files])

    def fetch(start: int, stop: int) -> list[Any]:
        out = []
        for file in files[start:stop]:
            try:
                with Image.open(file) as image:
                    image.load()
                    out.append(image.copy())
            except Exception as error:
                raise EvaluationError(f"task {task.name}: unreadable image {file}: {_first_line(error)}") from error
        return out

    return TaskData(task=task, labels=labels, source=str(root), _fetch=fetch, fingerprint=fingerprint)


def _load_python(task: Task, limit: int | None) -> TaskData:
    spec = task.dataset
    assert spec is not None
    module_name, _, function_name = spec.path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise EvaluationError(f"task {task.name}: cannot import {spec.path}: {_first_line(error)}") from error
    try:
        result = function(**spec.options)
        images, raw_labels = result
    except EvaluationError:
        raise
    except Exception as error:
        raise EvaluationError(f"task {task.name}: {spec.path} failed: {_first_line(error)}") from error
    if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
        raise EvaluationError(
            f"task {task.name}: {spec.path} returned an image array of shape {images.shape}; "
            "expected (N, H, W) or (N, H, W, C)"
        )
    if len(images) != len(raw_labels):
        raise EvaluationError(
            f"task {task.name}: {spec.path} returned {len(images)} images but {len(raw_labels)} labels"
        )
    if len(images) == 0:
        raise EvaluationError(f"task {task.name}: {spec.path} returned no examples")
    keep = subsample_indices(len(images), limit)
    labels = _check_labels(task, [raw_labels[i] for i in keep])
    kept = [images[i] for i in keep]
    # A function has no revision: its examples themselves are the fingerprint.
    fingerprint = _digest("python", spec.path, sorted(spec.options.items()), labels, *(_content(item) for item in kept))
    return TaskData(task=task, labels=labels, source=spec.path, _fetch=lambda start, stop: kept[start:stop],
                    fingerprint=fingerprint)


def _check_labels(task: Task, labels: list[Any]) -> list[int]:
    checked = []
    for index, label in enumerate(labels):
        if isinstance(label, (bool, np.bool_)):
            label = int(label)  # binary tasks (PCam) store booleans
        if not isinstance(label, (int, np.integer)):
            raise EvaluationError(f"task {task.name}: label {label!r} at index {index} is not an integer")
        if not 0 <= int(label) < task.num_classes:
            raise EvaluationError(
                f"task {task.name}: label {int(label)} at index {index} is outside 0..{task.num_classes - 1} "
                f"({task.num_classes} class names)"
            )
        checked.append(int(label))
    return checked


def _to_rgb(task: Task, item: Any, index: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, dict) and item.get("bytes") is not None:  # undecoded Image feature
        import io

        try:
            with Image.open(io.BytesIO(item["bytes"])) as image:
                return image.convert("RGB")
        except Exception as error:
            raise EvaluationError(
                f"task {task.name}: unreadable image at index {index}: {_first_line(error)}"
            ) from error
    if isinstance(item, np.ndarray) and item.ndim in (2, 3):
        array = item.squeeze(-1) if item.ndim == 3 and item.shape[-1] == 1 else item
        if array.dtype != np.uint8:
            raise EvaluationError(f"task {task.name}: image at index {index} has dtype {array.dtype}; expected uint8")
        try:
            return Image.fromarray(array).convert("RGB")
        except Exception as error:
            raise EvaluationError(
                f"task {task.name}: unreadable image at index {index}: {_first_line(error)}"
            ) from error
    raise EvaluationError(
        f"task {task.name}: unreadable image at index {index}: expected a PIL image or uint8 array, "
        f"got {type(item).__name__}"
    )


def _digest(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _content(item: Any) -> bytes:
    """The bytes of one example as a python dataset returned it (array, PIL image or other)."""
    if isinstance(item, np.ndarray):
        return f"{item.dtype}{item.shape}".encode() + np.ascontiguousarray(item).tobytes()
    if isinstance(item, Image.Image):
        return f"{item.mode}{item.size}".encode() + item.tobytes()
    return repr(item).encode()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
