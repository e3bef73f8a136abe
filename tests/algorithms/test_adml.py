"""ADML: exact meta-gradient against an independent reference, all execution strategies, checkpoint
round trip, configuration and errors.

The reference makes its own FGSM examples (per task, with the reference network) and treats them,
as the paper and the library do, as constants of the outer loss: the meta-gradient is not taken
through the attack. For PGD, whose random start comes from torch's global generator, the reference
is given the library's adversarial images (fixed tensors) instead.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import episode_accuracies
from gradient_helpers import (
    TOLERANCE,
    image_batch,
    learner_gradients,
    max_difference,
    net_params,
    small_learner,
)
from reference import conv_net, meta_gradient, sgd_steps, task_loss

from metaloop.algorithms import ADML, build_learner
from metaloop.checkpoint import load_checkpoint, save_checkpoint
from metaloop.config import ConfigError, load_config
from metaloop.learners import learner_from_checkpoint, learner_from_config
from metaloop.tasks import EpisodeSampler
from metaloop.tasks.source import TaskSource
from metaloop.train import run


def reference_fgsm(params, x, y, epsilon):
    """x_adv = clip(x + ε sign(∇_x CE(f_θ(x), y)), 0, 1) for one task, θ held fixed."""
    fixed = {name: p.detach() for name, p in params.items()}
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(conv_net(fixed, x), y), x)
    return (x.detach() + epsilon * grad.sign()).clamp(0, 1)


def reference_adml_loss(params, batch, lr, steps, first_order, epsilon=None, adversarial=None):
    """(1/T) Σ_t [L(f_{φ_t^clean}, Q_t^adv) + L(f_{φ_t^adv}, Q_t)], φ_t^clean after ``steps`` SGD steps on
    the clean support set and φ_t^adv on the adversarial one. Adversarial sets: FGSM with ``epsilon``
    by the reference, or ``adversarial = (support_adv, query_adv)`` given."""
    names = list(params)
    total = 0.0
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        if adversarial is None:
            sx_adv, qx_adv = reference_fgsm(params, sx, sy, epsilon), reference_fgsm(params, qx, qy, epsilon)
        else:
            sx_adv, qx_adv = adversarial[0][t], adversarial[1][t]
        clean = sgd_steps(conv_net, params, names, lr, sx, sy, steps, first_order)
        adv = sgd_steps(conv_net, params, names, lr, sx_adv, sy, steps, first_order)
        total = total + task_loss(conv_net(clean, qx_adv), qy) + task_loss(conv_net(adv, qx), qy)
    return total / batch.num_tasks


def reference_gradients(learner, batch, adversarial=None):
    params = net_params(learner)
    h = learner.hparams
    loss = reference_adml_loss(
        params, batch, h["inner_lr"], h["inner_steps"], h["first_order"], h["epsilon"], adversarial
    )
    return loss, {"net." + k: v for k, v in meta_gradient(loss, params).items()}


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_equals_reference(steps, first_order):
    learner = small_learner("adml", "conv4", inner_steps=steps, first_order=first_order, epsilon=0.05)
    batch = image_batch()
    loss, grads = learner_gradients(learner, batch)
    ref_loss, ref_grads = reference_gradients(learner, batch)
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE
    # the same adversarial images as the reference's FGSM, and they did change the loss
    params = net_params(learner)
    for t in range(batch.num_tasks):
        expected = reference_fgsm(params, batch.query_x[t], batch.query_y[t], 0.05)
        assert torch.equal(learner.adversarial(batch.query_x, batch.query_y)[t], expected)
    h = learner.hparams
    maml_like = reference_adml_loss(
        params, batch, h["inner_lr"], steps, first_order, adversarial=(batch.support_x, batch.query_x)
    )
    assert abs(loss.item() - maml_like.item()) > 1e-3


def test_pgd_meta_gradient_equals_reference_on_the_same_adversarial_images():
    learner = small_learner("adml", "conv4", attack="pgd", epsilon=0.05, attack_steps=3)
    batch = image_batch()
    torch.manual_seed(1)
    adversarial = (
        learner.adversarial(batch.support_x, batch.support_y),
        learner.adversarial(batch.query_x, batch.query_y),
    )
    for clean, adv in zip((batch.support_x, batch.query_x), adversarial, strict=True):
        assert (adv - clean).abs().max() <= 0.05 + 1e-12 and 0 <= adv.min() and adv.max() <= 1
    torch.manual_seed(1)  # meta_loss draws the same random starts, support first
    loss, grads = learner_gradients(learner, batch)
    ref_loss, ref_grads = reference_gradients(learner, batch, adversarial)
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE


@pytest.mark.parametrize("strategy", ["vmap", "batched"])
def test_every_strategy_gives_the_loop_meta_gradient(strategy):
    batch = image_batch()
    _, loop = learner_gradients(small_learner("adml", "conv4", inner_steps=2), batch)
    _, other = learner_gradients(small_learner("adml", "conv4", inner_steps=2, strategy=strategy), batch)
    assert max_difference(loop, other) < TOLERANCE


def test_checkpoint_round_trip(tmp_path, class_images):
    learner = ADML(hidden=4, ways=3, attack="pgd", epsilon=0.2, attack_steps=4, eval_inner_steps=2)
    assert all(isinstance(v, int | float | str | bool) for v in learner.hparams.values())
    path = tmp_path / "adml.pt"
    save_checkpoint(
        path, {"algorithm": learner.name, "hparams": learner.hparams, "model": learner.state_dict()}
    )
    clone = learner_from_checkpoint(load_checkpoint(path))
    assert type(clone) is ADML and clone.hparams == learner.hparams
    assert (clone.hparams["attack"], clone.hparams["epsilon"], clone.hparams["attack_steps"]) == (
        "pgd",
        0.2,
        4,
    )
    batch = EpisodeSampler(class_images, 3, 1, 2, seed=0).sample(2)
    assert torch.equal(clone.predict(batch), learner.predict(batch))


def test_config_keys_reach_the_learner_and_are_refused_elsewhere(image_folder):
    base = ["train.ways=3", "eval.ways=3", "data.name=folder", f"data.root={image_folder}"]
    config = load_config(
        overrides=[
            *base,
            "algorithm.name=adml",
            "algorithm.attack=pgd",
            "algorithm.epsilon=0.05",
            "algorithm.attack_steps=3",
        ]
    )
    learner = learner_from_config(config, TaskSource(config))
    assert (learner.hparams["attack"], learner.hparams["epsilon"], learner.hparams["attack_steps"]) == (
        "pgd",
        0.05,
        3,
    )
    assert learner.hparams["inner_lr"] == 0.4 and learner.hparams["ways"] == 3  # MAML's defaults otherwise
    with pytest.raises(ConfigError, match="'maml' takes no algorithm.epsilon"):
        maml = load_config(overrides=[*base, "algorithm.name=maml", "algorithm.epsilon=0.1"])
        learner_from_config(maml, TaskSource(maml))


@pytest.mark.parametrize(
    "hparams, message",
    [
        ({"backbone": "mlp"}, "adml attacks images in \\[0, 1\\] and needs an image classifier"),
        ({"attack": "cw"}, "unknown attack 'cw'; use one of fgsm, pgd"),
        ({"epsilon": 0.0}, "epsilon must be in \\(0, 1\\]"),
        ({"attack": "pgd", "attack_steps": 0}, "at least 1 step"),
    ],
)
def test_bad_settings_are_actionable_errors(hparams, message):
    with pytest.raises(ValueError, match=message):
        build_learner("adml", **hparams)


@pytest.mark.parametrize("ways", [5, 20])
def test_recipes_build_an_adml_learner(ways):
    config = load_config(Path(__file__).parents[2] / "configs" / f"adml_omniglot_{ways}w1s.yaml")
    algorithm = {
        k: v for k, v in dataclasses.asdict(config.algorithm).items() if k != "name" and v is not None
    }
    learner = build_learner(config.algorithm.name, ways=config.train.ways, **algorithm)
    assert isinstance(learner, ADML) and learner.hparams["ways"] == config.eval.ways == ways
    assert (learner.hparams["attack"], learner.hparams["epsilon"]) == ("fgsm", 0.1)


def test_a_short_training_run_logs_both_query_accuracies(image_folder, tmp_path, tiny_cli_args):
    """ADML through the trainer: 4 outer steps, then the test; the log has its own metrics."""
    args = tiny_cli_args(image_folder, tmp_path / "run", "algorithm.name=adml", "train.log_every=2")
    result = run(load_config(overrides=args[1::2]), progress=False)
    config = load_config(overrides=args[1::2])
    best = learner_from_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt"))
    values = episode_accuracies(best, TaskSource(config).dataset(config.data.test_split), config.eval)
    assert result.episodes == 10 and result.mean == pytest.approx(values.mean().item(), abs=1e-6)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "train_loss" in r]
    assert train_lines and all(
        "train_adv_query_accuracy" in r and "train_clean_query_accuracy" in r for r in train_lines
    )
