"""load_image_folder / load_image_files and the dataset registry's "folder" entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from metaloop.config import config_from_dict
from metaloop.data import DATASETS, folder_split_classes, glyphs, load_dataset
from metaloop.data.folder import load_image_files, load_image_folder
from metaloop.tasks.source import TaskSource


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """3 classes of mixed formats, sizes and modes, plus files that must be ignored."""
    root = tmp_path / "imgs"
    _save(root / "cat" / "1.png", Image.new("L", (40, 30), 100))
    _save(root / "cat" / "2.JPG", Image.new("RGB", (50, 50), (100, 100, 100)), quality=95)
    _save(root / "cat" / "3.bmp", Image.new("RGB", (10, 20), (10, 200, 30)))
    _save(root / "apple" / "a.gif", Image.new("P", (33, 33), 0))
    _save(root / "apple" / "b.webp", Image.new("RGB", (64, 48), (255, 0, 0)))
    transparent = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    _save(root / "bird" / "x.PNG", transparent)
    _save(root / "bird" / "y.jpeg", Image.new("1", (105, 105), 0))
    (root / "bird" / "notes.txt").write_text("not an image")
    (root / "bird" / ".DS_Store").write_bytes(b"\0\1")
    (root / "bird" / "._x.png").write_bytes(b"macos fork, not a png")
    (root / "README.md").write_text("ignored")
    (root / ".hidden").mkdir()
    return root


def test_happy_path(image_root):
    ds = load_image_folder(image_root)
    assert ds.class_names == ["apple", "bird", "cat"]
    assert ds.class_sizes.tolist() == [2, 2, 3]
    assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape) == (7, 1, 28, 28)
    assert ds.name == "folder/imgs"
    cat = ds.class_images(2)
    assert int(cat[0].min()) == int(cat[0].max()) == 100  # a flat image stays flat, no inversion
    assert abs(int(cat[1].float().mean()) - 100) <= 2  # jpeg
    bird = ds.class_images(1)
    assert int(bird[0].min()) == 255  # transparency flattened onto white
    assert int(bird[1].max()) == 0  # 1-bit black
    again = load_image_folder(image_root, name="mine")
    assert torch.equal(again.images, ds.images) and again.name == "mine"


def test_channels_and_invert(image_root):
    rgb = load_image_folder(image_root, image_size=16, channels=3)
    assert tuple(rgb.images.shape) == (7, 3, 16, 16)
    red = rgb.class_images(0)[1]  # apple/b.webp
    assert red[0].float().mean() > 200 and red[1].float().mean() < 40
    gray = load_image_folder(image_root, image_size=16)
    inverted = load_image_folder(image_root, image_size=16, invert=True)
    assert torch.equal(inverted.images, 255 - gray.images)


def test_load_image_files(image_root):
    paths = [image_root / "cat" / "1.png", str(image_root / "apple" / "b.webp")]
    out = load_image_files(paths, image_size=12, channels=3)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (2, 3, 12, 12)
    assert tuple(load_image_files([], image_size=12).shape) == (0, 1, 12, 12)
    with pytest.raises(ValueError, match="channels"):
        load_image_files(paths, channels=2)
    with pytest.raises(ValueError, match="image_size"):
        load_image_files(paths, image_size=0)


def test_missing_and_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        load_image_folder(f)


def test_no_class_folders(tmp_path):
    _save(tmp_path / "loose.png", Image.new("L", (8, 8)))
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path)


def test_empty_class(image_root):
    (image_root / "empty").mkdir()
    (image_root / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"class folder .*empty has no images"):
        load_image_folder(image_root)


def test_single_class(tmp_path):
    _save(tmp_path / "only" / "a.png", Image.new("L", (8, 8)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        load_image_folder(tmp_path)


def test_corrupt_image_named(image_root):
    bad = image_root / "cat" / "4.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match=r"cannot read image .*cat/4\.png"):
        load_image_folder(image_root)
    truncated = image_root / "cat" / "4.png"
    good = (image_root / "cat" / "1.png").read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cat/4\.png"):
        load_image_folder(image_root)


# ---------------------------------------------------------------- registry


def _many_classes(root: Path, n: int) -> Path:
    for k in range(n):
        _save(root / f"class{k:02d}" / "0.png", Image.new("L", (8, 8), k))
        _save(root / f"class{k:02d}" / "1.png", Image.new("L", (8, 8), k))
    return root


def test_folder_splits(tmp_path):
    root = _many_classes(tmp_path / "many", 20)
    parts = {s: load_dataset("folder", s, root=root, image_size=8) for s in ("train", "val", "test")}
    assert [parts[s].num_classes for s in ("train", "val", "test")] == [14, 2, 4]
    names = [set(parts[s].class_names) for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert set.union(*names) == {f"class{k:02d}" for k in range(20)}
    assert parts["val"].name == "folder/many/val"
    again = load_dataset("folder", "train", root=root, image_size=8)
    assert again.class_names == parts["train"].class_names and torch.equal(
        again.images, parts["train"].images
    )
    other = load_dataset("folder", "train", root=root, image_size=8, seed=1)
    assert other.class_names != parts["train"].class_names
    assert load_dataset("folder", "all", root=root, image_size=8).num_classes == 20
    assert folder_split_classes(10, "train") == sorted(folder_split_classes(10, "train"))
    assert [len(folder_split_classes(10, s)) for s in ("train", "val", "test")] == [7, 1, 2]


def test_folder_registry_errors(tmp_path):
    root = _many_classes(tmp_path / "ten", 10)
    with pytest.raises(ValueError, match=r"'val' split of 10 classes .* has 1 class"):
        load_dataset("folder", "val", root=root)
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("folder", "train")
    with pytest.raises(ValueError, match="valid splits: train, val, test, all"):
        load_dataset("folder", "everything", root=root)
    with pytest.raises(ValueError, match="valid names: omniglot, glyphs, folder"):
        load_dataset("mnist")
    assert DATASETS == ("omniglot", "glyphs", "folder", "miniimagenet")


def test_resize_filter(image_root, tmp_path):
    """data.resize reaches folder images and is recorded; glyphs and miniImageNet refuse it."""
    stripes = Image.new("L", (9, 9), 0)
    for x in range(0, 9, 2):
        for y in range(9):
            stripes.putpixel((x, y), 255)
    _save(image_root / "zebra" / "s.png", stripes)
    nearest = load_image_folder(image_root, image_size=4, resize="nearest")
    lanczos = load_image_folder(image_root, image_size=4)
    assert nearest.transform.resize == "nearest" and lanczos.transform.resize == "lanczos"
    zebra = nearest.class_names.index("zebra")
    assert set(nearest.class_images(zebra).unique().tolist()) <= {0, 255}
    assert not torch.equal(nearest.class_images(zebra), lanczos.class_images(zebra))
    registry = load_dataset("folder", "all", root=image_root, image_size=4, resize="nearest")
    assert torch.equal(registry.images, nearest.images)
    for name in ("glyphs", "miniimagenet"):
        with pytest.raises(ValueError, match=f"resize='nearest' is for the omniglot and folder.*{name}"):
            load_dataset(name, "train", data_dir=tmp_path, resize="nearest")


def test_config_resize_reaches_the_task_source(tmp_path):
    root = _many_classes(tmp_path / "many", 10)
    data = {"name": "folder", "root": str(root), "image_size": 8}
    for resize in ("lanczos", "nearest"):
        config = config_from_dict({"data": {**data, "resize": resize}})
        assert TaskSource(config).dataset("train").transform.resize == resize
    assert config_from_dict({"data": data}).data.resize == "lanczos"  # configs written before the key


def test_glyphs_forwarded(monkeypatch):
    seen = {}

    def fake(split, image_size=28, seed=0, data_dir=None):
        seen.update(split=split, image_size=image_size, seed=seed, data_dir=data_dir)
        return "sentinel"

    monkeypatch.setattr(glyphs, "load_glyphs", fake)
    assert load_dataset("glyphs", "val", image_size=32, seed=3, data_dir="/x") == "sentinel"
    assert seen == {"split": "val", "image_size": 32, "seed": 3, "data_dir": "/x"}
