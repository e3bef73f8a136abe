"""The input transform: how an image file becomes a network input, recorded as plain data.

Every image dataset carries the transform its images went through (:attr:`ClassImages.transform`),
training writes it into each checkpoint (key ``"input_transform"``, a dict of str / int / float / bool),
and ``metaloop predict``, :class:`metaloop.FewShotPredictor`, ``eval`` and ``compare`` use that record,
so the same file gives the same input in training and prediction. File -> uint8 ``[C, S, S]``:

1. the first frame (animated GIF / WebP); transparency flattened onto white;
2. converted to ``"L"`` (``channels = 1``) or ``"RGB"`` (``channels = 3``);
3. resized to ``S x S`` with the ``resize`` filter (aspect ratio not kept), unless already ``S x S``;
4. with ``invert``, ``255 - pixel``: files stored dark-on-light for a model trained light-on-dark.
   Omniglot's PNGs are black ink on white paper and the library trains on white ink on black, and the
   embedded glyphs are drawn that way too, so both record ``invert = True``.

uint8 -> float: ``low + (high - low) * pixel / 255``; every built-in dataset uses ``[0, 1]`` (the
episodes of :func:`metaloop.tasks.episodes.stack_tasks`), with no further mean / std normalisation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from metaloop.data.base import ClassImages

RESIZE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "nearest": Image.Resampling.NEAREST,
}
DARK_ON_LIGHT = ("omniglot", "glyphs")
"""Datasets whose images are light ink on a dark background in training but dark-on-light as files."""
FAR_FROM_TRAINING = 0.3
"""Support images whose mean intensity (in [0, 1]) differs from the training data's by more than this
get a warning from :func:`statistics_warning`."""


@dataclass(frozen=True)
class InputTransform:
    """File -> network input, as in the module docstring.

    Args:
        image_size: ``S``, the side of the square input.
        channels: 1 (grayscale, ``"L"``) or 3 (``"RGB"``).
        invert: ``255 - pixel`` after resizing.
        resize: a key of :data:`RESIZE_FILTERS` (Pillow's filter of that name).
        low, high: the float values of pixels 0 and 255.
        train_mean: mean intensity of the training inputs in ``[0, 1]`` (0 = ``low``, 1 = ``high``);
            statistics, not part of the transform; ``None`` when unknown (a checkpoint of an older
            version).
    """

    image_size: int
    channels: int
    invert: bool = False
    resize: str = "lanczos"
    low: float = 0.0
    high: float = 1.0
    train_mean: float | None = None

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"image_size must be a positive int, got {size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if self.resize not in RESIZE_FILTERS:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_FILTERS)}, got {self.resize!r}")
        if not self.low < self.high:
            raise ValueError(f"the value range needs low < high, got low={self.low}, high={self.high}")

    # ----- as data --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (loads with ``torch.load(weights_only=True)``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> InputTransform:
        """The inverse of :meth:`to_dict`; unknown keys are an error (a newer metaloop wrote them)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - fields)
        if unknown:
            raise ValueError(
                f"the checkpoint's input transform has keys this metaloop does not know "
                f"({', '.join(unknown)}); it was written by a newer version: upgrade metaloop to use it"
            )
        return cls(**record)

    def same_input(self, other: InputTransform) -> bool:
        """Whether both turn a file into the same input (``train_mean`` aside)."""
        return dataclasses.replace(self, train_mean=None) == dataclasses.replace(other, train_mean=None)

    def describe(self) -> str:
        """``"28x28 grayscale, lanczos resize, inverted, values in [0, 1]"``."""
        colour = "grayscale" if self.channels == 1 else "RGB"
        polarity = ", inverted (255 - pixel)" if self.invert else ""
        return (
            f"{self.image_size}x{self.image_size} {colour}, {self.resize} resize{polarity}, "
            f"values in [{self.low:g}, {self.high:g}]"
        )

    # ----- applying it ----------------------------------------------------------------------------
    def from_pil(self, image: Image.Image) -> np.ndarray:
        """uint8 ``[C, S, S]`` of an opened Pillow image (steps 1-4 of the module docstring)."""
        image.seek(0)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("L" if self.channels == 1 else "RGB")
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, RESIZE_FILTERS[self.resize])
        pixels = np.asarray(image, dtype=np.uint8)
        pixels = pixels[None] if self.channels == 1 else pixels.transpose(2, 0, 1)
        return 255 - pixels if self.invert else pixels

    def load_file(self, path: str | os.PathLike) -> np.ndarray:
        """uint8 ``[C, S, S]`` of one image file; ``ValueError`` naming a file that cannot be read."""
        try:
            with Image.open(path) as image:
                return self.from_pil(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL raises UnidentifiedImageError (an OSError) for non-images and OSError/SyntaxError for
            # truncated or malformed files.
            raise ValueError(f"cannot read image {Path(path)}: {type(e).__name__}: {e}") from e

    def load_files(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """uint8 ``[N, C, S, S]`` of image files, in order."""
        out = np.empty((len(paths), self.channels, self.image_size, self.image_size), dtype=np.uint8)
        for i, path in enumerate(paths):
            out[i] = self.load_file(path)
        return torch.from_numpy(out)

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """float32 network input of uint8 ``images`` (any shape): ``low + (high - low) * pixel / 255``."""
        x = images.float().div_(255.0)
        if (self.low, self.high) != (0.0, 1.0):
            x = x.mul_(self.high - self.low).add_(self.low)
        return x

    def stored(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images of this transform's output as they would be stored in files (the inverse of
        step 4; sizes and channels unchanged): ``255 - pixel`` when ``invert``."""
        return 255 - images if self.invert else images

    def unit_mean(self, inputs: torch.Tensor) -> float:
        """Mean intensity in ``[0, 1]`` (0 = ``low``) of float network inputs."""
        return (float(inputs.double().mean()) - self.low) / (self.high - self.low)


def dataset_transform(
    name: str, image_size: int, channels: int = 1, resize: str = "lanczos"
) -> InputTransform:
    """The transform of built-in dataset ``name`` (the first of a mixture ``"omniglot+glyphs"``):
    Omniglot and glyphs are inverted (see the module docstring), image folders and miniImageNet not."""
    return InputTransform(image_size, channels, invert=name.split("+")[0] in DARK_ON_LIGHT, resize=resize)


def training_record(datasets: Sequence[ClassImages]) -> dict[str, Any] | None:
    """The checkpoint entry for a model trained on ``datasets`` (the parts of a mixture): the first
    one's transform, with ``train_mean`` the mean intensity over all of them (each weighted equally, as
    tasks are drawn from each equally often). ``None`` without datasets (regression) or if the first
    carries no transform."""
    transform = datasets[0].transform if datasets else None
    if transform is None:
        return None
    mean = sum(d.mean_intensity for d in datasets) / len(datasets)
    return dataclasses.replace(transform, train_mean=round(mean, 6)).to_dict()


def checkpoint_transform(state: dict[str, Any]) -> InputTransform | None:
    """The input transform of a checkpoint; ``None`` for a regression model (no images).

    A checkpoint written before transforms were recorded gets the one its training data went
    through, derived from its config (``data.name``, ``data.image_size``) and its learner's
    ``in_channels``, exactly as the dataset loaders of that version treated them; its
    ``train_mean`` is unknown.
    """
    if "input_transform" in state:
        record = state["input_transform"]
        return None if record is None else InputTransform.from_dict(record)
    data = state["config"]["data"]
    if data["name"] == "sinusoid":
        return None
    channels = int(state["hparams"].get("in_channels", 1))
    return dataset_transform(data["name"], int(data["image_size"]), channels, data.get("resize", "lanczos"))


def check_same_input(model: InputTransform | None, data: InputTransform | None, what: str) -> None:
    """Raise ``ValueError`` if ``data`` (the transform of the images a model is tested on) does not
    give the inputs the ``model`` was trained on; ``what`` names the model in the message."""
    if model is None or data is None or model.same_input(data):
        return
    raise ValueError(
        f"{what} was trained on images converted as {model.describe()}, but these test images are "
        f"converted as {data.describe()}; test it on data prepared like its training data"
    )


def statistics_warning(transform: InputTransform, support_mean: float) -> str | None:
    """One line saying that support images whose mean intensity (in ``[0, 1]``, after ``transform``)
    is far from the training data's (:data:`FAR_FROM_TRAINING`) and what to do, else ``None``."""
    trained = transform.train_mean
    if trained is None or abs(support_mean - trained) <= FAR_FROM_TRAINING:
        return None
    seen = f"the support images' mean intensity is {support_mean:.2f} (0 black, 1 white) after this model's "
    seen += f"input transform, its training images' {trained:.2f}"
    if abs((1 - support_mean) - trained) < abs(support_mean - trained):
        flag = "--no-invert" if transform.invert else "--invert"
        return (
            f"{seen}: they look inverted relative to the training images (dark-on-light for a model trained "
            f"on light-on-dark, or the reverse); if so, pass {flag} "
            f"(Python: FewShotPredictor.from_run(..., invert={not transform.invert}))"
        )
    brighter = "brighter" if support_mean > trained else "darker"
    return (
        f"{seen}: they are much {brighter} than the training data, so predictions may be poor; use images "
        "prepared like the training data"
    )


__all__ = [
    "DARK_ON_LIGHT",
    "FAR_FROM_TRAINING",
    "RESIZE_FILTERS",
    "InputTransform",
    "check_same_input",
    "checkpoint_transform",
    "dataset_transform",
    "statistics_warning",
    "training_record",
]
