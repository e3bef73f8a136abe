"""Glyphs: an Omniglot-like few-shot dataset rendered from the fonts matplotlib ships, no download.

* **Fonts.** The DejaVu Sans / Serif / Sans Mono families (regular, bold, oblique/italic, bold
  oblique/italic) and the four STIX General styles found in ``matplotlib.get_data_path()/fonts/ttf``;
  16 files. Glyphs are drawn with Pillow (basic layout, no shaping) and a font is used for a character
  only if its cmap maps the code point to a real glyph (not ``.notdef``) that draws visible ink.
* **Classes.** One class per Unicode code point, grouped into "alphabets" by Unicode block (the
  ``_BLOCKS`` table). Skipped: whitespace, control, format, private-use and combining characters,
  modifier letters and superscript / subscript / small forms (scaled to fit, they look like their base
  letters), and characters drawn by fewer than 3 font files. A character that looks like an earlier one
  (Latin ``A``, Greek ``Α``, Cyrillic ``А``) is dropped: each class's canonical image (its first font,
  DejaVu Sans where it has the glyph, 28x28, undistorted) is compared with those kept before it, in code
  point order, and dropped if the root mean square pixel difference is below ``_DUP_TOLERANCE``. The
  class set depends only on the fonts (not on size, count or seed).
* **Instances.** Instance ``i`` of a class uses one of the fonts having the character (a random
  permutation of them, cycled, so every font is used about equally), drawn large, cropped to its ink,
  scaled so that its longer side is ``_FIT`` of the image and centred. A random affine map (rotation up
  to 12 degrees, scale and aspect ratio up to about 12 and 10 percent, shear up to 0.2, translation up
  to 5 percent; shrunk and clamped where needed so that the ink is never clipped) is then applied to
  the whole batch at once with ``grid_sample``, and the stroke width is jittered by blending each image
  with its 3x3 dilation or erosion (erosion only where it keeps most of the ink); last, each image is
  stretched to full contrast (its brightest pixel 255), so that hairlines stay visible.
* **Splits.** Whole blocks, fixed by the table (not by the seed), like Omniglot's background /
  evaluation alphabets: about 70 / 10 / 20 percent of classes for train / val / test.
  ``GLYPH_BLOCK_SPLITS`` says which block goes where; ``"all"`` is every block.
* **Output.** uint8 ``[N, 1, S, S]``, ink 255 on background 0. A glyph is written dark on light, so the
  recorded :class:`~metaloop.data.transform.InputTransform` inverts image files, as Omniglot's does.
  The whole set (about 3,700 classes) takes about 4 seconds to make on a busy 2-core CPU and under
  0.1 s to read back from the cache.
* **Determinism.** All randomness comes from one ``torch.Generator`` seeded with ``seed``, drawn in a
  fixed order, and the tensor work runs on one thread: a seed gives bit-identical tensors. Results are
  cached under ``default_cache_dir(data_dir)``, with a hash of the font files' names and sizes and of the
  Pillow / FreeType / Unicode versions in the file name, so a different matplotlib never reuses them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import numpy as np
import PIL
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont, features

from metaloop.data.base import ClassImages, default_cache_dir, default_data_dir
from metaloop.data.transform import dataset_transform
from metaloop.fileio import atomic_torch_save

GLYPH_SPLITS = ("train", "val", "test", "all")

_VERSION = 1  # bump when the images change for the same tables and fonts (it names the cache files)
_FONT_FILES = (  # priority order: the first font having a character gives its canonical image
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)  # fmt: skip
_MIN_FONTS = 3
_SMALL_COPIES = ("<super>", "<sub>", "<small>")  # scaled to fit, these would look like their originals
_DUP_TOLERANCE = 0.06  # root mean square difference of canonical 28x28 images in [0, 1]
_FIT = 0.72  # undistorted glyph's longer side, as a fraction of the image side
_LIMIT = 0.85  # distorted glyphs stay inside this fraction of the image (no clipping)

# Unicode blocks (name, first and last code point), by split. Fixed here, never drawn by the seed: about
# 70 / 10 / 20 percent of the classes, scripts and symbol sets in each. Classes that duplicate one in an
# earlier block are dropped, so the order matters (Latin first). Blocks made mostly of accented variants
# (Latin Extended-A / Additional, Greek Extended) are left out.
_BLOCKS: dict[str, tuple[tuple[str, int, int], ...]] = {
    "train": (
        ("Basic Latin", 0x0000, 0x007F), ("Latin-1 Supplement", 0x0080, 0x00FF),
        ("Latin Extended-B", 0x0180, 0x024F), ("IPA Extensions", 0x0250, 0x02AF),
        ("Greek and Coptic", 0x0370, 0x03FF), ("Cyrillic", 0x0400, 0x04FF),
        ("Cyrillic Supplement", 0x0500, 0x052F), ("Canadian Aboriginal Syllabics", 0x1400, 0x167F),
        ("Phonetic Extensions", 0x1D00, 0x1D7F), ("General Punctuation", 0x2000, 0x206F),
        ("Currency Symbols", 0x20A0, 0x20CF), ("Number Forms", 0x2150, 0x218F),
        ("Arrows", 0x2190, 0x21FF), ("Mathematical Operators", 0x2200, 0x22FF),
        ("Enclosed Alphanumerics", 0x2460, 0x24FF), ("Box Drawing", 0x2500, 0x257F),
        ("Block Elements", 0x2580, 0x259F), ("Geometric Shapes", 0x25A0, 0x25FF),
        ("Miscellaneous Symbols", 0x2600, 0x26FF), ("Miscellaneous Mathematical Symbols-A", 0x27C0, 0x27EF),
        ("Supplemental Arrows-A", 0x27F0, 0x27FF), ("Braille Patterns", 0x2800, 0x28FF),
        ("Miscellaneous Mathematical Symbols-B", 0x2980, 0x29FF), ("Latin Extended-C", 0x2C60, 0x2C7F),
        ("Tai Xuan Jing Symbols", 0x1D300, 0x1D35F), ("Emoticons", 0x1F600, 0x1F64F),
    ),
    "val": (
        ("Arabic", 0x0600, 0x06FF), ("Letterlike Symbols", 0x2100, 0x214F),
        ("Supplemental Mathematical Operators", 0x2A00, 0x2AFF),
        ("Miscellaneous Symbols and Arrows", 0x2B00, 0x2BFF), ("Yijing Hexagram Symbols", 0x4DC0, 0x4DFF),
        ("Latin Extended-D", 0xA720, 0xA7FF),
    ),
    "test": (
        ("Armenian", 0x0530, 0x058F), ("Hebrew", 0x0590, 0x05FF), ("Lao", 0x0E80, 0x0EFF),
        ("Georgian", 0x10A0, 0x10FF), ("Miscellaneous Technical", 0x2300, 0x23FF),
        ("Dingbats", 0x2700, 0x27BF), ("Supplemental Arrows-B", 0x2900, 0x297F), ("Lisu", 0xA4D0, 0xA4FF),
        ("Cyrillic Extended-B", 0xA640, 0xA69F), ("Old Italic", 0x10300, 0x1032F),
    ),
}  # fmt: skip
GLYPH_BLOCK_SPLITS: dict[str, str] = {
    name: split for split, blocks in _BLOCKS.items() for name, _, _ in blocks
}
"""Block name -> the split (``"train"``, ``"val"`` or ``"test"``) its classes belong to."""


def glyph_alphabets() -> dict[str, list[str]]:
    """Block name -> names of its classes (``"Greek and Coptic/U+03B1"``) in the ``"all"`` set.

    Blocks left with no class (fonts lacking them) are omitted; see ``GLYPH_BLOCK_SPLITS`` for splits.
    """
    alphabets: dict[str, list[str]] = {}
    for block, cp, _ in _select()[0]:
        alphabets.setdefault(block, []).append(_class_name(block, cp))
    return alphabets


def load_glyphs(
    split: str = "train",
    image_size: int = 28,
    instances_per_class: int = 20,
    seed: int = 0,
    data_dir: str | Path | None = None,
    cache: bool = True,
) -> ClassImages:
    """The glyph classes of ``split``, ``instances_per_class`` distorted renderings each (see module doc).

    The whole ``"all"`` set is generated (seconds) or read from the cache, then cut to ``split``.
    """
    if split not in GLYPH_SPLITS:
        raise ValueError(f"unknown glyphs split {split!r}; expected one of {GLYPH_SPLITS}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not isinstance(instances_per_class, int) or instances_per_class < 1:
        raise ValueError(f"instances_per_class must be an integer >= 1, got {instances_per_class!r}")
    data, path = None, None
    if cache:
        cache_dir = default_cache_dir(Path(data_dir) if data_dir is not None else default_data_dir())
        path = cache_dir / f"glyphs-v{_VERSION}.{_fonts_key()}-{image_size}-{instances_per_class}-{seed}.pt"
        data = _read_cache(path, image_size, instances_per_class)
    if data is None:
        data = _generate(image_size, instances_per_class, seed)
        if path is not None:
            try:
                obj = {"images": data.images, "offsets": data.offsets, "class_names": data.class_names}
                atomic_torch_save(obj, path)
            except OSError as err:
                warnings.warn(f"glyphs: could not write cache {path}: {err}", stacklevel=2)
    data.transform = dataset_transform("glyphs", image_size)  # as files: dark ink on light, inverted
    keep = [k for k, n in enumerate(data.class_names) if GLYPH_BLOCK_SPLITS[n.split("/")[0]] == split]
    return data if split == "all" else data.subset(keep, name=f"glyphs/{split}")


def _class_name(block: str, cp: int) -> str:
    return f"{block}/U+{cp:04X}"


def _read_cache(path: Path, image_size: int, instances: int) -> ClassImages | None:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, weights_only=True)
        data = ClassImages(obj["images"], obj["offsets"], obj["class_names"], name="glyphs/all")
        if data.image_shape != (1, image_size, image_size) or bool((data.class_sizes != instances).any()):
            raise ValueError("unexpected shape")
        return data
    except Exception as err:  # a damaged file is regenerated, never fatal
        warnings.warn(f"glyphs: ignoring unreadable cache {path} ({err}); regenerating", stacklevel=3)
        return None


def _font_paths() -> list[Path]:
    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [root / name for name in _FONT_FILES if (root / name).is_file()]
    if len(paths) < _MIN_FONTS:
        raise RuntimeError(f"glyphs: matplotlib's DejaVu / STIX fonts are missing from {root}")
    return paths


def _fonts_key() -> str:
    """Hash of what decides the output: font files (names, sizes), library versions, this module's tables."""
    parts = [f"{p.name}:{p.stat().st_size}" for p in _font_paths()]
    parts += [PIL.__version__, str(features.version("freetype2")), unicodedata.unidata_version]
    parts += [repr((_BLOCKS, _MIN_FONTS, _DUP_TOLERANCE, _FIT, _LIMIT))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=256)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)


def _draw(ch: str, path: Path, size: int) -> Image.Image | None:
    """The character's ink, cropped tight, at font size ``size``; None if nothing visible is drawn."""
    left, top, right, bottom = _font(path, size).getbbox(ch)
    if right <= left or bottom <= top:
        return None
    image = Image.new("L", (right - left + 2, bottom - top + 2))
    ImageDraw.Draw(image).text((1 - left, 1 - top), ch, font=_font(path, size), fill=255)
    box = image.getbbox()
    if box is None or image.getextrema()[1] < 128:
        return None
    return image.crop(box)


def _render(ch: str, path: Path, side: int) -> np.ndarray | None:
    """uint8 ``[side, side]``: the glyph scaled so that its longer side is ``side``, centred."""
    # Most glyphs come out 1.5 to 2.5 times too big and are downsampled, smooth; never drawn smaller
    # than when the classes were chosen, so every chosen (character, font) draws at every size.
    size = round(2.5 * max(side, _box_side(28)))
    image = _draw(ch, path, size)
    if image is None:
        return None
    if max(image.size) < side:  # a small mark: draw it bigger rather than blur it
        image = _draw(ch, path, size * min(8, -(-2 * side // max(image.size)))) or image
    w, h = image.size
    scale = side / max(w, h)
    w, h = max(1, round(w * scale)), max(1, round(h * scale))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    canvas = Image.new("L", (side, side))
    canvas.paste(image.resize((w, h), resample), ((side - w) // 2, (side - h) // 2))
    return np.asarray(canvas)


def _candidates() -> list[tuple[str, int, list[int]]]:
    """(block, code point, indices of fonts whose cmap has it) for printable characters in >= 3 fonts."""
    charmaps = [FT2Font(str(p)).get_charmap() for p in _font_paths()]
    out = []
    for block, first, last in sorted((b for bs in _BLOCKS.values() for b in bs), key=lambda b: b[1]):
        for cp in range(first, last + 1):
            category, decomposition = unicodedata.category(chr(cp)), unicodedata.decomposition(chr(cp))
            if category[0] in "CZM" or category == "Lm" or decomposition.startswith(_SMALL_COPIES):
                continue
            fonts = [f for f, cmap in enumerate(charmaps) if cmap.get(cp, 0) != 0]
            if len(fonts) >= _MIN_FONTS:
                out.append((block, cp, fonts))
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Single-threaded torch: bytes independent of the thread count, no barrier stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _select() -> tuple[tuple[tuple[str, int, tuple[int, ...]], ...], torch.Tensor]:
    """The classes, as (block, code point, fonts drawing it), duplicates of earlier classes removed,
    and their glyph boxes at ``_box_side(28)``: uint8 ``[P, L, L]``, class by class, font by font."""
    paths, side = _font_paths(), _box_side(28)
    classes, boxes = [], []
    for block, cp, fonts in _candidates():
        drawn = [(f, g) for f in fonts if (g := _render(chr(cp), paths[f], side)) is not None]
        if len(drawn) >= _MIN_FONTS:
            classes.append((block, cp, tuple(f for f, _ in drawn)))
            boxes.append(np.stack([g for _, g in drawn]))
    first = torch.tensor([0] + [len(b) for b in boxes]).cumsum(0)[:-1]
    all_boxes = torch.from_numpy(np.concatenate(boxes))
    with _one_thread():
        canon = _distort(all_boxes, first, torch.zeros(len(first), 5), torch.zeros(len(first), 2), 28)
        canon = canon.flatten(1).float() / 255
        dist = torch.cdist(canon, canon) / canon.shape[1] ** 0.5  # root mean square difference
    dropped: set[int] = set()
    for k, j in torch.nonzero(torch.tril(dist < _DUP_TOLERANCE, -1)).tolist():  # j < k, sorted by k
        if j not in dropped:
            dropped.add(k)
    unique = [k for k in range(len(classes)) if k not in dropped]
    keep = torch.cat([torch.arange(first[k], first[k] + len(boxes[k])) for k in unique])
    return tuple(classes[k] for k in unique), all_boxes[keep].clone()


def _box_side(image_size: int) -> int:
    return round(image_size * _FIT)


def _distort(
    boxes: torch.Tensor, which: torch.Tensor, params: torch.Tensor, shift: torch.Tensor, size: int
) -> torch.Tensor:
    """uint8 ``[B, 1, size, size]``: glyph boxes ``boxes[which]`` (uint8 ``[P, L, L]``), distorted.

    ``params`` ``[B, 5]``: rotation (radians), log scale, log aspect ratio, shear, stroke in [-1, 1]
    (thinner / thicker); ``shift`` ``[B, 2]``: translation in normalised coordinates.
    """
    angle, log_scale, log_aspect, shear, stroke = params.unbind(1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = _FIT * torch.exp(log_scale + log_aspect), _FIT * torch.exp(log_scale - log_aspect)
    # forward map (box -> image, normalised coordinates): rotation @ shear @ diag(sx, sy)
    m = torch.stack([cos * sx, (cos * shear - sin) * sy, sin * sx, (sin * shear + cos) * sy], 1)
    m = m.view(-1, 2, 2)
    ink = boxes > 0  # shrink where needed so that the ink's bounding box stays inside _LIMIT
    half = torch.stack([_half_extent(ink.any(1)), _half_extent(ink.any(2))], 1)[which, :, None]
    m = m * (_LIMIT / (m.abs() @ half).amax((1, 2)).clamp(min=_LIMIT))[:, None, None]
    room = _LIMIT - (m.abs() @ half)[:, :, 0]
    t = torch.maximum(torch.minimum(shift, room), -room)
    inv = torch.linalg.inv(m)
    theta = torch.cat([inv, -(inv @ t[:, :, None])], 2)[:, :, :, None, None]
    lin = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres
    out = torch.empty(which.numel(), 1, size, size, dtype=torch.uint8)
    for lo in range(0, which.numel(), 1024):
        sl = slice(lo, lo + 1024)
        th = theta[sl]
        grid = torch.stack([th[:, i, 0] * lin + th[:, i, 1] * lin[:, None] + th[:, i, 2] for i in (0, 1)], -1)
        x = F.grid_sample(boxes[which[sl], None].float(), grid, "bilinear", "zeros", align_corners=False)
        a = stroke[sl, None, None, None]
        thick = (a > 0).nonzero()[:, 0]
        x[thick] += a[thick] * (_pool3(x[thick], torch.maximum) - x[thick])
        thin = (a < 0).nonzero()[:, 0]
        eroded = _pool3(x[thin], torch.minimum)
        enough = (eroded > 127).sum((1, 2, 3)) * 2 >= (x[thin] > 127).sum((1, 2, 3))
        thin, eroded = thin[enough], eroded[enough]
        x[thin] -= a[thin] * (eroded - x[thin])
        x *= 255 / x.amax((1, 2, 3), keepdim=True).clamp_(min=1)  # full contrast, even for hairlines
        out[sl] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _pool3(x: torch.Tensor, op) -> torch.Tensor:
    """3x3 max (``op=torch.maximum``) or min pooling of ``[B, 1, H, W]``, zero padded, separably."""
    x = F.pad(x, (1, 1, 1, 1))
    x = op(op(x[..., :-2], x[..., 1:-1]), x[..., 2:])
    return op(op(x[..., :-2, :], x[..., 1:-1, :]), x[..., 2:, :])


def _half_extent(occupied: torch.Tensor) -> torch.Tensor:
    """``[P]`` half-width, in normalised coordinates about the centre, of each ``[P, L]`` row mask."""
    side = occupied.shape[1]
    idx = torch.arange(side, dtype=torch.float32)
    lo = torch.where(occupied, idx, float(side)).amin(1)
    hi = torch.where(occupied, idx + 1, 0.0).amax(1)
    return (torch.maximum(hi - side / 2, side / 2 - lo) / (side / 2)).clamp(min=1 / side)


def _generate(image_size: int, instances: int, seed: int) -> ClassImages:
    classes, boxes = _select()
    n_fonts = torch.tensor([len(fonts) for _, _, fonts in classes])
    first = n_fonts.cumsum(0) - n_fonts
    if _box_side(image_size) != boxes.shape[1]:
        paths, side = _font_paths(), _box_side(image_size)
        drawn = [_render(chr(cp), paths[f], side) for _, cp, fonts in classes for f in fonts]
        if any(g is None for g in drawn):
            raise RuntimeError(f"glyphs: a glyph failed to draw at image_size={image_size}")
        boxes = torch.from_numpy(np.stack(drawn))
    gen = torch.Generator().manual_seed(seed)
    # each class's fonts in a random order, cycled through by its instances
    keys = torch.rand(len(classes), int(n_fonts.max()), generator=gen)
    keys = keys.masked_fill(torch.arange(keys.shape[1]) >= n_fonts[:, None], 2.0)
    order = keys.argsort(dim=1, stable=True).gather(1, torch.arange(instances)[None, :] % n_fonts[:, None])
    which = (first[:, None] + order).flatten()
    u = torch.rand(which.numel(), 7, generator=gen) * 2 - 1
    params = u[:, :5] * torch.tensor([math.radians(12), 0.12, 0.1, 0.2, 1.0])  # see _distort
    params[:, 4] = torch.where(params[:, 4] > 0, 0.6 * params[:, 4], params[:, 4])  # dilation blurs more
    with _one_thread():
        images = _distort(boxes, which, params, u[:, 5:7] * 0.1, image_size)
    names = [_class_name(block, cp) for block, cp, _ in classes]
    return ClassImages(images, torch.arange(len(classes) + 1) * instances, names, name="glyphs/all")
