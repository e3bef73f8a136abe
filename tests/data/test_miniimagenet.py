"""miniImageNet on a small generated image folder: layouts, cache, errors, registry, CLI, recipes."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaloop.cli import main
from metaloop.config import load_config
from metaloop.data import load_dataset
from metaloop.data import miniimagenet as mi
from metaloop.data.folder import load_image_files
from metaloop.data.miniimagenet import MiniImageNetError, load_miniimagenet

CONFIGS = Path(__file__).parents[2] / "configs"
PER_CLASS = 4
# 3 classes per split, as WordNet ids; the last class of "train" is written with PNG file names.
WNIDS = {split: [f"n0{k}00000{i}" for i in range(3)] for k, split in enumerate(("train", "val", "test"), 1)}
MODES = [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")]


def _image(seed: int) -> Image.Image:
    """A small image of varied size and mode whose colour depends on ``seed``."""
    mode, _ = MODES[seed % len(MODES)]
    colour = ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256)
    image = Image.new("RGB", (40 + 7 * (seed % 5), 30 + 11 * (seed % 3)), colour)
    image.paste((255 - colour[0], 0, 0), (5, 5, 20, 15))  # some structure to resize
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(128)
        return image
    return image.convert(mode)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])


def _csv_path(data_dir: Path, split: str) -> Path:
    return data_dir / "miniimagenet" / "splits" / "ravi" / f"{split}.csv"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``miniimagenet/`` in the flat layout: 3 classes x 4 images per split, CSVs to match.

    The cache goes to the default ``<data_dir>/cache``.
    """
    monkeypatch.delenv("METALOOP_CACHE", raising=False)
    images = tmp_path / "miniimagenet" / "images"
    images.mkdir(parents=True)
    seed = 0
    for split, wnids in WNIDS.items():
        rows = []
        for k, wnid in enumerate(wnids):
            extension = "png" if (split, k) == ("train", 2) else "jpg"
            for i in range(PER_CLASS):
                filename = f"{wnid}{i + 1:08d}.{extension}"
                _image(seed).save(images / filename, format=MODES[seed % len(MODES)][1])
                rows.append((filename, wnid))
                seed += 1
        _write_csv(_csv_path(tmp_path, split), rows)
    return tmp_path


def _cache_files(data_dir: Path) -> list[str]:
    cache = data_dir / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_sizes_shapes_and_conversion(data_dir, split):
    ds = load_miniimagenet(split, data_dir=data_dir)
    assert ds.name == f"miniimagenet/{split}" and ds.class_names == WNIDS[split]
    assert ds.class_sizes.tolist() == [PER_CLASS] * 3
    assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape) == (3 * PER_CLASS, 3, 84, 84)
    # Converted exactly as the folder loader (and so `metaloop predict`) converts, in CSV order.
    with _csv_path(data_dir, split).open() as f:
        files = [data_dir / "miniimagenet" / "images" / row["filename"] for row in csv.DictReader(f)]
    assert torch.equal(ds.images, load_image_files(files, 84, channels=3))
    registry = load_dataset("miniimagenet", split, image_size=84, data_dir=data_dir)
    assert torch.equal(registry.images, ds.images) and registry.name == ds.name


def test_cache_is_used_and_keyed_by_inputs(data_dir, monkeypatch):
    first = load_miniimagenet("val", image_size=16, data_dir=data_dir)
    (cache_name,) = _cache_files(data_dir)
    assert cache_name.startswith("miniimagenet-val-16-") and cache_name.endswith(".pt")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    decode = mi._decode
    monkeypatch.setattr(mi, "_decode", no_decoding)
    assert torch.equal(load_miniimagenet("val", image_size=16, data_dir=data_dir).images, first.images)

    monkeypatch.setattr(mi, "_decode", decode)
    replaced = data_dir / "miniimagenet" / "images" / f"{WNIDS['val'][0]}00000001.jpg"
    Image.new("RGB", (50, 50), (0, 255, 0)).save(replaced)
    os.utime(replaced, ns=(1, 1))  # a different mtime even on a coarse clock
    again = load_miniimagenet("val", image_size=16, data_dir=data_dir)
    assert int(again.images[0, 1].float().mean()) > 240  # the new, green image
    assert torch.equal(again.images[1:], first.images[1:])
    assert len(_cache_files(data_dir)) == 2


def test_unreadable_cache_is_rebuilt(data_dir):
    first = load_miniimagenet("val", image_size=16, data_dir=data_dir)
    (cache,) = (data_dir / "cache").iterdir()
    cache.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="miniImageNet cache .* is unusable"):
        assert torch.equal(load_miniimagenet("val", image_size=16, data_dir=data_dir).images, first.images)
    assert torch.equal(torch.load(cache, weights_only=True)["images"], first.images)


def test_imagenet_layout_ranks_images_by_number(data_dir):
    """``<wnid><r>.jpg`` is the r-th of ``images/<wnid>/<wnid>_<n>.JPEG`` ordered by n as a number."""
    images = data_dir / "miniimagenet" / "images"
    wnid = "n09000001"
    numbers = [9, 10, 23, 100, 1000]  # as text: 10, 100, 1000, 23, 9
    folder = images / wnid
    folder.mkdir()
    for seed, n in enumerate(numbers):
        extension = "jpeg" if n == 9 else "JPEG"
        _image(seed).convert("RGB").save(folder / f"{wnid}_{n}.{extension}", format="JPEG")
    (folder / "notes.txt").write_text("ignored")
    flat = [(f"{WNIDS['test'][0]}{i + 1:08d}.jpg", WNIDS["test"][0]) for i in range(2)]
    ranked = [(f"{wnid}00000002.jpg", wnid), (f"{wnid}00000004.jpg", wnid)]
    _write_csv(_csv_path(data_dir, "test"), [*flat, *ranked])
    ds = load_miniimagenet("test", image_size=20, data_dir=data_dir)
    assert ds.class_names == [WNIDS["test"][0], wnid] and ds.class_sizes.tolist() == [2, 2]
    expected = load_image_files([folder / f"{wnid}_10.JPEG", folder / f"{wnid}_100.JPEG"], 20, 3)
    assert torch.equal(ds.class_images(1), expected)


def test_missing_csv_lists_the_files_and_where_to_get_them(data_dir):
    for split in ("train", "test"):
        _csv_path(data_dir, split).unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("miniimagenet", "train", image_size=84, data_dir=data_dir)
    message = str(error.value)
    assert str(_csv_path(data_dir, "train")) in message and str(_csv_path(data_dir, "test")) in message
    assert str(_csv_path(data_dir, "val")) not in message
    assert "filename,label" in message and "meta-learning-lstm" in message
    assert _cache_files(data_dir) == []


def test_missing_images_are_counted_and_named(data_dir):
    images = data_dir / "miniimagenet" / "images"
    gone = [f"{wnid}{i + 1:08d}.jpg" for wnid in WNIDS["val"] for i in range(PER_CLASS)][:7]
    for name in gone:
        (images / name).unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_miniimagenet("val", data_dir=data_dir)
    message = str(error.value)
    assert f"7 of the {3 * PER_CLASS} miniImageNet images" in message
    assert "the first 5: " + ", ".join(gone[:5]) + ".\n" in message and gone[5] not in message
    assert str(images / gone[0]) in message and "ln -s /path/to/ILSVRC2012/train" in message
    assert _cache_files(data_dir) == []


def test_corrupt_image_is_named_and_nothing_is_cached(data_dir):
    bad = data_dir / "miniimagenet" / "images" / f"{WNIDS['val'][2]}00000003.jpg"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:40])  # truncated JPEG
    with pytest.raises(MiniImageNetError, match=r"cannot read image .*00000003\.jpg(.|\n)*Fix: replace"):
        load_miniimagenet("val", image_size=16, data_dir=data_dir)
    assert _cache_files(data_dir) == []  # no cache, no temporary file
    bad.write_bytes(good_bytes)
    assert len(load_miniimagenet("val", image_size=16, data_dir=data_dir)) == 3 * PER_CLASS


@pytest.mark.parametrize(
    "first_line, rows, message",
    [
        ("name,class", [], "the first line must be 'filename,label'"),
        ("filename,label", ["a.jpg,n1", "a.jpg,n2"], "a.jpg is listed twice"),
        ("filename,label", ["a.jpg,n1", "b.jpg"], "line 3: expected 'filename,label'"),
        ("filename,label", ["../a.jpg,n1", "b.jpg,n2"], "'../a.jpg' is not a plain file name"),
        ("filename,label", ["a.jpg,n1", "b.jpg,n1"], "lists 1 class(es)"),
    ],
)
def test_malformed_csv(data_dir, first_line, rows, message):
    _csv_path(data_dir, "train").write_text("\n".join([first_line, *rows]) + "\n")
    with pytest.raises(MiniImageNetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_miniimagenet("train", data_dir=data_dir)


def test_data_list_shows_present_or_absent(data_dir, tmp_path, capsys):
    assert main(["data", "list", "--data-dir", str(data_dir)]) == 0
    assert "  miniimagenet present" in capsys.readouterr().out
    empty = tmp_path / "empty"
    assert main(["data", "list", "--data-dir", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "  miniimagenet absent (no splits/ravi/train.csv, splits/ravi/val.csv" in out and "images/" in out


def test_tiny_training_run(data_dir, tmp_path, tiny_cli_args, capsys):
    extra = ("data.name=miniimagenet", f"data.data_dir={data_dir}", "data.image_size=32")
    assert main(["train", "--no-progress", *tiny_cli_args(data_dir, tmp_path / "run", *extra)]) == 0
    assert "protonet on miniimagenet/test: 3-way 1-shot accuracy:" in capsys.readouterr().out
    assert len(_cache_files(data_dir)) == 3  # train, val and test


@pytest.mark.parametrize("shots, train_ways, meta_batch", [(1, 30, 4), (5, 20, 2)])
def test_recipes_follow_the_papers(shots, train_ways, meta_batch):
    protonet = load_config(CONFIGS / f"protonet_miniimagenet_5w{shots}s.yaml")
    assert (protonet.train.ways, protonet.train.shots, protonet.train.queries) == (train_ways, shots, 15)
    schedule = (protonet.train.lr, protonet.train.lr_decay_every, protonet.train.lr_decay_gamma)
    assert schedule == (1e-3, 2000, 0.5) and protonet.algorithm.hidden == 64
    maml = load_config(CONFIGS / f"maml_miniimagenet_5w{shots}s.yaml")
    a = maml.algorithm
    assert (a.hidden, a.inner_lr, a.inner_steps, a.eval_inner_steps) == (32, 0.01, 5, 10)
    assert (maml.train.ways, maml.train.shots, maml.train.queries) == (5, shots, 15)
    assert (maml.train.meta_batch_size, maml.train.lr) == (meta_batch, 1e-3)
    for config in (protonet, maml):
        assert config.data.name == "miniimagenet" and config.data.image_size == 84
        assert (config.eval.ways, config.eval.shots) == (5, shots)
