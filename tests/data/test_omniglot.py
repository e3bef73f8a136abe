"""Omniglot: real-data checks (skipped without METALOOP_DATA) and structure checks on small fake zips."""

from __future__ import annotations

import io
import random
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaloop.data import load_dataset
from metaloop.data import omniglot as om
from metaloop.data.download import ChecksumError
from metaloop.data.omniglot import (
    OMNIGLOT_SPLITS,
    OmniglotError,
    load_omniglot,
    prepare_omniglot,
    verify_omniglot,
)

EXPECTED_CLASSES = {
    "train": 4112,
    "val": 688,
    "test": 1692,
    "trainval": 4800,
    "background": 964,
    "evaluation": 659,
    "nichol-train": 4800,
    "nichol-test": 423,
}


# ---------------------------------------------------------------- real data


def test_first_load_writes_cache(omniglot_first_load):
    assert omniglot_first_load["cache_before"] == []
    (name,) = omniglot_first_load["cache_after"]
    assert (
        name.startswith("omniglot-28-") and name.endswith(".pt") and len(name) == len("omniglot-28-.pt") + 16
    )


@pytest.mark.parametrize("split", OMNIGLOT_SPLITS)
def test_split_shapes_and_counts(split, omniglot_data_dir, omniglot_first_load):
    ds = load_omniglot(split, data_dir=omniglot_data_dir, download=False)
    assert ds.num_classes == EXPECTED_CLASSES[split]
    assert bool((ds.class_sizes == 20).all())
    assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape) == (20 * ds.num_classes, 1, 28, 28)
    assert ds.name == f"omniglot/{split}"
    # ink = 255 on a 0 background: strokes cover a small part of each image
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    assert 5 < ds.images.float().mean().item() < 60
    corners = ds.images[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.float().mean().item() < 5
    if split in om.VINYALS_SPLITS or split in om.NICHOL_SPLITS:
        assert all(n.rsplit("/", 1)[1] in {"rot000", "rot090", "rot180", "rot270"} for n in ds.class_names)
    else:
        assert all(n.count("/") == 1 and "/character" in n for n in ds.class_names)


def test_cache_reused_fast_and_identical(omniglot_data_dir, omniglot_first_load, omniglot_cache_dir):
    start = time.perf_counter()
    again = load_omniglot("background", data_dir=omniglot_data_dir, download=False)
    seconds = time.perf_counter() - start
    first = omniglot_first_load["dataset"]
    assert torch.equal(again.images, first.images) and again.class_names == first.class_names
    assert seconds < omniglot_first_load["seconds"] / 3, (seconds, omniglot_first_load["seconds"])
    assert sorted(p.name for p in omniglot_cache_dir.iterdir()) == omniglot_first_load["cache_after"]


def test_rotations_are_counter_clockwise(omniglot_data_dir, omniglot_first_load):
    ds = load_omniglot("val", data_dir=omniglot_data_dir, download=False)
    index = {n: k for k, n in enumerate(ds.class_names)}
    checked = 0
    for name, k in index.items():
        if not name.endswith("rot000"):
            continue
        base = ds.class_images(k)
        for turns in (1, 2, 3):
            rotated = ds.class_images(index[name[:-3] + f"{90 * turns:03d}"])
            assert torch.equal(rotated, torch.rot90(base, turns, dims=(-2, -1)))
            assert not torch.equal(rotated, base)
        checked += 1
    assert checked == 172
    # torch.rot90(k=1) is PIL's Image.rotate(90) (counter-clockwise), as used by Snell et al.
    with zipfile.ZipFile(omniglot_data_dir / "omniglot" / "images_background.zip") as zf:
        member = next(n for n in zf.namelist() if n.endswith(".png"))
        im = Image.open(io.BytesIO(zf.read(member))).convert("L")
    raw = torch.from_numpy(np.array(im))
    assert torch.equal(torch.from_numpy(np.array(im.rotate(90))), torch.rot90(raw, 1, dims=(0, 1)))


def test_splits_disjoint_by_character(omniglot_data_dir, omniglot_first_load):
    def characters(split):
        ds = load_omniglot(split, data_dir=omniglot_data_dir, download=False)
        return {n.split("/")[0] + "/" + n.split("/")[1] for n in ds.class_names}

    train, val, test, trainval = (characters(s) for s in ("train", "val", "test", "trainval"))
    background, evaluation = characters("background"), characters("evaluation")
    assert (len(train), len(val), len(test), len(trainval)) == (1028, 172, 423, 1200)
    assert not (train & val) and not (train & test) and not (val & test)
    assert trainval == train | val
    assert trainval | test == background | evaluation and len(background | evaluation) == 1623
    assert not (background & evaluation)


def test_nichol_split_is_the_reptile_codes_seeded_shuffle(omniglot_data_dir, omniglot_first_load):
    train = load_omniglot("nichol-train", data_dir=omniglot_data_dir, download=False)
    test = load_omniglot("nichol-test", data_dir=omniglot_data_dir, download=False)
    train_chars = {n.rsplit("/", 1)[0] for n in train.class_names}
    test_chars = {n.rsplit("/", 1)[0] for n in test.class_names}
    assert (len(train_chars), len(test_chars)) == (1200, 423) and not train_chars & test_chars
    assert all(n.endswith("/rot000") for n in test.class_names)
    assert train.class_names[:4] == [f"{train.class_names[0][:-7]}/rot{d:03d}" for d in (0, 90, 180, 270)]
    # Reptile's code: the 1,623 character folders in sorted order, random.seed(0), random.shuffle
    background = load_omniglot("background", data_dir=omniglot_data_dir, download=False).class_names
    evaluation = load_omniglot("evaluation", data_dir=omniglot_data_dir, download=False).class_names
    folders = [
        f"{a}/{c}"
        for a in sorted({n.split("/")[0] for n in background + evaluation})
        for c in sorted(n.split("/")[1] for n in background + evaluation if n.startswith(a + "/"))
    ]
    random.Random(0).shuffle(folders)  # the code's random.seed(0); random.shuffle(...)
    assert [n[:-7] for n in test.class_names] == folders[1200:]
    assert [n[:-7] for n in train.class_names[::4]] == folders[:1200]
    # unlike the Vinyals split, test characters come from alphabets that training sees
    alphabets = {c.split("/")[0] for c in train_chars}
    assert sum(c.split("/")[0] in alphabets for c in test_chars) > 400


def test_load_dataset_registry_omniglot(omniglot_data_dir, omniglot_first_load):
    ds = load_dataset("omniglot", "evaluation", data_dir=omniglot_data_dir)
    assert ds.num_classes == 659
    with pytest.raises(ValueError, match="valid splits: train, val, test, trainval, background, evaluation"):
        load_dataset("omniglot", "training", data_dir=omniglot_data_dir)


def test_verify_report(omniglot_data_dir):
    report = verify_omniglot(omniglot_data_dir)
    text = "\n".join(report)
    assert "images_background.zip: 8,588,032 bytes" in text and "known sha256" in text
    assert "30 alphabets, 964 characters, 19,280 PNGs" in text
    assert "20 alphabets, 659 characters, 13,180 PNGs" in text


def _decoder_from(cache_file: Path):
    """A stand-in for the slow decode that returns the real images from a good cache file."""
    payload = torch.load(cache_file, weights_only=True)
    calls = []

    def fake(root, archives, image_size, resize):
        assert resize == "lanczos"
        calls.append(image_size)
        return payload["images"].clone(), list(payload["characters"])

    return fake, calls


def test_corrupt_cache_is_rebuilt(
    omniglot_data_dir, omniglot_first_load, omniglot_cache_dir, tmp_path, monkeypatch
):
    (good,) = omniglot_cache_dir.iterdir()
    fake, calls = _decoder_from(good)
    monkeypatch.setattr(om, "_decode_archives", fake)
    monkeypatch.setenv("METALOOP_CACHE", str(tmp_path))
    bad = tmp_path / good.name
    bad.write_bytes(good.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="unusable"):
        ds = load_omniglot("background", data_dir=omniglot_data_dir, download=False)
    assert calls == [28]
    assert torch.equal(ds.images, omniglot_first_load["dataset"].images)
    assert bad.stat().st_size == good.stat().st_size
    load_omniglot("evaluation", data_dir=omniglot_data_dir, download=False)
    assert calls == [28]  # the rebuilt cache is used


def test_unwritable_cache_warns_and_goes_on(
    omniglot_data_dir, omniglot_first_load, omniglot_cache_dir, tmp_path, monkeypatch
):
    (good,) = omniglot_cache_dir.iterdir()
    fake, calls = _decoder_from(good)
    monkeypatch.setattr(om, "_decode_archives", fake)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("METALOOP_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="could not write the Omniglot cache"):
        ds = load_omniglot("val", data_dir=omniglot_data_dir, download=False)
    assert ds.num_classes == 688 and calls == [28]


def _link_real_zips(omniglot_data_dir: Path, root: Path) -> None:
    root.mkdir(parents=True)
    for rel in om.ARCHIVES:
        (root / rel).symlink_to(omniglot_data_dir / "omniglot" / rel)


def test_missing_split_downloaded_and_checked(omniglot_data_dir, tmp_path, monkeypatch):
    root = tmp_path / "omniglot"
    _link_real_zips(omniglot_data_dir, root)
    urls = dict(om.URLS)
    for s in om.VINYALS_SPLITS:
        urls[f"splits/vinyals/{s}.txt"] = (
            omniglot_data_dir / "omniglot/splits/vinyals" / f"{s}.txt"
        ).as_uri()
    monkeypatch.setattr(om, "URLS", urls)
    assert prepare_omniglot(tmp_path, download=True) == root
    assert all((root / f"splits/vinyals/{s}.txt").is_file() for s in om.VINYALS_SPLITS)
    # a download whose hash is not known is refused and leaves nothing behind
    (root / "splits/vinyals/val.txt").unlink()
    evil = tmp_path / "evil.txt"
    evil.write_text("Hebrew/character01/rot000\n")
    urls["splits/vinyals/val.txt"] = evil.as_uri()
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        prepare_omniglot(tmp_path, download=True)
    assert sorted(p.name for p in (root / "splits/vinyals").iterdir()) == [
        "test.txt",
        "train.txt",
        "trainval.txt",
    ]


def test_bad_split_files(omniglot_data_dir, tmp_path):
    root = tmp_path / "omniglot"
    _link_real_zips(omniglot_data_dir, root)
    shutil.copytree(omniglot_data_dir / "omniglot" / "splits", root / "splits")
    val = root / "splits/vinyals/val.txt"
    lines = val.read_text().splitlines()
    val.write_text("\n".join(lines[:-4]) + "\n")
    with pytest.raises(OmniglotError, match=r"val.txt has 684 classes, expected 688.*delete"):
        prepare_omniglot(tmp_path, download=False)
    val.write_text("\n".join(lines[:-1] + ["Klingon/character01/rot000"]) + "\n")
    with pytest.raises(OmniglotError, match="characters not in the zips.*Klingon"):
        prepare_omniglot(tmp_path, download=False)


# ---------------------------------------------------------------- fake data, no real Omniglot needed


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (105, 105), 1).save(buf, format="PNG")
    return buf.getvalue()


def _fake_omniglot(root: Path, alphabets: int = 2, chars: int = 2, short: bool = True) -> Path:
    """``root/omniglot``: tiny zips of the right layout (first character one image short if ``short``),
    PNGs stored uncompressed, and one-line split files."""
    folder = root / "omniglot"
    (folder / "splits/vinyals").mkdir(parents=True)
    png = _png()
    for rel in om.ARCHIVES:
        top = rel.removesuffix(".zip")
        with zipfile.ZipFile(folder / rel, "w") as zf:
            for a in range(alphabets):
                for c in range(chars):
                    n = 19 if short and (a, c) == (0, 0) else 20
                    for d in range(n):
                        name = f"{top}/Alpha{a}{top[7]}/character{c + 1:02d}/{c + 1:04d}_{d + 1:02d}.png"
                        zf.writestr(name, png)
    for s in om.VINYALS_SPLITS:
        (folder / f"splits/vinyals/{s}.txt").write_text("Alpha0b/character01/rot090\n")
    return folder


def test_structure_mismatch_is_clear(tmp_path):
    folder = _fake_omniglot(tmp_path)
    with pytest.raises(OmniglotError) as info:
        prepare_omniglot(tmp_path, download=False)
    msg = str(info.value)
    assert str(folder / "images_background.zip") in msg
    assert "found 2 alphabets, 4 characters, 79 PNGs; expected 30, 964, 19280" in msg
    assert "do not have 20 images" in msg and "Alpha0b/character01: 19" in msg
    assert "delete" in msg and "github.com/brendenlake/omniglot" in msg
    with pytest.raises(OmniglotError, match="found 2 alphabets"):
        load_omniglot("background", data_dir=tmp_path, download=False)


def test_stray_entries_reported(tmp_path):
    folder = _fake_omniglot(tmp_path)
    with zipfile.ZipFile(folder / "images_background.zip", "a") as zf:
        zf.writestr("images_background/readme.png", b"x")
    with pytest.raises(OmniglotError, match="1 entries outside images_background"):
        prepare_omniglot(tmp_path, download=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_zip_is_clear(tmp_path, damage):
    folder = _fake_omniglot(tmp_path)
    path = folder / "images_evaluation.zip"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a zip at all" * 100)
    with pytest.raises(OmniglotError, match=r"images_evaluation.zip is not a readable zip file.*delete"):
        om.scan_archive(path)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_omniglot("train", data_dir=tmp_path, download=False)
    msg = str(info.value)
    for rel, url in om.URLS.items():
        assert str(tmp_path / "omniglot" / rel) in msg and url in msg
    assert "METALOOP_DATA" in msg
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="valid splits: train, val, test, trainval, background, evaluation"):
        load_omniglot("training", data_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        load_omniglot("train", image_size=0, data_dir=tmp_path)
    with pytest.raises(ValueError, match="resize must be one of lanczos, bicubic"):
        load_omniglot("train", data_dir=tmp_path, resize="cubic", download=False)
    assert list(tmp_path.iterdir()) == []  # refused before looking for files


def test_decode_png_convention():
    im = Image.new("1", (105, 105), 1)  # white paper
    for x in range(40, 60):
        for y in range(10, 90):
            im.putpixel((x, y), 0)  # a black vertical stroke
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = om.decode_png(buf.getvalue(), 28)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out[0, 0] == 0 and out[14, 13] >= 250  # background 0, ink ~255 (Lanczos may ring by 1-2)


def _diagonal_stroke() -> Image.Image:
    im = Image.new("1", (105, 105), 1)  # white paper
    for x in range(10, 95):
        for w in range(6):
            im.putpixel((x, min(104, x + w)), 0)  # a black diagonal stroke, 6 pixels thick
    return im


def test_nearest_resize_is_snells_loader():
    """resize="nearest" gives the binary images of Snell et al.'s loader (``Image.resize`` of the 1-bit
    PNG, then ``1 - x``), up to its scale (ink 255 here, 1 there); Lanczos gives grey edges."""
    im = _diagonal_stroke()
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    nearest = om.decode_png(buf.getvalue(), 28, "nearest")
    snell = 1.0 - np.array(im.resize((28, 28)), np.float32)
    assert np.array_equal(nearest.astype(np.float32) / 255, snell)
    assert set(np.unique(nearest).tolist()) == {0, 255}
    lanczos = om.decode_png(buf.getvalue(), 28)
    assert len(np.unique(lanczos)) > 10 and not np.array_equal(lanczos, nearest)


def test_decode_and_cache_on_small_fake(tmp_path, monkeypatch):
    """The decode / cache / corrupt-member path, on a fake Omniglot with the expected counts patched."""
    folder = _fake_omniglot(tmp_path / "data", alphabets=2, chars=2, short=False)
    monkeypatch.setattr(om, "ARCHIVES", {"images_background.zip": (2, 4), "images_evaluation.zip": (2, 4)})
    monkeypatch.setattr(om, "SPLIT_LINES", dict.fromkeys(om.VINYALS_SPLITS, 1))
    monkeypatch.setenv("METALOOP_CACHE", str(tmp_path / "cache"))
    ds = load_omniglot("background", image_size=12, data_dir=tmp_path / "data", download=False)
    assert ds.class_names == [
        "Alpha0b/character01",
        "Alpha0b/character02",
        "Alpha1b/character01",
        "Alpha1b/character02",
    ]
    assert tuple(ds.images.shape) == (80, 1, 12, 12) and int(ds.images.max()) == 0  # blank paper
    assert (
        load_omniglot("evaluation", image_size=12, data_dir=tmp_path / "data").class_names[0]
        == "Alpha0e/character01"
    )
    assert load_omniglot("train", image_size=12, data_dir=tmp_path / "data").class_names == [
        "Alpha0b/character01/rot090"
    ]
    assert len(list((tmp_path / "cache").glob("omniglot-12-*.pt"))) == 1
    # another resize filter: its own cache file, and the dataset records the filter
    nearest = load_omniglot("background", image_size=12, data_dir=tmp_path / "data", resize="nearest")
    assert nearest.transform.resize == "nearest" and ds.transform.resize == "lanczos"
    assert len(list((tmp_path / "cache").glob("omniglot-12-nearest-*.pt"))) == 1
    assert len(list((tmp_path / "cache").glob("omniglot-12-*.pt"))) == 2
    # a cache file holding another filter's images is rebuilt, not used
    lanczos_cache = next(p for p in (tmp_path / "cache").glob("omniglot-12-*.pt") if "nearest" not in p.name)
    nearest_cache = next((tmp_path / "cache").glob("omniglot-12-nearest-*.pt"))
    shutil.copy(lanczos_cache, nearest_cache)
    with pytest.warns(UserWarning, match="unusable .*rebuilding"):
        load_omniglot("background", image_size=12, data_dir=tmp_path / "data", resize="nearest")
    assert torch.load(nearest_cache, weights_only=True)["resize"] == "nearest"
    # flip bytes inside one stored PNG: new hash, so no cache hit, and the decode fails clearly
    path = folder / "images_evaluation.zip"
    data = bytearray(path.read_bytes())
    at = data.find(_png()) + 40
    data[at : at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(OmniglotError, match=r"images_evaluation.zip.*(corrupt|cannot decode).*delete"):
        load_omniglot("background", image_size=12, data_dir=tmp_path / "data", download=False)
