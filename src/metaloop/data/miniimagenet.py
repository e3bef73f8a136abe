"""miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017), from your images.

Files, under ``<data_dir>/miniimagenet/`` (``data_dir``: ``$METALOOP_DATA`` or ``~/.cache/metaloop``)::

    splits/ravi/{train,val,test}.csv    header ``filename,label``, then one image per line
    images/                             the images, in either layout below

Ravi & Larochelle's files list 64 / 16 / 20 classes (ImageNet WordNet ids such as ``n01532829``) of
600 images each. metaloop neither ships nor downloads them: copy them from GitHub,
twitter-research/meta-learning-lstm (``data/miniImagenet/``) or jakesnell/prototypical-networks
(``data/miniImagenet/splits/ravi/``). Any CSV of the same form works, for a class split of your own.

Each image named in a CSV is looked up in two layouts (the classes of one split may mix them):

* flat: ``images/<filename>``, exactly as named in the CSV (``images/n0153282900000005.jpg``), the
  layout of the usual ready-made miniImageNet image folders;
* ImageNet: ``images/<wnid>/<wnid>_<n>.JPEG``, the ILSVRC-2012 training folder of each class (a
  symbolic link ``images -> /path/to/ILSVRC2012/train`` works). A CSV name ``<wnid><r as 8 digits>.jpg``
  stands for the ``r``-th (from 1) of that class's training images ordered by the number ``n``, the
  rule by which yaoyao-liu/mini-imagenet-tools builds miniImageNet from ImageNet. This holds only if
  the class folder holds every training image of that class, unrenamed: a missing or extra
  ``<wnid>_<n>.JPEG`` file silently shifts every later image.

Images: uint8 ``[3, S, S]`` (``S = 84`` in the papers), converted as :mod:`metaloop.data.folder`
converts (transparency flattened onto white, "RGB", Lanczos resize to ``S x S`` without keeping the
aspect ratio), so ``metaloop predict`` converts new images the same way.

The first load of a split decodes its images once and caches them in
``default_cache_dir(data_dir)/miniimagenet-<split>-<S>-<key>.pt``. The key is a sha256 of the CSV's
bytes, ``S``, and the path, size and modification time of every image, so editing the CSV, replacing
an image or changing the layout builds a new cache.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from metaloop.data.base import ClassImages, default_cache_dir, default_data_dir
from metaloop.data.transform import InputTransform, dataset_transform
from metaloop.fileio import atomic_torch_save

MINIIMAGENET_SPLITS = ("train", "val", "test")
SPLITS_DIR = "splits/ravi"
SHOW_MISSING = 5  # missing image names quoted in an error message

_CACHE_FORMAT = 1
_CSV_NAME_RE = re.compile(r"^(n\d{8})(\d{8})\.jpg$")
_IMAGENET_NAME_RE = re.compile(r"^(n\d{8})_(\d+)\.jpe?g$", re.IGNORECASE)
_SOURCES = (
    "GitHub: twitter-research/meta-learning-lstm (data/miniImagenet/) or "
    "jakesnell/prototypical-networks (data/miniImagenet/splits/ravi/)"
)


class MiniImageNetError(ValueError):
    """A miniImageNet split file is malformed or one of its images cannot be decoded."""


def _root(data_dir: str | os.PathLike | None) -> Path:
    return (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / "miniimagenet"


def _missing_csv_message(root: Path, split: str) -> str:
    missing = [root / SPLITS_DIR / f"{s}.csv" for s in MINIIMAGENET_SPLITS]
    lines = [f"miniImageNet split file for {split!r} not found. Missing:"]
    lines += [f"  {path}" for path in missing if not path.is_file()]
    lines.append(
        f"Put the Ravi & Larochelle split files there (header 'filename,label'); they are on {_SOURCES}. "
        "Or point data.data_dir (or METALOOP_DATA) at a folder holding miniimagenet/splits/ravi/."
    )
    return "\n".join(lines)


def _parse_split_csv(data: bytes, path: Path) -> list[tuple[str, list[str]]]:
    """``[(label, [file names in file order]), ...]`` sorted by label, from ``filename,label`` CSV bytes."""
    fix = f"Fix the file, or replace it with the original split file ({_SOURCES})."
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise MiniImageNetError(f"cannot read {path} as CSV: {e}. {fix}") from e
    header = [cell.strip() for cell in rows[0]] if rows else []
    if header != ["filename", "label"]:
        got = ",".join(header)
        raise MiniImageNetError(f"{path}: the first line must be 'filename,label', got {got!r}. {fix}")
    classes: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        cells = [cell.strip() for cell in row]
        if len(cells) != 2 or not all(cells):
            got = ",".join(row)
            raise MiniImageNetError(f"{path}, line {line}: expected 'filename,label', got {got!r}. {fix}")
        filename, label = cells
        if Path(filename).name != filename or filename.startswith(".") or "\\" in filename:
            raise MiniImageNetError(f"{path}, line {line}: {filename!r} is not a plain file name. {fix}")
        if filename in seen:
            raise MiniImageNetError(f"{path}, line {line}: {filename} is listed twice. {fix}")
        seen.add(filename)
        classes.setdefault(label, []).append(filename)
    if len(classes) < 2:
        raise MiniImageNetError(
            f"{path} lists {len(classes)} class(es); few-shot tasks need at least 2. {fix}"
        )
    return sorted(classes.items())


def _imagenet_class_files(folder: Path) -> list[Path]:
    """The ``<wnid>_<n>.JPEG`` files of one ImageNet class folder, ordered by ``n`` as a number."""
    numbered = []
    for name in os.listdir(folder):
        match = _IMAGENET_NAME_RE.match(name)
        if match and match.group(1) == folder.name:
            numbered.append((int(match.group(2)), name))
    return [folder / name for _, name in sorted(numbered)]


def resolve_images(
    images_dir: Path, classes: list[tuple[str, list[str]]]
) -> tuple[list[list[Path]], list[str]]:
    """Find every CSV image in the flat or the ImageNet layout (see the module docstring).

    Args:
        images_dir: ``<data_dir>/miniimagenet/images``.
        classes: ``[(wnid, [CSV file names]), ...]``.

    Returns:
        The image paths of each class, in CSV order, and the CSV file names found in neither layout.
    """
    flat = set(os.listdir(images_dir)) if images_dir.is_dir() else set()
    paths: list[list[Path]] = []
    missing: list[str] = []
    for label, filenames in classes:
        class_dir = images_dir / label
        ranked = _imagenet_class_files(class_dir) if class_dir.is_dir() else []
        found = []
        for filename in filenames:
            match = _CSV_NAME_RE.match(filename)
            rank = int(match.group(2)) if match and match.group(1) == label else 0
            if filename in flat:
                found.append(images_dir / filename)
            elif 1 <= rank <= len(ranked):
                found.append(ranked[rank - 1])
            else:
                missing.append(filename)
        paths.append(found)
    return paths, missing


def _missing_images_message(csv_path: Path, images_dir: Path, missing: list[str], total: int) -> str:
    shown = missing[:SHOW_MISSING]
    absent = "" if images_dir.is_dir() else " (that folder does not exist)"
    return (
        f"{len(missing):,} of the {total:,} miniImageNet images listed in {csv_path} are missing from "
        f"{images_dir}{absent}; the first {len(shown)}: {', '.join(shown)}.\n"
        f"Each one is expected as {images_dir}/<filename> (flat, e.g. {images_dir / missing[0]}), or, "
        f"for a name <wnid><r as 8 digits>.jpg, as the r-th image of the ImageNet training folder "
        f"{images_dir}/<wnid>/<wnid>_<n>.JPEG ordered by n, which must then hold all of that class's "
        "ILSVRC-2012 training images.\n"
        f"Fix: put the miniImageNet images in {images_dir}, or link it to your ILSVRC-2012 training "
        f"folder (ln -s /path/to/ILSVRC2012/train {images_dir}); or remove the missing lines from the CSV."
    )


def _cache_key(csv_data: bytes, images_dir: Path, paths: list[list[Path]], image_size: int) -> str:
    """sha256 of the CSV bytes, ``S``, and each image's path (relative to ``images_dir``), size and mtime."""
    digest = hashlib.sha256(f"miniimagenet cache {_CACHE_FORMAT}, size {image_size}\n".encode())
    digest.update(csv_data)
    for path in (p for class_paths in paths for p in class_paths):
        try:
            stat = path.stat()
        except OSError as e:  # a dangling symbolic link, or a permission problem
            raise FileNotFoundError(f"cannot read miniImageNet image {path}: {e}") from e
        digest.update(f"\n{path.relative_to(images_dir)} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _read_cache(
    path: Path, key: str, class_names: list[str], total: int, image_size: int
) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
        images = payload["images"]
        ok = (
            payload["format"] == _CACHE_FORMAT
            and payload["key"] == key
            and payload["class_names"] == class_names
            and isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and tuple(images.shape) == (total, 3, image_size, image_size)
        )
        if ok:
            return images
        reason = "unexpected contents"
    except Exception as e:  # any unreadable cache is rebuilt
        reason = f"{type(e).__name__}: {e}"
    warnings.warn(f"miniImageNet cache {path} is unusable ({reason}); rebuilding it", stacklevel=3)
    return None


def _decode(paths: list[list[Path]], transform: InputTransform, csv_path: Path, split: str) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]``: every image, class after class, in CSV order."""
    total = sum(len(class_paths) for class_paths in paths)
    size = transform.image_size
    images = torch.empty((total, 3, size, size), dtype=torch.uint8)
    start = 0
    desc = f"miniImageNet {split}: decoding once, then cached"
    with tqdm(total=total, desc=desc, unit="image", disable=None, leave=False) as bar:
        for class_paths in paths:
            try:
                images[start : start + len(class_paths)] = transform.load_files(class_paths)
            except ValueError as e:
                raise MiniImageNetError(
                    f"{e}\nFix: replace that file with a readable copy (copy or extract it again), "
                    f"or remove its line from {csv_path}."
                ) from e
            start += len(class_paths)
            bar.update(len(class_paths))
    return images


def load_miniimagenet(
    split: str = "train",
    image_size: int = 84,
    data_dir: str | os.PathLike | None = None,
) -> ClassImages:
    """Load one miniImageNet split as uint8 ``[N, 3, S, S]`` RGB images grouped by class.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``: ``splits/ravi/<split>.csv``.
        image_size: ``S``, the side of the square images.
        data_dir: folder holding ``miniimagenet/``; default ``$METALOOP_DATA`` or ``~/.cache/metaloop``.

    Classes are the CSV's labels (WordNet ids), sorted; the images of a class keep the CSV's order.

    Raises:
        FileNotFoundError: the split's CSV is missing (the message lists every missing split file and
            where to get them), or images are missing (how many, the first few names, where they
            were looked for).
        MiniImageNetError: a malformed CSV, or an image that cannot be decoded (named in the message).
    """
    if split not in MINIIMAGENET_SPLITS:
        valid = ", ".join(MINIIMAGENET_SPLITS)
        raise ValueError(f"unknown miniImageNet split {split!r}; valid splits: {valid}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    root = _root(data_dir)
    csv_path = root / SPLITS_DIR / f"{split}.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(_missing_csv_message(root, split))
    csv_data = csv_path.read_bytes()
    classes = _parse_split_csv(csv_data, csv_path)
    images_dir = root / "images"
    paths, missing = resolve_images(images_dir, classes)
    if missing:
        total = sum(len(filenames) for _, filenames in classes)
        raise FileNotFoundError(_missing_images_message(csv_path, images_dir, missing, total))

    key = _cache_key(csv_data, images_dir, paths, image_size)
    cache = default_cache_dir(root.parent) / f"miniimagenet-{split}-{image_size}-{key[:16]}.pt"
    class_names = [label for label, _ in classes]
    sizes = [len(class_paths) for class_paths in paths]
    transform = dataset_transform("miniimagenet", image_size, channels=3)
    images = _read_cache(cache, key, class_names, sum(sizes), image_size)
    if images is None:
        images = _decode(paths, transform, csv_path, split)
        payload = {"format": _CACHE_FORMAT, "key": key, "class_names": class_names, "images": images}
        try:
            atomic_torch_save(payload, cache)
        except OSError as e:
            warnings.warn(
                f"could not write the miniImageNet cache {cache} ({e}); continuing without it", stacklevel=2
            )
    offsets = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)
    return ClassImages(images, offsets, class_names, f"miniimagenet/{split}", transform)


def _is_empty(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def miniimagenet_status(data_dir: str | os.PathLike | None = None) -> str:
    """``"present"``, or ``"absent (...)"`` naming what is missing: the three split files and a
    non-empty ``images/`` folder. Images themselves are checked when a split is loaded."""
    root = _root(data_dir)
    csv_files = [f"{SPLITS_DIR}/{s}.csv" for s in MINIIMAGENET_SPLITS]
    missing = [rel for rel in csv_files if not (root / rel).is_file()]
    images_dir = root / "images"
    if not images_dir.is_dir() or _is_empty(images_dir):
        missing.append("images/")
    if not missing:
        return "present"
    return f"absent (no {', '.join(missing)} in {root}; see 'miniImageNet' in the README)"


__all__: list[str] = [
    "MINIIMAGENET_SPLITS",
    "MiniImageNetError",
    "load_miniimagenet",
    "miniimagenet_status",
    "resolve_images",
]
