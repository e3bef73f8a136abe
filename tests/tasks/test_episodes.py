import pytest
import torch

from metaloop.tasks import EpisodeSampler


def test_shapes_and_label_remapping(class_images):
    batch = EpisodeSampler(class_images, ways=5, shots=2, queries=3, seed=0).sample(4)
    assert batch.support_x.shape == (4, 10, 1, 28, 28)
    assert batch.query_x.shape == (4, 15, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= batch.support_x.min() and batch.support_x.max() <= 1.0
    for t in range(4):
        assert batch.support_y[t].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        assert batch.query_y[t].tolist() == sum(([k] * 3 for k in range(5)), [])


def _rows(dataset, images):
    """Map each image back to its dataset row (images of the synthetic set are all distinct)."""
    flat = (dataset.images.float() / 255).flatten(1)
    return [int((flat == x.flatten()).all(1).nonzero()[0]) for x in images]


def test_labels_follow_classes_and_support_query_disjoint(class_images):
    batch = EpisodeSampler(class_images, ways=4, shots=2, queries=3, seed=3).sample(1)
    support_rows = _rows(class_images, batch.support_x[0])
    query_rows = _rows(class_images, batch.query_x[0])
    assert not set(support_rows) & set(query_rows)
    row_class = torch.repeat_interleave(torch.arange(class_images.num_classes), class_images.class_sizes)
    support_classes = row_class[support_rows].view(4, 2)
    query_classes = row_class[query_rows].view(4, 3)
    assert (support_classes == support_classes[:, :1]).all()  # one class per label
    assert (query_classes == support_classes[:, :1]).all()  # queries share their label's class
    assert len(set(support_classes[:, 0].tolist())) == 4  # distinct classes per task
    assert batch.classes[0].tolist() == support_classes[:, 0].tolist()  # label k is dataset class classes[k]


def test_same_seed_same_episodes_whatever_the_batch_size(class_images):
    one = EpisodeSampler(class_images, 5, 1, 2, seed=7)
    other = EpisodeSampler(class_images, 5, 1, 2, seed=7)
    singles = [one.sample(1) for _ in range(6)]
    batched = other.sample(4), other.sample(2)
    stacked = torch.cat([b.support_x for b in batched])
    assert torch.equal(torch.cat([b.support_x for b in singles]), stacked)
    assert torch.equal(torch.cat([b.query_x for b in singles]), torch.cat([b.query_x for b in batched]))


def test_different_seeds_differ(class_images):
    a = EpisodeSampler(class_images, 5, 1, 2, seed=0).sample(2)
    b = EpisodeSampler(class_images, 5, 1, 2, seed=1).sample(2)
    assert not torch.equal(a.support_x, b.support_x)


def test_state_dict_continues_the_stream(class_images):
    sampler = EpisodeSampler(class_images, 5, 1, 2, seed=0)
    sampler.sample(3)
    state = sampler.state_dict()
    expected = sampler.sample(2)
    fresh = EpisodeSampler(class_images, 5, 1, 2, seed=99)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sample(2).query_x, expected.query_x)


def test_unequal_class_sizes_never_pick_padding(class_images):
    small = class_images.subset([0, 1, 2])
    images = torch.cat([small.class_images(0)[:4], small.class_images(1), small.class_images(2)[:6]])
    from metaloop.data.base import ClassImages

    uneven = ClassImages(images, torch.tensor([0, 4, 14, 20]), ["a", "b", "c"], "uneven")
    sampler = EpisodeSampler(uneven, ways=3, shots=2, queries=2, seed=0)
    for _ in range(20):
        batch = sampler.sample(1)
        assert batch.support_x.shape == (1, 6, 1, 28, 28)
        assert set(_rows(uneven, batch.support_x[0]) + _rows(uneven, batch.query_x[0])) <= set(range(20))


def test_too_many_ways_names_the_numbers(class_images):
    with pytest.raises(ValueError, match=r"13-way tasks but synthetic has only 12 classes"):
        EpisodeSampler(class_images, ways=13, shots=1, queries=1)


def test_too_many_examples_names_the_numbers(class_images):
    with pytest.raises(ValueError, match=r"shots \+ queries = 5 \+ 6 = 11 .* holds only 10"):
        EpisodeSampler(class_images, ways=2, shots=5, queries=6)


@pytest.mark.parametrize("field", ["ways", "shots", "queries"])
def test_non_positive_shape_is_rejected(class_images, field):
    kwargs = {"ways": 2, "shots": 1, "queries": 1, field: 0}
    with pytest.raises(ValueError, match=field):
        EpisodeSampler(class_images, **kwargs)
