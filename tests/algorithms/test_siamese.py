"""Siamese networks (Koch et al. 2015; contrastive variant): balanced episode pairs, the pair
loss against a direct computation, prediction by similarity, learning and checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from metaloop.algorithms import Siamese
from metaloop.algorithms.siamese import episode_pairs
from metaloop.checkpoint import load_checkpoint
from metaloop.config import load_config
from metaloop.evaluate import test_learner as meta_test
from metaloop.learners import learner_from_checkpoint
from metaloop.tasks import EpisodeSampler
from metaloop.train import run


@pytest.mark.parametrize("ways, shots, queries", [(2, 1, 1), (5, 1, 3), (5, 2, 5), (20, 1, 1)])
def test_pairs_are_balanced_and_labelled_by_class(ways, shots, queries):
    support_y = torch.arange(ways).repeat_interleave(shots)
    query_y = torch.arange(ways).repeat_interleave(queries)
    q, s, same = episode_pairs(support_y, query_y, ways)
    assert same.sum() == (1 - same).sum() == ways * queries  # as many same as different pairs
    assert torch.equal(same.bool(), query_y[q] == support_y[s])  # same exactly when the classes match
    assert torch.equal(q.bincount(minlength=ways * queries), torch.full((ways * queries,), 2))
    if queries >= ways - 1:  # the different-class partners of a class's queries cover every other class
        for c in range(ways):
            partners = set(support_y[s[(same == 0) & (query_y[q] == c)]].tolist())
            assert partners == set(range(ways)) - {c}


def test_one_class_episodes_are_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        episode_pairs(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1)


def test_bce_loss_is_the_weighted_l1_pair_loss():
    """3-way 1-shot 1-query by hand: pairs (q_c, s_c, same) and (q_c, s_{c+1 mod 3}, different)."""
    torch.manual_seed(0)
    learner = Siamese(hidden=8, image_size=16)
    g = torch.Generator().manual_seed(1)
    support_x, query_x = torch.rand(1, 3, 1, 16, 16, generator=g), torch.rand(1, 3, 1, 16, 16, generator=g)
    labels = torch.arange(3)[None]
    from metaloop.tasks.episodes import TaskBatch

    loss, metrics = learner.meta_loss(TaskBatch(support_x, labels, query_x, labels, 3))
    z = learner.encoder(torch.cat([support_x[0], query_x[0]]))  # one task: plain batch norm
    zs, zq = z[:3], z[3:]
    a, b = learner.distance_weights.weight[0], learner.distance_weights.bias[0]
    scores = [(a * (zq[c] - zs[c]).abs()).sum() + b for c in range(3)]
    scores += [(a * (zq[c] - zs[(c + 1) % 3]).abs()).sum() + b for c in range(3)]
    expected = F.binary_cross_entropy_with_logits(torch.stack(scores), torch.tensor([1.0] * 3 + [0.0] * 3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and metrics["loss"] == loss.item()


@pytest.mark.parametrize("loss", ["bce", "contrastive"])
def test_hardest_negatives_pair_each_query_with_its_most_similar_other_class_example(loss):
    """4-way 2-shot 2-query by hand: the same-class pairs are those of ``cycle``; each query's
    different-class partner is the other-class support example scoring highest against it."""
    torch.manual_seed(0)
    learner = Siamese(hidden=8, image_size=16, loss=loss, negatives="hardest")
    g = torch.Generator().manual_seed(2)
    support_x, query_x = torch.rand(1, 8, 1, 16, 16, generator=g), torch.rand(1, 8, 1, 16, 16, generator=g)
    support_y = torch.arange(4).repeat_interleave(2)[None]
    query_y = torch.arange(4).repeat_interleave(2)[None]
    from metaloop.tasks.episodes import TaskBatch

    loss_value, _ = learner.meta_loss(TaskBatch(support_x, support_y, query_x, query_y, 4))
    z = learner.encoder(torch.cat([support_x[0], query_x[0]]))
    zs, zq = z[:8], z[8:]
    # query j (class c, the r-th of its class) meets support example r of class c: row 2c + r
    positives = [learner.similarity(zq[j], zs[2 * int(query_y[0, j]) + j % 2]) for j in range(8)]
    negatives = []
    for j in range(8):
        others = [i for i in range(8) if support_y[0, i] != query_y[0, j]]
        candidates = [learner.similarity(zq[j], zs[i]) for i in others]
        negatives.append(max(candidates, key=lambda score: score.item()))
    scores = torch.stack(positives + negatives)
    same = torch.tensor([1.0] * 8 + [0.0] * 8)
    if loss == "bce":
        expected = F.binary_cross_entropy_with_logits(scores, same)
    else:
        d = -scores
        expected = (same * d.pow(2) + (1 - same) * (1.0 - d).clamp_min(0).pow(2)).mean()
    assert loss_value.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown negatives 'random'; use one of cycle, hardest"):
        Siamese(negatives="random")


@pytest.mark.parametrize("loss", ["bce", "contrastive"])
def test_batched_predict_equals_adapt_and_one_shot_takes_the_nearest(class_images, loss):
    torch.manual_seed(0)
    learner = Siamese(hidden=8, loss=loss).eval()
    batch = EpisodeSampler(class_images, 4, 1, 3, seed=0).sample(3)
    logits = learner.predict(batch)
    assert logits.shape == (3, 12, 4)
    for t in range(3):
        single = learner.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t])
        assert torch.allclose(logits[t], single.detach(), atol=1e-5)
        zs, zq = learner.encoder(batch.support_x[t]), learner.encoder(batch.query_x[t])
        nearest = learner.similarity(zq[:, None], zs[None]).argmax(1)  # 1-shot: most similar example
        assert torch.equal(logits[t].argmax(-1), batch.support_y[t][nearest])


@pytest.mark.parametrize("loss", ["bce", "contrastive"])
def test_learns_and_round_trips_through_a_checkpoint(image_folder, tmp_path, tiny_cli_args, loss):
    extra = ("algorithm.name=siamese", f"algorithm.loss={loss}", "train.ways=5", "train.lr=0.005")
    extra += ("train.steps=40", "train.val_every=20", "eval.episodes=30")
    run_dir = tmp_path / "run"
    config = load_config(overrides=tiny_cli_args(image_folder, run_dir, *extra)[1::2])
    result = run(config, progress=False)
    assert result.mean > 0.6  # 3-way: chance is 1/3
    learner = learner_from_checkpoint(load_checkpoint(run_dir / "best.pt"))
    assert learner.hparams["loss"] == loss
    assert meta_test(config, learner, progress=False).mean == result.mean  # same model back


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown loss 'hinge'; use one of bce, contrastive"):
        Siamese(loss="hinge")
