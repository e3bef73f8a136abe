"""bf16 autocast (``train.precision``): offered exactly for the learners whose bfloat16 meta-gradient
agrees with float32, measured here on one 5-way 1-shot batch of a 32-filter Conv-4."""

import pytest
import torch
from conftest import make_class_images

from metaloop.algorithms import LEARNERS, build_learner
from metaloop.config import ConfigError, load_config
from metaloop.tasks.episodes import EpisodeSampler
from metaloop.train import Trainer, autocast

AGREEMENT = 0.99  # least cosine similarity between the bf16 and float32 meta-gradients


def meta_gradient(name: str, batch, precision: str) -> torch.Tensor:
    torch.manual_seed(0)
    hparams = {
        "protonet": {"hidden": 32},
        "baseline": {"hidden": 32, "num_classes": 12},
        "siamese": {"hidden": 32},
        "attention": {"hidden": 32, "ways": 5},
    }.get(name, {"backbone": "conv4", "hidden": 32, "ways": 5})
    learner = build_learner(name, **hparams)
    with autocast(torch.device("cpu"), precision):
        loss, _ = learner.meta_loss(batch)
    assert loss.dtype == torch.float32  # the loss itself is reduced in float32
    loss.backward()
    return torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_bf16_is_offered_exactly_where_its_meta_gradient_agrees_with_float32(name):
    batch = EpisodeSampler(make_class_images(), 5, 1, 5, seed=0).sample(8)
    exact, mixed = meta_gradient(name, batch, "fp32"), meta_gradient(name, batch, "bf16")
    assert not torch.equal(exact, mixed)  # autocast really changed the arithmetic
    cosine = torch.nn.functional.cosine_similarity(exact, mixed, dim=0).item()
    assert (cosine >= AGREEMENT) == LEARNERS[name].bf16_safe, f"{name}: cosine {cosine:.4f}"


def test_bf16_training_tracks_float32_training(image_folder, tmp_path, tiny_cli_args):
    best = {}
    for precision in ("fp32", "bf16"):
        extra = ("train.steps=20", "train.val_every=10", f"train.precision={precision}")
        args = tiny_cli_args(image_folder, tmp_path / precision, *extra)
        trainer = Trainer(load_config(overrides=args[1::2]), progress=False)
        trainer.start()
        trainer.fit()
        best[precision] = trainer.state.best_val
    assert best["fp32"] > 0.6  # well above chance (1/3): the comparison below means something
    assert abs(best["bf16"] - best["fp32"]) < 0.05, best


def test_bf16_is_refused_for_maml_and_unknown_precisions(image_folder, tmp_path):
    base = [
        "data.name=folder",
        f"data.root={image_folder}",
        "train.ways=3",
        "eval.ways=3",
        "eval.queries=3",
        f"run_dir={tmp_path / 'r'}",
    ]
    with pytest.raises(ConfigError, match="not offered for maml.*bf16 is offered for: .*protonet, reptile"):
        Trainer(load_config(overrides=[*base, "algorithm.name=maml", "train.precision=bf16"]), progress=False)
    with pytest.raises(ConfigError, match="train.precision must be one of fp32, bf16, got 'fp8'"):
        Trainer(load_config(overrides=[*base, "train.precision=fp8"]), progress=False)
    assert not (tmp_path / "r").exists()
