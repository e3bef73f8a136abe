"""Shared fixtures: small synthetic datasets, so most tests need neither downloads nor fonts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from metaloop.data.base import ClassImages


def make_class_images(
    num_classes: int = 12, per_class: int = 10, size: int = 28, seed: int = 0
) -> ClassImages:
    """Each class is a random blob pattern; its examples are noisy, shifted copies of it."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(num_classes, 1, 1, 7, 7, generator=g) > 0.5).float()
    patterns = torch.nn.functional.interpolate(coarse.flatten(0, 1), size=(size, size), mode="nearest")
    examples = patterns.unsqueeze(1).expand(-1, per_class, -1, -1, -1).clone()  # [K, N, 1, S, S]
    shifts = torch.randint(-2, 3, (num_classes, per_class, 2), generator=g)
    for k in range(num_classes):
        for i in range(per_class):
            examples[k, i] = torch.roll(examples[k, i], tuple(shifts[k, i].tolist()), dims=(-2, -1))
    flips = torch.rand(examples.shape, generator=g) < 0.1
    examples = torch.where(flips, 1 - examples, examples)
    images = (examples * 255).to(torch.uint8).flatten(0, 1)
    offsets = torch.arange(0, num_classes * per_class + 1, per_class)
    return ClassImages(images, offsets, [f"class{k:02d}" for k in range(num_classes)], "synthetic")


def write_image_folder(root: Path, dataset: ClassImages) -> Path:
    """Write ``dataset`` as ``root/<class>/<i>.png``."""
    for k, name in enumerate(dataset.class_names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(dataset.class_images(k)):
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def class_images() -> ClassImages:
    return make_class_images()


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of 30 synthetic classes x 10 images (folder splits: 21 / 3 / 6 classes)."""
    return write_image_folder(tmp_path_factory.mktemp("folder"), make_class_images(num_classes=30, seed=1))
