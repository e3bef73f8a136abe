"""Datasets by name: ``load_dataset(name, split, ...)`` -> ClassImages, for the names below.

* ``"omniglot"``: :func:`metaloop.data.omniglot.load_omniglot`; splits ``train val test trainval
  background evaluation nichol-train nichol-test``; ``seed`` is ignored (the splits are fixed).
* ``"glyphs"``: the embedded synthetic glyphs, :func:`metaloop.data.glyphs.load_glyphs`.
* ``"folder"``: a user's ``root/<class_name>/<images>`` (:func:`metaloop.data.folder.load_image_folder`).
  ``split="all"`` gives every class. ``"train"``/``"val"``/``"test"`` split the classes, never the
  images of one class: the class names are sorted, shuffled with ``torch.Generator().manual_seed(seed)``,
  and cut into 70% / 10% / 20% (rounded; test takes the rest). The same folder and seed always give
  the same split, and the three are disjoint.
* ``"miniimagenet"``: :func:`metaloop.data.miniimagenet.load_miniimagenet`, RGB; splits ``train val
  test`` (Ravi & Larochelle's CSV files, read from ``<data_dir>/miniimagenet/splits/ravi/``);
  ``seed`` is ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from metaloop.data.base import ClassImages, default_cache_dir, default_data_dir

DATASETS = ("omniglot", "glyphs", "folder", "miniimagenet")
FOLDER_SPLITS = ("train", "val", "test", "all")
FOLDER_FRACTIONS = (0.7, 0.1, 0.2)


def folder_split_classes(num_classes: int, split: str, seed: int = 0) -> list[int]:
    """Indices (into the sorted classes) of ``split`` under the 70/10/20 class split described above."""
    if split not in FOLDER_SPLITS:
        raise ValueError(f"unknown folder split {split!r}; valid splits: {', '.join(FOLDER_SPLITS)}")
    if split == "all":
        return list(range(num_classes))
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(FOLDER_FRACTIONS[0] * num_classes + 0.5)
    n_val = int(FOLDER_FRACTIONS[1] * num_classes + 0.5)
    bounds = {
        "train": (0, n_train),
        "val": (n_train, n_train + n_val),
        "test": (n_train + n_val, num_classes),
    }
    lo, hi = bounds[split]
    return sorted(order[lo:hi])


def load_dataset(
    name: str,
    split: str = "train",
    *,
    image_size: int = 28,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    channels: int = 1,
    resize: str = "lanczos",
) -> ClassImages:
    """Load dataset ``name`` (one of :data:`DATASETS`) as uint8 ``[N, C, S, S]`` images grouped by class.

    Args:
        name: ``"omniglot"``, ``"glyphs"``, ``"folder"`` or ``"miniimagenet"``.
        split: dataset-specific (see the module docstring).
        image_size: ``S``.
        data_dir: where downloaded/embedded data lives (default ``$METALOOP_DATA`` or ``~/.cache/metaloop``).
        seed: glyph generation seed; for ``"folder"``, the seed of the class split.
        root: the image folder, required for ``"folder"``.
        channels: 1 or 3, only for ``"folder"`` (Omniglot and glyphs are grayscale, miniImageNet is RGB).
        resize: the Pillow filter image files are resized with (a key of
            :data:`~metaloop.data.transform.RESIZE_FILTERS`), only for ``"omniglot"`` and ``"folder"``:
            the glyphs are drawn at their size and miniImageNet's cache holds Lanczos images.
    """
    if resize != "lanczos" and name in ("glyphs", "miniimagenet"):
        raise ValueError(
            f"resize={resize!r} is for the omniglot and folder datasets; {name} images are "
            "always resized with lanczos: leave data.resize at lanczos"
        )
    if name == "omniglot":
        from metaloop.data.omniglot import load_omniglot

        return load_omniglot(split, image_size=image_size, data_dir=data_dir, resize=resize)
    if name == "glyphs":
        from metaloop.data.glyphs import load_glyphs

        return load_glyphs(split, image_size=image_size, seed=seed, data_dir=data_dir)
    if name == "folder":
        from metaloop.data.folder import list_image_folder, load_image_folder
        from metaloop.data.transform import InputTransform

        if root is None:
            raise ValueError('load_dataset("folder", ...) needs root=<folder with one sub-folder per class>')
        if split not in FOLDER_SPLITS:
            raise ValueError(f"unknown folder split {split!r}; valid splits: {', '.join(FOLDER_SPLITS)}")
        label = f"folder/{Path(root).expanduser().name}/{split}"
        if split == "all":
            return load_image_folder(
                root, image_size=image_size, channels=channels, name=label, resize=resize
            )
        classes = list_image_folder(root)
        ids = folder_split_classes(len(classes), split, seed)
        if len(ids) < 2:
            raise ValueError(
                f"{root}: the {split!r} split of {len(classes)} classes (70/10/20) has {len(ids)} "
                "class(es); few-shot tasks need at least 2. Add classes or use split='all'."
            )

        transform = InputTransform(image_size, channels, resize=resize)
        per_class = [transform.load_files(classes[i][1]) for i in ids]
        return ClassImages.from_classes(per_class, [classes[i][0] for i in ids], label, transform)
    if name == "miniimagenet":
        from metaloop.data.miniimagenet import load_miniimagenet

        return load_miniimagenet(split, image_size=image_size, data_dir=data_dir)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


__all__ = [
    "DATASETS",
    "ClassImages",
    "default_cache_dir",
    "default_data_dir",
    "folder_split_classes",
    "load_dataset",
]
