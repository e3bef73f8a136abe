"""The bottom floor: labelled images grouped by class, held in memory as uint8.

Every image dataset in metaloop (Omniglot, the embedded glyphs, a user's folder) is a
:class:`ClassImages`. Episode samplers only ever index into it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from metaloop.data.transform import InputTransform


class ClassImages:
    """Images grouped by class.

    Args:
        images: uint8 ``[N, C, H, W]``; the examples of class ``k`` are rows
            ``offsets[k]:offsets[k + 1]``.
        offsets: int64 ``[K + 1]``, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == N``.
        class_names: ``K`` names, one per class, unique.
        name: a short description used in error messages (``"omniglot/train"``).
        transform: how the images were made from files (:mod:`metaloop.data.transform`); ``None``
            for images that come from no file format (synthetic test data).
    """

    def __init__(
        self,
        images: torch.Tensor,
        offsets: torch.Tensor,
        class_names: Sequence[str],
        name: str = "dataset",
        transform: InputTransform | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"{name}: images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        offsets = torch.as_tensor(offsets, dtype=torch.int64)
        if offsets.dim() != 1 or offsets.numel() != len(class_names) + 1:
            raise ValueError(
                f"{name}: offsets must have K+1 = {len(class_names) + 1} entries, got {offsets.numel()}"
            )
        if int(offsets[0]) != 0 or int(offsets[-1]) != images.shape[0]:
            raise ValueError(f"{name}: offsets must start at 0 and end at N = {images.shape[0]}")
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"{name}: offsets must be non-decreasing")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"{name}: class names must be unique")
        self.images = images
        self.offsets = offsets
        self.class_names = list(class_names)
        self.name = name
        self.transform = transform

    @classmethod
    def from_classes(
        cls,
        per_class: Sequence[torch.Tensor],
        class_names: Sequence[str],
        name: str = "dataset",
        transform: InputTransform | None = None,
    ) -> ClassImages:
        """Build from one uint8 ``[n_k, C, H, W]`` tensor per class."""
        if len(per_class) != len(class_names):
            raise ValueError(f"{name}: {len(per_class)} image groups but {len(class_names)} class names")
        if not per_class:
            raise ValueError(f"{name}: no classes")
        sizes = torch.tensor([0] + [t.shape[0] for t in per_class], dtype=torch.int64)
        return cls(torch.cat(list(per_class)), sizes.cumsum(0), class_names, name, transform)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_sizes(self) -> torch.Tensor:
        """int64 ``[K]``: number of examples of each class."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @functools.cached_property
    def mean_intensity(self) -> float:
        """Mean pixel over all images, in [0, 1] (pixel / 255)."""
        total = int(self.images.numpy().sum(dtype=np.uint64))  # numpy: 0.1 s on Omniglot train, torch 1.7 s
        return total / (255.0 * max(self.images.numel(), 1))

    def __len__(self) -> int:
        return self.images.shape[0]

    def class_images(self, k: int) -> torch.Tensor:
        """uint8 ``[n_k, C, H, W]``: the examples of class ``k``."""
        return self.images[self.offsets[k] : self.offsets[k + 1]]

    def subset(self, class_ids: Sequence[int], name: str | None = None) -> ClassImages:
        """A new dataset holding only ``class_ids`` (in that order)."""
        return ClassImages.from_classes(
            [self.class_images(k) for k in class_ids],
            [self.class_names[k] for k in class_ids],
            name or self.name,
            self.transform,
        )

    def __repr__(self) -> str:
        sizes = self.class_sizes
        return (
            f"ClassImages({self.name!r}, classes={self.num_classes}, images={len(self)}, "
            f"shape={self.image_shape}, per_class={int(sizes.min())}..{int(sizes.max())})"
        )


def default_data_dir() -> Path:
    """Where datasets live: ``$METALOOP_DATA`` if set, else ``~/.cache/metaloop``."""
    env = os.environ.get("METALOOP_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metaloop"


def default_cache_dir(data_dir: Path) -> Path:
    """Where decoded arrays are cached: ``$METALOOP_CACHE`` if set, else ``<data_dir>/cache``."""
    env = os.environ.get("METALOOP_CACHE")
    return Path(env).expanduser() if env else Path(data_dir) / "cache"
