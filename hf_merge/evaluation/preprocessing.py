"""The image processor of an evaluation, pinned, and the exact uint8-to-float step it ends with.

transformers gives ``CLIPProcessor.from_pretrained`` the torchvision image processor whenever
torchvision is installed (every GPU environment has it); it moves about 0.5 % of pixel values by one
level against the PIL processor the reference evaluation uses. :func:`pin_image_processor` therefore
rebuilds the PIL processor from the model's own preprocessing config, whatever transformers picked,
and checks the class it got; the torchvision one is used only when asked for (``fast=True``).

A CLIP processor ends with two per-pixel steps: ``rescale`` (× 1/255) and ``normalize`` (per channel
``(x - mean) / std``). Before them every pixel is a uint8, so the float value of a pixel depends only
on its channel and its byte: :class:`PixelLookup` computes those 3 × 256 values once, with the
processor's own ``rescale`` and ``normalize``, and turns cached uint8 crops into exactly the floats
the processor returns (4× less memory, and the conversion runs on the evaluation device).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hf_merge.errors import EvaluationError

PIL_BACKEND = "pil"
FAST_BACKEND = "torchvision"


@dataclass(frozen=True)
class Preprocessing:
    """The image processor an evaluation uses, and how the card names it.

    Attributes:
        processor: The image processor (called as ``processor(images=..., return_tensors="pt")``).
        backend: ``"pil"`` (the reference) or ``"torchvision"`` (``--fast-preprocessing``).
        name: Class name of ``processor``.
    """

    processor: Any
    backend: str
    name: str

    @property
    def label(self) -> str:
        """One phrase for the card and the logs, e.g. ``CLIPImageProcessorPil (PIL, as the reference)``."""
        kind = "PIL, as the reference" if self.backend == PIL_BACKEND else "torchvision, --fast-preprocessing"
        return f"{self.name} ({kind})"

    def config(self) -> dict[str, Any]:
        """Everything that decides the pixels: class, backend and the processor's settings."""
        settings = json.loads(json.dumps(self.processor.to_dict(), sort_keys=True, default=str))
        return {"class": self.name, "backend": self.backend, "settings": settings}

    def fingerprint(self) -> str:
        """SHA-256 of :meth:`config`; part of the pixel cache's key."""
        return hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()


def pin_image_processor(processor: Any, *, fast: bool = False) -> Preprocessing:
    """The image processor of ``processor`` (a ``CLIPProcessor`` or an image processor), pinned.

    CLIP image processors are rebuilt from their settings as the PIL class (``fast=False``) or the
    torchvision class (``fast=True``); any other image processor is used as it is.
    """
    image_processor = getattr(processor, "image_processor", processor)
    if image_processor is None or not hasattr(image_processor, "to_dict"):
        raise EvaluationError("the processor has no image processor; pass a CLIPProcessor")
    if type(image_processor).__name__.startswith("CLIPImageProcessor"):
        cls = _clip_class(fast)
        image_processor = cls.from_dict(image_processor.to_dict())
    backend = _backend(image_processor)
    if fast and backend != FAST_BACKEND:
        raise EvaluationError("--fast-preprocessing needs torchvision's image processor: pip install torchvision")
    if not fast and backend != PIL_BACKEND:
        raise EvaluationError(
            f"{type(image_processor).__name__} is not a PIL image processor; the reference preprocessing needs one"
        )
    return Preprocessing(image_processor, backend, type(image_processor).__name__)


def _clip_class(fast: bool) -> Any:
    import transformers

    # transformers 5 names the PIL class CLIPImageProcessorPil and gives CLIPImageProcessor the
    # torchvision backend (falling back to PIL, with a warning, without torchvision); transformers 4
    # names them CLIPImageProcessor and CLIPImageProcessorFast.
    pil = getattr(transformers, "CLIPImageProcessorPil", None)
    if not fast:
        return pil if pil is not None else transformers.CLIPImageProcessor
    if pil is not None:
        return transformers.CLIPImageProcessor
    return getattr(transformers, "CLIPImageProcessorFast", transformers.CLIPImageProcessor)


def _backend(image_processor: Any) -> str:
    backend = getattr(image_processor, "backend", None)
    if isinstance(backend, str):
        return FAST_BACKEND if backend == "torchvision" else PIL_BACKEND if backend == "pil" else backend
    # transformers 4: the fast classes derive from BaseImageProcessorFast, the others use PIL and numpy.
    names = {cls.__name__ for cls in type(image_processor).__mro__}
    return FAST_BACKEND if "BaseImageProcessorFast" in names else PIL_BACKEND


@dataclass(frozen=True)
class PixelLookup:
    """The float value of every (channel, byte) after the processor's rescale and normalize steps.

    Attributes:
        table: ``(channels, 256)`` float32.
    """

    table: torch.Tensor

    @classmethod
    def of(cls, image_processor: Any, channels: int = 3) -> PixelLookup | None:
        """The lookup of ``image_processor``, or ``None`` when it does not end as CLIP's does."""
        byte_values = np.arange(256, dtype=np.uint8)[None, None, :].repeat(channels, axis=0)  # (C, 1, 256)
        try:
            values: np.ndarray = byte_values
            if getattr(image_processor, "do_rescale", False):
                values = image_processor.rescale(values, image_processor.rescale_factor, input_data_format="channels_first")
            if getattr(image_processor, "do_normalize", False):
                values = image_processor.normalize(
                    values, image_processor.image_mean, image_processor.image_std, input_data_format="channels_first"
                )
        except (AttributeError, TypeError, ValueError):
            return None
        values = np.asarray(values)
        if values.shape != (channels, 1, 256) or values.dtype != np.float32:
            return None
        return cls(torch.from_numpy(np.ascontiguousarray(values[:, 0, :])))

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` uint8 crops (any device) to the processor's float32 pixel values."""
        table = self.table.to(crops.device)
        channels = [table[c][crops[:, c].long()] for c in range(crops.shape[1])]
        return torch.stack(channels, dim=1)


def crops_and_pixels(preprocessing: Preprocessing, images: list[Any]) -> tuple[np.ndarray | None, np.ndarray]:
    """``(uint8 crops, float pixels)`` of ``images``; crops are ``None`` when the processor has no uint8 stage."""
    pixels = process(preprocessing, images, crops=False)
    try:
        crops = process(preprocessing, images, crops=True)
    except (TypeError, ValueError):
        return None, pixels
    return (crops if crops.dtype == np.uint8 and crops.shape == pixels.shape else None), pixels


def process(preprocessing: Preprocessing, images: list[Any], *, crops: bool) -> np.ndarray:
    """The processor's output for ``images``: float pixels, or (``crops``) the uint8 crops before rescaling."""
    options = {"do_rescale": False, "do_normalize": False} if crops else {}
    # "pt", the return type every backend supports; the values are those of the numpy output.
    output = preprocessing.processor(images=images, return_tensors="pt", **options)["pixel_values"]
    if isinstance(output, torch.Tensor):
        output = output.numpy()
    return np.ascontiguousarray(output)
