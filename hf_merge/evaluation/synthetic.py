"""A generated classification task that needs no download: solid-colour images.

Used by tests, the offline quick start and anyone checking the evaluation plumbing with tiny
models. Every image is one colour with a little deterministic noise, so the task is easy for a
trained model and still exercises every step (image processor, encoder, head, metric).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

COLOR_NAMES = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black")
_RGB = {
    "red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30),
    "cyan": (30, 220, 220), "magenta": (220, 30, 220), "white": (240, 240, 240), "black": (15, 15, 15),
}


def solid_colors(
    n_per_class: int = 8, size: int = 32, seed: int = 0, classes: tuple[str, ...] | list[str] = COLOR_NAMES
) -> tuple[list[Image.Image], list[int]]:
    """``n_per_class`` images of each colour, interleaved by class (label ``i`` = ``classes[i]``).

    The same arguments always give the same images.
    """
    rng = np.random.default_rng(seed)
    images: list[Image.Image] = []
    labels: list[int] = []
    for _ in range(n_per_class):
        for label, name in enumerate(classes):
            noise = rng.integers(-12, 13, size=(size, size, 3))
            pixels = np.clip(np.array(_RGB[name])[None, None, :] + noise, 0, 255).astype(np.uint8)
            images.append(Image.fromarray(pixels))
            labels.append(label)
    return images, labels
