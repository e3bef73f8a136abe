"""The model-based learner (attention over the support sequence): its attention mask, order
invariance of the support sequence, batched prediction, learning and checkpoints."""

import pytest
import torch

from metaloop.algorithms import AttentiveLearner
from metaloop.algorithms.attention import support_query_mask
from metaloop.checkpoint import load_checkpoint
from metaloop.config import load_config
from metaloop.evaluate import test_learner as meta_test
from metaloop.learners import learner_from_checkpoint
from metaloop.tasks import EpisodeSampler
from metaloop.train import run


def small(ways: int = 4) -> AttentiveLearner:
    torch.manual_seed(0)
    return AttentiveLearner(hidden=8, ways=ways, d_model=16, layers=2, heads=2)


def test_mask_lets_queries_see_the_support_set_and_themselves_only():
    blocked = support_query_mask(3, 2, torch.device("cpu"))
    expected_allowed = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(~blocked, expected_allowed)


def test_prediction_ignores_the_order_of_the_support_sequence(class_images):
    """No positional encoding: shuffling the (image, label) support pairs changes nothing."""
    learner = small().eval()
    batch = EpisodeSampler(class_images, 4, 2, 3, seed=0).sample(1)
    support_x, support_y, query_x = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    logits = learner.adapt(support_x, support_y)(query_x)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    shuffled = learner.adapt(support_x[order], support_y[order])(query_x)
    assert torch.allclose(logits, shuffled, atol=1e-5)
    # a query's answer does not depend on the other queries either
    alone = learner.adapt(support_x, support_y)(query_x[:1])
    assert torch.allclose(logits[:1], alone, atol=1e-5)


def test_prediction_reads_the_labels(class_images):
    """Labels are inputs: giving the support classes other labels changes the answer."""
    learner = small().eval()
    batch = EpisodeSampler(class_images, 4, 1, 2, seed=0).sample(1)
    relabelled = (batch.support_y[0] + 1) % 4
    a = learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    b = learner.adapt(batch.support_x[0], relabelled)(batch.query_x[0])
    assert not torch.allclose(a, b, atol=1e-4)


def test_batched_predict_equals_per_task_adapt(class_images):
    learner = small().eval()
    batch = EpisodeSampler(class_images, 4, 2, 3, seed=1).sample(3)
    logits = learner.predict(batch)
    assert logits.shape == (3, 12, 4)
    for t in range(3):
        single = learner.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t])
        assert torch.allclose(logits[t], single, atol=1e-5)


def test_fewer_ways_use_the_first_logits_and_more_are_refused(class_images):
    learner = small().eval()
    three = EpisodeSampler(class_images, 3, 1, 2, seed=0).sample(2)
    assert learner.predict(three).shape == (2, 6, 3)
    five = EpisodeSampler(class_images, 5, 1, 1, seed=0).sample(1)
    with pytest.raises(
        ValueError, match="tasks of up to 4 ways .* task has 5 classes; train one with ways=5"
    ):
        learner.meta_loss(five)


def test_learns_and_round_trips_through_a_checkpoint(image_folder, tmp_path, tiny_cli_args):
    extra = ("algorithm.name=attention", "algorithm.d_model=32", "algorithm.heads=2", "train.lr=0.003")
    extra += ("train.meta_batch_size=4", "train.steps=250", "train.val_every=125", "eval.episodes=30")
    run_dir = tmp_path / "run"
    config = load_config(overrides=tiny_cli_args(image_folder, run_dir, *extra)[1::2])
    result = run(config, progress=False)
    assert result.mean > 0.5  # 3-way: chance is 1/3
    learner = learner_from_checkpoint(load_checkpoint(run_dir / "best.pt"))
    assert learner.hparams["d_model"] == 32
    assert meta_test(config, learner, progress=False).mean == result.mean  # same model back
