"""Heterogeneous episodes: ways, shots and dataset drawn per task, grouped by shape (no padding),
and the group-weighted loss equal to the mean over tasks taken one at a time."""

import pytest
import torch
from conftest import make_class_images

from metaloop.algorithms import build_learner
from metaloop.evaluate import episode_metrics
from metaloop.tasks.episodes import TaskBatch
from metaloop.tasks.heterogeneous import MixedEpisodeSampler, TaskGroups, mean_over_tasks


def tasks_in_draw_order(tasks) -> list[TaskBatch]:
    """Every task alone, in the order it was drawn."""
    if isinstance(tasks, TaskBatch):
        return [tasks.task(t) for t in range(tasks.num_tasks)]
    order = {}
    for group, where in zip(tasks.groups, tasks.positions, strict=True):
        for t, position in enumerate(where.tolist()):
            order[position] = group.task(t)
    return [order[i] for i in range(tasks.num_tasks)]


@pytest.fixture
def mixture():
    return [make_class_images(num_classes=12, seed=0), make_class_images(num_classes=9, seed=5)]


def test_shapes_stay_in_their_ranges_and_groups_are_homogeneous(mixture):
    sampler = MixedEpisodeSampler(mixture, ways=2, shots=1, queries=2, seed=0, max_ways=5, max_shots=3)
    tasks = sampler.sample(40)
    assert isinstance(tasks, TaskGroups) and tasks.num_tasks == 40
    seen = set()
    for group in tasks.groups:
        assert 2 <= group.ways <= 5 and group.support_x.shape[0] == group.num_tasks
        shots = group.support_y.shape[1] // group.ways
        assert 1 <= shots <= 3 and group.query_y.shape[1] == 2 * group.ways
        seen.add((group.ways, shots))
    assert len(seen) > 5  # many shapes occur
    assert sorted(torch.cat(tasks.positions).tolist()) == list(range(40))


def test_tasks_come_from_both_datasets_with_their_own_classes(mixture):
    sampler = MixedEpisodeSampler(mixture, ways=3, shots=1, queries=1, seed=1)
    batch = sampler.sample(30)  # one shape: a plain TaskBatch
    assert isinstance(batch, TaskBatch)
    flat = [(d.images.float() / 255).flatten(1) for d in mixture]
    origins = set()
    for t in range(30):
        for k, cls in enumerate(batch.classes[t].tolist()):
            d = 0 if cls < 12 else 1  # classes are numbered across the mixture
            image = batch.support_x[t][batch.support_y[t] == k][0].flatten()
            rows = (flat[d] == image).all(1).nonzero().flatten()
            owner = torch.repeat_interleave(torch.arange(mixture[d].num_classes), mixture[d].class_sizes)
            assert int(owner[rows[0]]) == cls - (0 if d == 0 else 12)
            origins.add(d)
    assert origins == {0, 1}


def test_same_seed_same_tasks_and_sharding_keeps_the_stream(mixture):
    def draw(keep=None):
        sampler = MixedEpisodeSampler(mixture, 2, 1, 2, seed=3, max_ways=4, max_shots=2)
        return tasks_in_draw_order(sampler.sample(10, keep=keep))

    whole, again, shard = draw(), draw(), draw(keep=range(5, 10))
    for a, b in zip(whole, again, strict=True):
        assert torch.equal(a.support_x, b.support_x)
    for a, b in zip(whole[5:], shard, strict=True):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)


def test_images_of_different_shapes_cannot_be_mixed():
    small, large = make_class_images(size=16), make_class_images(size=28)
    with pytest.raises(ValueError, match="a mixture needs images of one shape"):
        MixedEpisodeSampler([small, large], 2, 1, 1)


@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_group_weighted_loss_is_the_mean_over_single_tasks(mixture, name):
    """What the trainer optimises for unequal tasks: exactly the mean of the per-task losses."""
    torch.manual_seed(0)
    hparams = {"hidden": 8} if name == "protonet" else {"backbone": "conv4", "hidden": 8, "ways": 4}
    learner = build_learner(name, **hparams).double()
    tasks = MixedEpisodeSampler(mixture, 2, 1, 2, seed=0, max_ways=4, max_shots=2).sample(6)
    tasks = TaskGroups(
        [
            TaskBatch(g.support_x.double(), g.support_y, g.query_x.double(), g.query_y, g.ways)
            for g in tasks.groups
        ],
        tasks.positions,
    )
    assert len(tasks.groups) > 1
    loss, metrics = mean_over_tasks(tasks, learner.meta_loss)
    singles = [learner.meta_loss(task) for task in tasks_in_draw_order(tasks)]
    assert loss.item() == pytest.approx(sum(s[0].item() for s in singles) / 6, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(sum(s[1]["accuracy"] for s in singles) / 6, abs=1e-12)


def test_maml_on_fewer_ways_is_maml_with_the_first_rows_of_its_head(class_images):
    """A 3-way task on a 5-way MAML head equals a 3-way MAML whose head is those rows: loss and
    meta-gradient (float64)."""
    torch.manual_seed(0)
    wide = build_learner("maml", backbone="conv4", hidden=4, ways=5).double()
    narrow = build_learner("maml", backbone="conv4", hidden=4, ways=3).double()
    state = {k: (v[:3] if v.shape[:1] == (5,) else v) for k, v in wide.state_dict().items()}
    narrow.load_state_dict(state)
    batch = MixedEpisodeSampler([class_images], 3, 1, 2, seed=0).sample(2)
    batch = TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y, 3)
    losses = []
    for learner in (wide, narrow):
        loss, _ = learner.meta_loss(batch)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-12)
    for (name, p_wide), p_narrow in zip(wide.named_parameters(), narrow.parameters(), strict=True):
        expected = p_narrow.grad
        got = p_wide.grad[:3] if p_wide.shape[:1] == (5,) else p_wide.grad
        assert torch.allclose(got, expected, atol=1e-12), name
        if p_wide.shape[:1] == (5,):
            assert torch.all(p_wide.grad[3:] == 0)  # the unused logits get no gradient


def test_evaluation_of_unequal_tasks_keeps_the_draw_order(mixture):
    torch.manual_seed(0)
    learner = build_learner("protonet", hidden=8)
    values = episode_metrics(
        learner, MixedEpisodeSampler(mixture, 2, 1, 3, seed=4, max_ways=4), 12, batch_size=5, progress=False
    )
    learner.eval()
    tasks = []
    sampler = MixedEpisodeSampler(mixture, 2, 1, 3, seed=4, max_ways=4)
    for size in (5, 5, 2):
        tasks += tasks_in_draw_order(sampler.sample(size))
    expected = [(learner.predict(t).argmax(-1) == t.query_y).float().mean().item() for t in tasks]
    assert values.tolist() == pytest.approx(expected, abs=1e-6)


def test_rot90_turns_a_whole_task_and_shift_moves_each_image_within_reach(class_images):
    plain = MixedEpisodeSampler([class_images], 3, 2, 1, seed=0).sample(1)
    turned = MixedEpisodeSampler([class_images], 3, 2, 1, seed=0, augment="rot90")
    batch = turned.sample(1)
    images = torch.cat([batch.support_x[0], batch.query_x[0]])
    originals = torch.cat([plain.support_x[0], plain.query_x[0]])
    matches = [k for k in range(4) if torch.equal(torch.rot90(originals, k, dims=(-2, -1)), images)]
    assert len(matches) == 1  # the same classes and examples, all turned by one multiple of 90 degrees
    shifted = MixedEpisodeSampler([class_images], 3, 2, 1, seed=0, augment="shift").sample(1)
    moved = torch.cat([shifted.support_x[0], shifted.query_x[0]])
    for original, image in zip(originals, moved, strict=True):  # 28 px images: shifts of up to 3 px
        assert any(
            torch.equal(
                image[..., max(0, dy) : 28 + min(0, dy), max(0, dx) : 28 + min(0, dx)],
                original[..., max(0, -dy) : 28 + min(0, -dy), max(0, -dx) : 28 + min(0, -dx)],
            )
            for dy in range(-3, 4)
            for dx in range(-3, 4)
        )


def test_unknown_augmentation_is_refused(class_images):
    with pytest.raises(ValueError, match="unknown augmentation 'flip'; use none, or rot90 / shift"):
        MixedEpisodeSampler([class_images], 3, 1, 1, augment="flip")
