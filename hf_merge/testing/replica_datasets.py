"""Small replicas of the paper's 8 evaluation datasets, in the layout ``datasets`` reads on the Hub.

Same repo ids, configs, split names and parquet file names as the real repos (see
``REAL_DATASETS``), the same columns (``image``, ``label`` as a ``ClassLabel`` listing *all* the
real class names, in the real order), and a README whose ``dataset_info`` and ``configs`` declare
them. Only the number of rows differs: a few dozen generated images per split, of a handful of
classes, each class drawn with its own colour and stripes so that a fine-tuned vision tower can
tell them apart.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hf_merge.evaluation.tasks import get_task

# Corruption splits of the tanganke robustness datasets (resisc45, gtsrb, eurosat, stanford_cars).
_CORRUPTIONS = ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "spatter")


@dataclass(frozen=True)
class ReplicaDataset:
    """One dataset repo: its id, config, registry task, image size and parquet files per split.

    Attributes:
        repo_id: The real repo id (``tanganke/sun397``).
        config: The config name (``default``, ``cropped_digits``, ``mnist``).
        task: The registry task whose class names the ``ClassLabel`` lists.
        image_size: Side of the generated images, in pixels (the real datasets' typical size).
        mode: PIL mode of the images (``L`` for MNIST).
        shards: Split -> number of parquet shards of the real repo.
        folder: Folder of the parquet files (``data``, or the config name).
    """

    repo_id: str
    config: str
    task: str
    image_size: int
    mode: str
    shards: dict[str, int]
    folder: str = "data"

    def files(self, split: str) -> list[str]:
        n = self.shards[split]
        return [f"{self.folder}/{split}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


def _robust(main: dict[str, int], corruption_shards: dict[str, int] | None = None) -> dict[str, int]:
    return {**main, **{c: (corruption_shards or {}).get(c, 1) for c in _CORRUPTIONS}}


REAL_DATASETS: tuple[ReplicaDataset, ...] = (
    ReplicaDataset("tanganke/sun397", "default", "sun397", 64, "RGB", {"train": 18, "test": 18}),
    ReplicaDataset(
        "tanganke/stanford_cars", "default", "stanford-cars", 64, "RGB",
        _robust({"train": 2, "test": 2}, {"gaussian_noise": 2, "impulse_noise": 2, "spatter": 2}),
    ),
    ReplicaDataset("tanganke/resisc45", "default", "resisc45", 64, "RGB", _robust({"train": 1, "test": 1})),
    ReplicaDataset("tanganke/eurosat", "default", "eurosat", 64, "RGB", _robust({"train": 1, "test": 1})),
    ReplicaDataset(
        "ufldl-stanford/svhn", "cropped_digits", "svhn", 32, "RGB", {"train": 1, "test": 1, "extra": 2},
        folder="cropped_digits",
    ),
    ReplicaDataset("tanganke/gtsrb", "default", "gtsrb", 48, "RGB", _robust({"train": 1, "test": 1})),
    ReplicaDataset("ylecun/mnist", "mnist", "mnist", 28, "L", {"train": 1, "test": 1}, folder="mnist"),
    ReplicaDataset("tanganke/dtd", "default", "dtd", 64, "RGB", {"train": 1, "test": 1}),
)

CLASSES_PER_TASK = 4
IMAGES_PER_CLASS = {"train": 4, "test": 3}
IMAGES_PER_CLASS_OTHER = 1  # corruption and extra splits: present, tiny


def present_classes(num_classes: int) -> list[int]:
    """The labels that have images: spread over the whole class list (first and last included)."""
    return sorted({round(i * (num_classes - 1) / (CLASSES_PER_TASK - 1)) for i in range(CLASSES_PER_TASK)})


def class_image(task: str, label: int, index: int, size: int, mode: str) -> Image.Image:
    """A generated picture of class ``label``: its colour and stripe direction and period,
    plus per-image noise and offset (so test images are not the training ones)."""
    class_rng = np.random.default_rng(zlib.crc32(f"{task}/{label}".encode()))
    color = class_rng.integers(30, 226, size=3)
    period = int(class_rng.integers(4, 12))
    vertical = bool(class_rng.integers(0, 2))
    rng = np.random.default_rng(zlib.crc32(f"{task}/{label}/{index}".encode()))
    coords = np.arange(size)[None, :] if vertical else np.arange(size)[:, None]
    stripes = ((coords + int(rng.integers(0, period))) // (period // 2 or 1)) % 2
    image = np.broadcast_to(color, (size, size, 3)).astype(np.float32) * (0.6 + 0.4 * stripes[..., None])
    image += rng.normal(0, 12, size=image.shape)
    array = np.clip(image, 0, 255).astype(np.uint8)
    picture = Image.fromarray(array, "RGB")
    return picture.convert("L") if mode == "L" else picture


def split_rows(dataset: ReplicaDataset, split: str) -> tuple[list[Image.Image], list[int]]:
    """The images and labels of one split (deterministic)."""
    task = get_task(dataset.task)
    classes = present_classes(task.num_classes)
    # Every shard of the real layout holds at least one row.
    per_class = max(IMAGES_PER_CLASS.get(split, IMAGES_PER_CLASS_OTHER), -(-dataset.shards[split] // len(classes)))
    offset = {"train": 0, "test": 1000}.get(split, 2000 + 100 * sorted(dataset.shards).index(split))
    images, labels = [], []
    for label in classes:
        for i in range(per_class):
            images.append(class_image(dataset.task, label, offset + i, dataset.image_size, dataset.mode))
            labels.append(label)
    return images, labels


def write_dataset(dataset: ReplicaDataset, out_dir: str | Path) -> Path:
    """Write the repo's files (``README.md``, ``.gitattributes``, parquet shards) into ``out_dir``."""
    import datasets

    out_dir = Path(out_dir)
    task = get_task(dataset.task)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(task.classes))})
    counts: dict[str, int] = {}
    for split in dataset.shards:
        images, labels = split_rows(dataset, split)
        counts[split] = len(labels)
        encoded = [{"bytes": _png(image), "path": None} for image in images]
        table = datasets.Dataset.from_dict({"image": encoded, "label": labels}, features=features)
        files = dataset.files(split)
        for i, name in enumerate(files):
            path = out_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            table.shard(num_shards=len(files), index=i, contiguous=True).to_parquet(str(path))
    (out_dir / "README.md").write_text(_readme(dataset, task.classes, counts), encoding="utf-8")
    lfs = "".join(f"{name} filter=lfs diff=lfs merge=lfs -text\n" for s in dataset.shards for name in dataset.files(s))
    (out_dir / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n" + lfs, encoding="utf-8")
    return out_dir


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _quote(name: str) -> str:
    return "'" + name.replace("'", "''") + "'"


def _readme(dataset: ReplicaDataset, classes: tuple[str, ...], counts: dict[str, int]) -> str:
    names = "".join(f"          '{i}': {_quote(name)}\n" for i, name in enumerate(classes))
    splits = "".join(f"  - name: {split}\n    num_bytes: {0.0}\n    num_examples: {n}\n" for split, n in counts.items())
    files = "".join(f"  - split: {split}\n    path: {dataset.folder}/{split}-*\n" for split in dataset.shards)
    config_line = f"  config_name: {dataset.config}\n" if dataset.config != "default" else ""
    return (
        "---\n"
        "dataset_info:\n"
        f"{config_line}"
        "  features:\n"
        "  - name: image\n    dtype: image\n"
        "  - name: label\n    dtype:\n      class_label:\n        names:\n"
        f"{names}"
        "  splits:\n"
        f"{splits}"
        "configs:\n"
        f"- config_name: {dataset.config}\n"
        "  data_files:\n"
        f"{files}"
        "---\n\n"
        f"# {dataset.repo_id} (small replica for tests)\n"
    )
