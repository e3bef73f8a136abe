"""The transfer baseline (Chen et al. 2019): pretraining on meta-train classes only, per-task
head fitting batched exactly like one task at a time, both heads, whole-network fine-tuning."""

import pytest
import torch
import torch.nn.functional as F

from metaloop.algorithms import TransferBaseline
from metaloop.algorithms.baseline import head_logits
from metaloop.checkpoint import load_checkpoint
from metaloop.config import load_config
from metaloop.evaluate import test_learner as meta_test
from metaloop.learners import learner_from_checkpoint
from metaloop.tasks import EpisodeSampler
from metaloop.train import run


def small(head: str = "linear", **extra) -> TransferBaseline:
    torch.manual_seed(0)
    return TransferBaseline(hidden=8, num_classes=12, head=head, **{"finetune_steps": 30, **extra})


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_batched_heads_equal_per_task_heads(class_images, head):
    learner = small(head).eval()
    batch = EpisodeSampler(class_images, 4, 2, 3, seed=0).sample(3)
    batched = learner.predict(batch)
    assert batched.shape == (3, 12, 4)
    for t in range(3):
        single = learner.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t])
        assert torch.allclose(batched[t], single, atol=1e-5)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_fitted_head_separates_the_support_set(head):
    """15 points in 32 dimensions are separable: 100 Adam steps fit every support label."""
    learner = small(head, finetune_steps=100)
    z = torch.randn(4, 15, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(5).repeat_interleave(3).expand(4, -1)
    weight, bias = learner.fit_heads(z, labels, 5)
    assert (head_logits(head, weight, bias, z, 10.0).argmax(-1) == labels).all()


def test_pretraining_is_classification_over_dataset_classes(class_images):
    """One task: the loss is plain cross-entropy of the classifier over the 12 dataset classes."""
    learner = small()
    batch = EpisodeSampler(class_images, 5, 1, 2, seed=0).sample(1)
    loss, metrics = learner.meta_loss(batch)
    images = torch.cat([batch.support_x, batch.query_x], 1)[0]
    labels = batch.classes[0][torch.cat([batch.support_y, batch.query_y], 1)[0]]
    expected = F.cross_entropy(learner.classifier(learner.encoder(images)), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and metrics["loss"] == loss.item()
    loss.backward()
    assert learner.classifier.weight.grad.abs().sum() > 0


def test_finetuning_the_backbone_moves_predictions(class_images):
    batch = EpisodeSampler(class_images, 4, 2, 3, seed=0).sample(1)
    frozen = small().eval().predict(batch)
    tuned = small(finetune_backbone=True).eval().predict(batch)
    assert tuned.shape == frozen.shape and not torch.allclose(tuned, frozen, atol=1e-4)


def test_checkpoint_round_trip_and_learning(image_folder, tmp_path, tiny_cli_args):
    extra = ("algorithm.name=baseline", "algorithm.head=cosine", "train.ways=10", "train.lr=0.005")
    extra += ("train.steps=40", "train.val_every=20", "eval.episodes=30")
    run_dir = tmp_path / "run"
    config = load_config(overrides=tiny_cli_args(image_folder, run_dir, *extra)[1::2])
    result = run(config, progress=False)
    assert result.mean > 0.6  # 3-way: chance is 1/3 (measured 0.76 here)
    learner = learner_from_checkpoint(load_checkpoint(run_dir / "best.pt"))
    assert learner.hparams["num_classes"] == 21 and learner.hparams["head"] == "cosine"
    assert meta_test(config, learner, progress=False).mean == result.mean  # same model back


def test_unknown_head_is_rejected():
    with pytest.raises(ValueError, match="unknown head 'mlp'; use one of linear, cosine"):
        TransferBaseline(head="mlp")
