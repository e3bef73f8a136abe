"""The embedded glyphs dataset: counts, splits, determinism, image format, cache, argument checks."""

from __future__ import annotations

import pytest
import torch

from metaloop.data import glyphs
from metaloop.data.glyphs import GLYPH_BLOCK_SPLITS, GLYPH_SPLITS, glyph_alphabets, load_glyphs


@pytest.fixture(autouse=True)
def _no_cache_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METALOOP_CACHE", raising=False)


@pytest.fixture(scope="module")
def glyph_dir(generated_glyphs):
    return generated_glyphs[1].parent.parent  # the data folder whose cache holds the generated set


@pytest.fixture(scope="module")
def all_set(generated_glyphs):
    return generated_glyphs[0]  # load_glyphs("all", data_dir=glyph_dir), generated there (conftest.py)


@pytest.fixture(scope="module")
def splits(glyph_dir, all_set):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("METALOOP_CACHE", raising=False)
        return {s: load_glyphs(s, data_dir=glyph_dir) for s in ("train", "val", "test")}


def test_counts(all_set):
    assert all_set.num_classes >= 1000
    assert bool((all_set.class_sizes == 20).all())
    assert len(set(all_set.class_names)) == all_set.num_classes


def test_splits_partition_all_by_block(all_set, splits):
    names = {s: set(d.class_names) for s, d in splits.items()}
    blocks = {s: {n.split("/")[0] for n in d.class_names} for s, d in splits.items()}
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not names[a] & names[b]
        assert not blocks[a] & blocks[b]
    assert names["train"] | names["val"] | names["test"] == set(all_set.class_names)
    assert splits["test"].num_classes >= 100 and splits["val"].num_classes >= 40
    assert 0.6 < splits["train"].num_classes / all_set.num_classes < 0.8
    for s, bs in blocks.items():
        assert all(GLYPH_BLOCK_SPLITS[b] == s for b in bs)


def test_split_images_match_all(all_set, splits):
    test = splits["test"]
    k = all_set.class_names.index(test.class_names[0])
    assert torch.equal(test.class_images(0), all_set.class_images(k))


def test_alphabets(all_set):
    alphabets = glyph_alphabets()
    assert set(alphabets) <= set(GLYPH_BLOCK_SPLITS)
    assert [n for names in alphabets.values() for n in names] == all_set.class_names
    assert "Basic Latin/U+0041" in alphabets["Basic Latin"]
    assert "Greek and Coptic/U+0391" not in all_set.class_names  # looks exactly like Latin "A"
    assert "Greek and Coptic/U+03B1" in all_set.class_names  # alpha does not


def test_image_format(all_set):
    images = all_set.images
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
    assert bool((images.flatten(1).amax(1) == 255).all())  # no blank image, full contrast
    assert (images == 0).float().mean() > 0.6  # dark background
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 0], images[..., -1]], -1)
    assert (border > 0).float().mean() < 1e-3  # centred with a margin, not clipped


def test_instances_differ(all_set):
    per_class = all_set.images.view(all_set.num_classes, 20, -1)
    for k in range(0, all_set.num_classes, 7):
        assert len({bytes(x.numpy()) for x in per_class[k]}) == 20


def test_deterministic_for_a_seed():
    a = load_glyphs("val", instances_per_class=3, seed=5, cache=False)
    b = load_glyphs("val", instances_per_class=3, seed=5, cache=False)
    c = load_glyphs("val", instances_per_class=3, seed=6, cache=False)
    assert a.class_names == b.class_names == c.class_names
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_other_image_size():
    data = load_glyphs("test", image_size=20, instances_per_class=1, cache=False)
    assert data.image_shape == (1, 20, 20) and bool((data.images.flatten(1).amax(1) == 255).all())


def test_cache_round_trip_and_corrupt_file(tmp_path, monkeypatch):
    first = load_glyphs("val", instances_per_class=2, data_dir=tmp_path)
    (path,) = (tmp_path / "cache").glob("glyphs-*-28-2-0.pt")

    def fail(*args):
        raise AssertionError("regenerated although the cache is valid")

    with monkeypatch.context() as mp:
        mp.setattr(glyphs, "_generate", fail)
        again = load_glyphs("val", instances_per_class=2, data_dir=tmp_path)
    assert again.class_names == first.class_names and torch.equal(again.images, first.images)

    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="regenerating"):
        repaired = load_glyphs("val", instances_per_class=2, data_dir=tmp_path)
    assert torch.equal(repaired.images, first.images)
    rewritten = torch.load(path, weights_only=True)  # the "all" set, readable again
    assert rewritten["class_names"] == [n for names in glyph_alphabets().values() for n in names]


def test_unwritable_cache_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # the cache folder would be inside a file
    with pytest.warns(UserWarning, match="could not write cache"):
        data = load_glyphs("val", instances_per_class=1, data_dir=blocker)
    assert data.num_classes >= 40


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "evaluation"}, "train"),
        ({"image_size": 4}, "image_size must be an integer >= 8"),
        ({"instances_per_class": 0}, "instances_per_class must be an integer >= 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_glyphs(cache=False, **kwargs)


def test_split_names():
    assert GLYPH_SPLITS == ("train", "val", "test", "all")
    assert set(GLYPH_BLOCK_SPLITS.values()) == {"train", "val", "test"}
