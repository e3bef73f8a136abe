"""MAML, FOMAML, Meta-SGD and ANIL: exact meta-gradients against an independent reference,
finite differences, all execution strategies, and that they learn."""

import pytest
import torch
from gradient_helpers import (
    TOLERANCE,
    batch_for,
    image_batch,
    learner_gradients,
    max_difference,
    net_params,
    small_learner,
)
from reference import conv_net, maml_loss, meta_gradient, mlp_net

from metaloop.algorithms import ANIL, FOMAML, MAML, MetaSGD, build_learner
from metaloop.nn.functional import head_names
from metaloop.tasks import EpisodeSampler
from metaloop.tasks.sinusoid import SinusoidTasks

FAMILY = ("maml", "fomaml", "metasgd", "anil")
BACKBONES = ("conv4", "mlp")
STRATEGIES = ("loop", "vmap", "batched")


def reference_gradients(learner, batch):
    """Meta-loss and meta-gradient of ``learner`` computed by the independent reference."""
    params = net_params(learner)
    h = learner.hparams
    net = conv_net if h["backbone"] == "conv4" else mlp_net
    names = head_names(learner.net) if learner.name == "anil" else None
    if learner.name == "metasgd":
        alphas = {
            name: learner.alpha[name.replace(".", "-")].detach().clone().requires_grad_() for name in params
        }
        loss = maml_loss(net, params, batch, alphas, h["inner_steps"], h["first_order"], names)
        grads = meta_gradient(loss, {**params, **{"alpha." + k: v for k, v in alphas.items()}})
        return loss, {
            ("net." + k if not k.startswith("alpha.") else "alpha." + k[6:].replace(".", "-")): v
            for k, v in grads.items()
        }
    loss = maml_loss(net, params, batch, h["inner_lr"], h["inner_steps"], h["first_order"], names)
    return loss, {"net." + k: v for k, v in meta_gradient(loss, params).items()}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_equals_reference(name, backbone, steps):
    learner = small_learner(name, backbone, inner_steps=steps)
    batch = batch_for(backbone)
    loss, grads = learner_gradients(learner, batch)
    ref_loss, ref_grads = reference_gradients(learner, batch)
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_every_strategy_gives_the_loop_meta_gradient(name, backbone, strategy):
    batch = batch_for(backbone)
    loss, grads = learner_gradients(small_learner(name, backbone, inner_steps=2), batch)
    other_loss, other = learner_gradients(
        small_learner(name, backbone, inner_steps=2, strategy=strategy), batch
    )
    assert abs(loss.item() - other_loss.item()) < TOLERANCE
    assert max_difference(grads, other) < TOLERANCE


@pytest.mark.parametrize("backbone", BACKBONES)
def test_maml_two_steps_matches_finite_differences(backbone):
    learner = small_learner("maml", backbone, inner_steps=2, inner_lr=0.1)
    batch = batch_for(backbone)
    _, grads = learner_gradients(learner, batch)
    params = dict(learner.named_parameters())
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):
        direction = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for k, p in params.items():
                    p.add_(sign * eps * direction[k])
            values.append(learner.meta_loss(batch)[0].item())
            with torch.no_grad():
                for k, p in params.items():
                    p.sub_(sign * eps * direction[k])
        numeric = (values[0] - values[1]) / (2 * eps)
        analytic = sum((grads[k] * direction[k]).sum().item() for k in params)
        assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_second_order_differs_from_first_order(backbone):
    batch = batch_for(backbone)
    _, second = learner_gradients(small_learner("maml", backbone, inner_lr=0.3, inner_steps=2), batch)
    _, first = learner_gradients(small_learner("fomaml", backbone, inner_lr=0.3, inner_steps=2), batch)
    assert max_difference(second, first) > 1e-3


def test_metasgd_step_sizes_are_learned_by_the_outer_step():
    learner = small_learner("metasgd", "conv4", alpha_low=0.01, alpha_high=0.05)
    alpha = {k: v.detach().clone() for k, v in learner.alpha.items()}
    assert set(alpha) == {name.replace(".", "-") for name, _ in learner.net.named_parameters()}
    assert all(((a >= 0.01) & (a <= 0.05)).all() and a.std() > 0 for a in alpha.values())
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner_gradients(learner, image_batch())
    optimizer.step()
    for key, before in alpha.items():
        assert learner.alpha[key].grad.abs().max() > 0
        assert not torch.equal(learner.alpha[key].detach(), before)


def test_anil_adapts_only_the_head():
    learner = small_learner("anil", "conv4", inner_steps=2)
    batch = image_batch()
    outputs, adapted = learner.run_inner(batch.support_x, batch.support_y, batch.query_x, 2, meta=True)
    assert set(adapted) == {"weight", "bias"} and adapted["weight"].shape == (3, 3, 4)
    # the body is the unadapted one: the query logits are the adapted head on θ_body's features
    features = torch.stack([learner.net.features(x) for x in batch.query_x])
    expected = features @ adapted["weight"].transpose(1, 2) + adapted["bias"][:, None]
    assert torch.allclose(outputs, expected, atol=1e-12)
    # and the body still gets a meta-gradient
    _, grads = learner_gradients(learner, batch)
    assert grads["net.blocks.0.conv"].abs().max() > 0


@pytest.mark.parametrize("name", FAMILY)
def test_rebuilds_from_hparams(name):
    learner = build_learner(name, backbone="mlp", strategy="batched")
    assert all(isinstance(v, int | float | str | bool) for v in learner.hparams.values())
    clone = build_learner(name, **learner.hparams)
    clone.load_state_dict(learner.state_dict())
    assert clone.hparams == learner.hparams
    assert type(clone) is type(learner)
    batch = SinusoidTasks(5, 5, seed=0).sample(2)
    assert torch.equal(clone.predict(batch), learner.predict(batch))


def test_defaults_follow_the_paper():
    omniglot, sine = MAML().hparams, MAML(backbone="mlp").hparams
    assert (
        omniglot["hidden"],
        omniglot["inner_lr"],
        omniglot["inner_steps"],
        omniglot["eval_inner_steps"],
    ) == (
        64,
        0.4,
        1,
        3,
    )
    assert (sine["hidden"], sine["inner_lr"], sine["ways"]) == (40, 0.01, 0)
    assert FOMAML().hparams["first_order"] and not MAML().hparams["first_order"]
    assert "inner_lr" not in MetaSGD().hparams and ANIL().name == "anil"


def test_predict_in_eval_mode_equals_per_task_adapt():
    learner = small_learner("maml", "conv4", eval_inner_steps=2).eval()
    batch = image_batch()
    with torch.no_grad():
        logits = learner.predict(batch)
        single = [learner.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t]) for t in range(3)]
    assert logits.shape == (3, 6, 3) and not logits.requires_grad
    assert torch.allclose(logits, torch.stack(single), atol=1e-12)
    assert all(p.grad is None for p in learner.parameters())


def test_unknown_strategy_is_an_actionable_error():
    with pytest.raises(ValueError, match="unknown strategy 'pmap'; use one of auto, loop, vmap, batched"):
        MAML(strategy="pmap")


def test_wrong_ways_is_an_actionable_error():
    with pytest.raises(
        ValueError, match="built for classification of up to 3 ways but the batch has ways = 4"
    ):
        small_learner("maml", "conv4").meta_loss(image_batch(ways=4))


def post_adaptation_mse(learner, tasks):
    return ((learner.predict(tasks) - tasks.query_y) ** 2).mean().item()


def test_maml_learns_sinusoid_regression():
    torch.manual_seed(0)
    learner = MAML(backbone="mlp", strategy="batched", eval_inner_steps=5)
    test_tasks = SinusoidTasks(10, 20, seed=123).sample(100)
    before = post_adaptation_mse(learner, test_tasks)
    tasks = SinusoidTasks(10, 10, seed=0)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for _ in range(300):
        loss, _ = learner.meta_loss(tasks.sample(10))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = post_adaptation_mse(learner, test_tasks)
    assert after < 0.35 * before, (before, after)


def test_maml_learns_few_shot_classification(class_images):
    torch.manual_seed(0)
    learner = MAML(hidden=16, ways=5, inner_lr=0.4, eval_inner_steps=3)
    sampler = EpisodeSampler(class_images, 5, 1, 3, seed=0)
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-3)
    for _ in range(60):
        loss, _ = learner.meta_loss(sampler.sample(4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = EpisodeSampler(class_images, 5, 1, 3, seed=99).sample(20)
    accuracy = (learner.predict(test).argmax(-1) == test.query_y).float().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.2
