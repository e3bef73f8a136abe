"""Omniglot (Lake et al. 2015) read straight from the official zips, with the Vinyals splits.

Files, under ``<data_dir>/omniglot/`` (``data_dir`` defaults to ``$METALOOP_DATA`` or ``~/.cache/metaloop``)::

    images_background.zip    30 alphabets, 964 characters, 20 drawers each
    images_evaluation.zip    20 alphabets, 659 characters, 20 drawers each
    splits/vinyals/{train,val,test,trainval}.txt

Splits:

* ``"train"`` (4,112 classes), ``"val"`` (688), ``"test"`` (1,692), ``"trainval"`` (4,800): Vinyals et al.
  (2016) as used by Prototypical Networks. Each line ``Alphabet/characterNN/rotDDD`` is a class of its
  own: the character's 20 images rotated by DDD degrees **counter-clockwise** (as displayed, row 0 at
  the top), i.e. ``torch.rot90(x, DDD // 90, dims=(-2, -1))``, the same direction as PIL's
  ``Image.rotate(DDD)`` used by Snell et al.
* ``"background"`` (964 classes) and ``"evaluation"`` (659): Lake's own split, no rotations.
* ``"nichol-train"`` (4,800 classes) and ``"nichol-test"`` (423): the split of Nichol et al.'s Reptile
  code (``run_omniglot.py`` of openai/supervised-reptile, seed 0): the 1,623 characters in sorted
  order (alphabet, then character) shuffled by Python's ``random.Random(0)``; the first 1,200, each in
  its four rotations, train, and the other 423, unrotated, test. Test characters share alphabets
  with training ones, unlike in the Vinyals split. Class names as in the Vinyals splits.

Images: uint8 ``[1, S, S]``, ink = 255 and background = 0. Each 105x105 1-bit PNG is converted to
"L", resized with Lanczos (Pillow's former ANTIALIAS; ``resize="nearest"`` or another Pillow filter
on request) and inverted, by the :class:`~metaloop.data.transform.InputTransform` that models trained
on it record, so ``metaloop predict`` reads the same PNG into the same array. Snell's loader resizes
the 1-bit image, which Pillow always does with nearest neighbour: its images are ``resize="nearest"``
ones, binary (0 or 255). It also transposes every image, which only mirrors the task.

The first load decodes all 32,460 images once (unrotated) and caches them in
``default_cache_dir(data_dir)/omniglot-<S>-<hash>.pt`` (``omniglot-<S>-<filter>-<hash>.pt`` for a
filter other than Lanczos), keyed by the sha256 of both zips; later loads
read that file. Files already on disk are checked for structure (alphabet, character and image counts,
split line counts); files that are absent are downloaded and must match a known checksum.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
import warnings
import zipfile
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metaloop.data.base import ClassImages, default_cache_dir, default_data_dir
from metaloop.data.download import download as _download
from metaloop.data.download import md5_of, sha256_of
from metaloop.data.transform import InputTransform, dataset_transform
from metaloop.fileio import atomic_torch_save

VINYALS_SPLITS = ("train", "val", "test", "trainval")
NICHOL_SPLITS = ("nichol-train", "nichol-test")
OMNIGLOT_SPLITS = (*VINYALS_SPLITS, "background", "evaluation", *NICHOL_SPLITS)
NICHOL_TRAIN_CHARACTERS = 1200
IMAGES_PER_CHARACTER = 20

_ZIP_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}"
_SPLIT_URL = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals/{}"
)

# archive -> (alphabets, characters); every character has IMAGES_PER_CHARACTER PNGs.
ARCHIVES = {"images_background.zip": (30, 964), "images_evaluation.zip": (20, 659)}
SPLIT_LINES = {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}

# Paths relative to <data_dir>/omniglot -> download URL.
URLS = {name: _ZIP_URL.format(name) for name in ARCHIVES} | {
    f"splits/vinyals/{s}.txt": _SPLIT_URL.format(f"{s}.txt") for s in VINYALS_SPLITS
}

# Accepted sha256 of each file. A downloaded file must match one of these (or KNOWN_MD5 below).
# The zip hashes are of the repacked copies (byte-identical PNGs, fixed timestamps) described in
# the data README that ships with them; the official zips' sha256 is not known here. Add it once it can
# be computed from a trusted download:
#     curl -LO https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip
#     curl -LO https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip
#     sha256sum images_background.zip images_evaluation.zip
# The split files were copied unchanged from jakesnell/prototypical-networks (commit c9bb4d2), so their
# hashes are the upstream ones.
KNOWN_SHA256: dict[str, set[str]] = {
    "images_background.zip": {"9892d2170ed983d856e264844632d54814f01001b3731baa409c054caf292a5e"},
    "images_evaluation.zip": {"d2dff634dba4546a89a69750392f44ee03fd80d7a3ab19a71f0bc8d643652ede"},
    "splits/vinyals/train.txt": {"984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0"},
    "splits/vinyals/val.txt": {"11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a"},
    "splits/vinyals/test.txt": {"845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204"},
    "splits/vinyals/trainval.txt": {"5276ae50c755596d0bff7f2284e85625695549a85ee6e36b6491ad1e5d1cc26a"},
}
# md5 of the official zips as published by torchvision (torchvision/datasets/omniglot.py, zips_md5),
# which downloads the same URLs. Lets a fresh download of the official zips be accepted until their
# sha256 is added above.
KNOWN_MD5: dict[str, set[str]] = {
    "images_background.zip": {"68d2efa1b9178cc56df9314c21c6e718"},
    "images_evaluation.zip": {"6b91aef0f799c5bb55b94e3f2daec811"},
}

_CACHE_FORMAT = 1
_PNG_RE = re.compile(r"^([^/]+)/([^/]+)/(character\d+)/([^/]+\.png)$")
_LINE_RE = re.compile(r"^([^/]+/character\d+)/rot(000|090|180|270)$")


class OmniglotError(RuntimeError):
    """Omniglot files on disk are missing, corrupt or do not have the expected structure."""


def _root(data_dir: str | Path | None) -> Path:
    return (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / "omniglot"


def _fix(root: Path, rel: str) -> str:
    return (
        f"Fix: delete {root / rel} so that it is downloaded again, or place the official file there "
        f"({URLS[rel]})."
    )


def _missing_message(root: Path, missing: list[str]) -> str:
    files = "; ".join(f"{root / rel} from {URLS[rel]}" for rel in missing)
    return (
        f"Omniglot files missing from {root}: {files}. Get them with "
        f"'metaloop data prepare omniglot --data-dir {root.parent}' (downloads and checks them; in Python "
        f"prepare_omniglot({str(root.parent)!r})), or save them at those paths by hand, or point "
        "METALOOP_DATA at a folder holding omniglot/ with these files."
    )


def _ensure_files(root: Path, download: bool) -> None:
    """Download the files that are absent (if allowed), requiring a known checksum."""
    missing = [rel for rel in URLS if not (root / rel).is_file()]
    if missing and not download:
        raise FileNotFoundError(_missing_message(root, missing))
    for rel in missing:
        path = _download(URLS[rel], root / rel, KNOWN_SHA256[rel], md5=KNOWN_MD5.get(rel, ()))
        digest = sha256_of(path)
        if digest not in KNOWN_SHA256[rel]:
            print(f"metaloop: accepted {rel} by its official md5; its sha256 is {digest}", file=sys.stderr)


def scan_archive(path: Path, rel: str | None = None) -> list[tuple[str, list[str]]]:
    """Check one Omniglot zip's structure from its listing.

    Returns ``[("Alphabet/characterNN", [20 member names sorted by drawer]), ...]`` sorted by name.
    Raises :class:`OmniglotError` naming the file, what was found and what was expected.
    """
    rel = rel or path.name
    top = rel.removesuffix(".zip")
    n_alphabets, n_chars = ARCHIVES[rel]
    fix = _fix(path.parent, rel)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise OmniglotError(f"{path} is not a readable zip file (truncated or corrupt: {e}). {fix}") from e
    chars: dict[str, list[str]] = {}
    stray = []
    for name in names:
        if name.endswith("/") or name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1].startswith("."):
            continue
        m = _PNG_RE.match(name)
        if not m or m.group(1) != top:
            stray.append(name)
            continue
        chars.setdefault(f"{m.group(2)}/{m.group(3)}", []).append(name)
    alphabets = {c.split("/")[0] for c in chars}
    n_images = sum(len(v) for v in chars.values())
    problems = []
    if stray:
        problems.append(
            f"{len(stray)} entries outside {top}/<Alphabet>/<characterNN>/*.png (e.g. {stray[0]!r})"
        )
    if (len(alphabets), len(chars), n_images) != (n_alphabets, n_chars, n_chars * IMAGES_PER_CHARACTER):
        problems.append(
            f"found {len(alphabets)} alphabets, {len(chars)} characters, {n_images} PNGs; expected "
            f"{n_alphabets}, {n_chars}, {n_chars * IMAGES_PER_CHARACTER}"
        )
    bad = [c for c, v in chars.items() if len(v) != IMAGES_PER_CHARACTER]
    if bad:
        problems.append(
            f"{len(bad)} characters do not have {IMAGES_PER_CHARACTER} images "
            f"(e.g. {bad[0]}: {len(chars[bad[0]])})"
        )
    if problems:
        details = "; ".join(problems)
        raise OmniglotError(f"{path} does not look like Omniglot's {rel}: {details}. {fix}")
    return [(c, sorted(chars[c])) for c in sorted(chars)]


def read_split(path: Path, split: str, characters: set[str] | None = None) -> list[str]:
    """Lines of a Vinyals split file, checked for count, format and (if given) known characters."""
    rel = f"splits/vinyals/{split}.txt"
    fix = _fix(path.parents[2], rel)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise OmniglotError(f"cannot read {path}: {e}. {fix}") from e
    if len(lines) != SPLIT_LINES[split]:
        raise OmniglotError(f"{path} has {len(lines)} classes, expected {SPLIT_LINES[split]}. {fix}")
    bad = [ln for ln in lines if not _LINE_RE.match(ln)]
    if bad:
        raise OmniglotError(f"{path}: line {bad[0]!r} is not 'Alphabet/characterNN/rotDDD'. {fix}")
    if len(set(lines)) != len(lines):
        raise OmniglotError(f"{path} lists some classes twice. {fix}")
    if characters is not None:
        unknown = [ln for ln in lines if ln.rsplit("/", 1)[0] not in characters]
        if unknown:
            raise OmniglotError(
                f"{path} names {len(unknown)} characters not in the zips (e.g. {unknown[0]!r}). {fix}"
            )
    return lines


def _check_structure(root: Path) -> dict[str, list[tuple[str, list[str]]]]:
    archives = {rel: scan_archive(root / rel, rel) for rel in ARCHIVES}
    characters = {c for listing in archives.values() for c, _ in listing}
    for split in VINYALS_SPLITS:
        read_split(root / f"splits/vinyals/{split}.txt", split, characters)
    return archives


def prepare_omniglot(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """Make sure the Omniglot files exist (downloading absent ones if allowed) and are valid.

    Returns the ``<data_dir>/omniglot`` folder. Raises ``FileNotFoundError`` (files missing and
    ``download=False``), :class:`~metaloop.data.download.DownloadError` or :class:`OmniglotError`.
    """
    root = _root(data_dir)
    _ensure_files(root, download)
    _check_structure(root)
    return root


def verify_omniglot(data_dir: str | Path | None = None) -> list[str]:
    """Human-readable report on every Omniglot file: size, sha256, known-hash match, structure.

    Raises ``FileNotFoundError`` if files are missing and :class:`OmniglotError` on a structural failure.
    """
    root = _root(data_dir)
    _ensure_files(root, download=False)
    report = [f"Omniglot in {root}"]
    for rel in URLS:
        path = root / rel
        digest = sha256_of(path)
        if digest in KNOWN_SHA256[rel]:
            known = "known sha256"
        elif md5_of(path) in KNOWN_MD5.get(rel, ()):
            known = "official md5 (sha256 not yet in KNOWN_SHA256)"
        else:
            known = "UNKNOWN hash (structure checked instead)"
        report.append(f"{rel}: {path.stat().st_size:,} bytes, sha256 {digest}, {known}")
    archives = _check_structure(root)
    for rel, listing in archives.items():
        n_alpha = len({c.split("/")[0] for c, _ in listing})
        n_img = sum(len(m) for _, m in listing)
        report.append(f"{rel}: structure OK ({n_alpha} alphabets, {len(listing)} characters, {n_img:,} PNGs)")
    report.append(
        "splits/vinyals: structure OK ("
        + ", ".join(f"{s} {n}" for s, n in SPLIT_LINES.items())
        + " classes; every character present)"
    )
    return report


def decode_png(data: bytes, image_size: int, resize: str = "lanczos") -> np.ndarray:
    """One Omniglot PNG -> uint8 ``[S, S]``, ink = 255: :func:`omniglot_transform` applied to it."""
    with Image.open(BytesIO(data)) as im:
        return omniglot_transform(image_size, resize).from_pil(im)[0]


def omniglot_transform(image_size: int, resize: str = "lanczos") -> InputTransform:
    """How Omniglot's PNG files (black ink on white) become images: "L", resized with Pillow's
    ``resize`` filter (Lanczos unless asked otherwise), inverted."""
    return dataset_transform("omniglot", image_size, channels=1, resize=resize)


def _decode_archives(
    root: Path, archives: dict[str, list[tuple[str, list[str]]]], image_size: int, resize: str
) -> tuple[torch.Tensor, list[str]]:
    """Decode every image: uint8 ``[num_chars * 20, 1, S, S]`` and the character names, in order."""
    out = np.empty(
        (sum(len(v) for v in archives.values()) * IMAGES_PER_CHARACTER, image_size, image_size),
        dtype=np.uint8,
    )
    characters: list[str] = []
    i = 0
    for rel, listing in archives.items():
        path = root / rel
        try:
            with zipfile.ZipFile(path) as zf:
                for char, members in listing:
                    characters.append(char)
                    for member in members:
                        try:
                            out[i] = decode_png(zf.read(member), image_size, resize)
                        except (UnidentifiedImageError, OSError, ValueError, zlib.error) as e:
                            raise OmniglotError(
                                f"{path}: cannot decode {member}: {e}. {_fix(root, rel)}"
                            ) from e
                        i += 1
        except (zipfile.BadZipFile, EOFError) as e:
            raise OmniglotError(f"{path} is corrupt ({e}). {_fix(root, rel)}") from e
    return torch.from_numpy(out).unsqueeze(1), characters


def _read_cache(
    path: Path, image_size: int, resize: str, digest: str
) -> tuple[torch.Tensor, list[str]] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
        images, characters = payload["images"], payload["characters"]
        n = len(characters) * IMAGES_PER_CHARACTER
        ok = (
            payload["format"] == _CACHE_FORMAT
            and payload["sha256"] == digest
            and payload.get("resize", "lanczos") == resize
            and isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and tuple(images.shape) == (n, 1, image_size, image_size)
            and len(characters) == sum(c for _, c in ARCHIVES.values())
        )
        if ok:
            return images, list(characters)
        reason = "unexpected contents"
    except Exception as e:  # any unreadable cache is rebuilt
        reason = f"{type(e).__name__}: {e}"
    warnings.warn(f"Omniglot cache {path} is unusable ({reason}); rebuilding it", stacklevel=3)
    return None


def _load_all(root: Path, image_size: int, resize: str) -> tuple[torch.Tensor, list[str]]:
    """All 1,623 characters, unrotated: uint8 ``[32460, 1, S, S]`` and ``"Alphabet/characterNN"`` names."""
    combined = hashlib.sha256("".join(sha256_of(root / rel) for rel in ARCHIVES).encode()).hexdigest()
    variant = f"{image_size}" if resize == "lanczos" else f"{image_size}-{resize}"
    cache = default_cache_dir(root.parent) / f"omniglot-{variant}-{combined[:16]}.pt"
    cached = _read_cache(cache, image_size, resize, combined)
    if cached is not None:
        # Same zip bytes as when the cache was built, and they passed the structure check then.
        return cached
    archives = _check_structure(root)
    images, characters = _decode_archives(root, archives, image_size, resize)
    payload = {
        "format": _CACHE_FORMAT,
        "sha256": combined,
        "resize": resize,
        "characters": characters,
        "images": images,
    }
    try:
        atomic_torch_save(payload, cache)
    except OSError as e:
        warnings.warn(
            f"could not write the Omniglot cache {cache} ({e}); continuing without it", stacklevel=3
        )
    return images, characters


def nichol_split_lines(characters: list[str], split: str) -> list[str]:
    """Class lines ``Alphabet/characterNN/rotDDD`` of ``"nichol-train"`` or ``"nichol-test"`` (see the
    module docstring) from the 1,623 ``Alphabet/characterNN`` names."""
    shuffled = sorted(characters, key=lambda name: name.split("/"))
    random.Random(0).shuffle(shuffled)
    if split == "nichol-train":
        return [f"{c}/rot{d:03d}" for c in shuffled[:NICHOL_TRAIN_CHARACTERS] for d in (0, 90, 180, 270)]
    return [f"{c}/rot000" for c in shuffled[NICHOL_TRAIN_CHARACTERS:]]


def load_omniglot(
    split: str = "train",
    image_size: int = 28,
    data_dir: str | Path | None = None,
    download: bool = True,
    resize: str = "lanczos",
) -> ClassImages:
    """Load one Omniglot split as uint8 ``[K * 20, 1, S, S]`` images, 20 per class, ink = 255.

    Args:
        split: one of :data:`OMNIGLOT_SPLITS` (see the module docstring).
        image_size: ``S``, the side of the square images (105 keeps the originals).
        data_dir: folder holding ``omniglot/``; default ``$METALOOP_DATA`` or ``~/.cache/metaloop``.
        download: fetch absent files (checksums must be known); if False, missing files are an error.
        resize: the Pillow filter of the 105 -> ``S`` resize, a key of
            :data:`~metaloop.data.transform.RESIZE_FILTERS`; ``"nearest"`` gives the binary images
            of Snell et al.'s loader.

    Class names are ``"Alphabet/characterNN/rotDDD"`` for the Vinyals and Nichol splits and
    ``"Alphabet/characterNN"`` for ``"background"`` / ``"evaluation"``.
    """
    if split not in OMNIGLOT_SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; valid splits: {', '.join(OMNIGLOT_SPLITS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    transform = omniglot_transform(image_size, resize)  # checks the filter name before any work
    root = _root(data_dir)
    _ensure_files(root, download)
    all_images, characters = _load_all(root, image_size, resize)
    index = {c: i for i, c in enumerate(characters)}
    if split in VINYALS_SPLITS or split in NICHOL_SPLITS:  # classes are characters in a rotation
        lines = (
            read_split(root / f"splits/vinyals/{split}.txt", split, set(index))
            if split in VINYALS_SPLITS
            else nichol_split_lines(characters, split)
        )
        char_ids = [index[ln.rsplit("/", 1)[0]] for ln in lines]
        turns = torch.tensor([int(ln[-3:]) // 90 for ln in lines])
        names = lines
    else:
        n_background = ARCHIVES["images_background.zip"][1]
        span = range(n_background) if split == "background" else range(n_background, len(characters))
        char_ids = list(span)
        turns = torch.zeros(len(char_ids), dtype=torch.int64)
        names = [characters[i] for i in char_ids]
    per_char = all_images.view(len(characters), IMAGES_PER_CHARACTER, 1, image_size, image_size)
    images = per_char[torch.tensor(char_ids)]  # [K, 20, 1, S, S], a copy
    for k in (1, 2, 3):
        rows = (turns == k).nonzero().flatten()
        if rows.numel():
            images[rows] = torch.rot90(images[rows], k, dims=(-2, -1))
    k_classes = len(names)
    offsets = torch.arange(k_classes + 1, dtype=torch.int64) * IMAGES_PER_CHARACTER
    return ClassImages(
        images.reshape(k_classes * IMAGES_PER_CHARACTER, 1, image_size, image_size),
        offsets,
        names,
        f"omniglot/{split}",
        transform,
    )


__all__: list[str] = [
    "OMNIGLOT_SPLITS",
    "OmniglotError",
    "load_omniglot",
    "prepare_omniglot",
    "verify_omniglot",
]
