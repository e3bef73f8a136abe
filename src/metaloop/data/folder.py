"""A user's images as a few-shot dataset: ``root/<class_name>/<image files>``.

Every sub-folder of ``root`` is a class (sorted by name); its images are the files with extension
``.png .jpg .jpeg .bmp .gif .webp`` (any case), sorted by name. Names starting with ``.`` are ignored
(``.DS_Store``, macOS ``._x.png`` forks), as are plain files directly in ``root``.

Images are converted by :class:`metaloop.data.transform.InputTransform` (recorded with the dataset
and with every model trained on it): pixels are taken as they are (unlike Omniglot, nothing is
inverted unless ``invert=True``); each image is converted to "L" (``channels=1``) or "RGB"
(``channels=3``) after flattening any transparency onto white, then resized to
``image_size x image_size`` with Lanczos (or the ``resize`` filter), without keeping the aspect ratio
(crop or pad beforehand if that matters). Animated GIF/WebP files give their first frame.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from metaloop.data.base import ClassImages
from metaloop.data.transform import InputTransform

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_image_files(
    paths: Sequence[str | os.PathLike],
    image_size: int = 28,
    channels: int = 1,
    invert: bool = False,
) -> torch.Tensor:
    """Read image files into uint8 ``[N, C, S, S]`` (same conversion as :func:`load_image_folder`:
    :meth:`InputTransform.load_files <metaloop.data.transform.InputTransform.load_files>`).

    Raises ``ValueError`` naming the first file that cannot be read.
    """
    return InputTransform(image_size, channels, invert).load_files(paths)


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_image_folder(root: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """``[(class_name, [image paths, sorted]), ...]`` sorted by class name, with the checks of
    :func:`load_image_folder` (root exists, at least 2 classes, none empty)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder; expected root/<class_name>/<images>")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(
            f"{root} has no class folders; expected root/<class_name>/<images> "
            f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    classes = []
    for d in class_dirs:
        files = sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name)
        if not files:
            raise ValueError(
                f"class folder {d} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}, any case); "
                "remove the folder or add images"
            )
        classes.append((d.name, files))
    if len(classes) < 2:
        raise ValueError(f"{root} has {len(classes)} class folder; few-shot tasks need at least 2 classes")
    return classes


def load_image_folder(
    root: str | os.PathLike,
    image_size: int = 28,
    channels: int = 1,
    name: str | None = None,
    invert: bool = False,
    resize: str = "lanczos",
) -> ClassImages:
    """Load ``root/<class_name>/*.{png,jpg,jpeg,bmp,gif,webp}`` as uint8 ``[N, C, S, S]`` by class.

    Args:
        root: folder with one sub-folder per class; class names are the sub-folder names.
        image_size: ``S``; every image is resized to ``S x S``.
        channels: 1 ("L") or 3 ("RGB").
        name: dataset name for messages; default ``"folder/<root name>"``.
        invert: store ``255 - pixel`` (use for dark ink on light paper to match Omniglot's ink = 255).
        resize: the Pillow filter of the resize, a key of
            :data:`~metaloop.data.transform.RESIZE_FILTERS`.

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is missing or not a folder.
        ValueError: no class folders, a class without images, fewer than 2 classes, or an unreadable
            image (named in the message).
    """
    transform = InputTransform(image_size, channels, invert, resize)
    classes = list_image_folder(root)
    per_class = [transform.load_files(files) for _, files in classes]
    name = name or f"folder/{Path(root).expanduser().name}"
    return ClassImages.from_classes(per_class, [c for c, _ in classes], name, transform)
