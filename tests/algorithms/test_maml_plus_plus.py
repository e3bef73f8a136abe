"""MAML++: its meta-gradient against an independent float64 reference with every component on,
each component's switch live, all switches off equal to MAML, and the annealing schedules."""

import pytest
import torch
from gradient_helpers import (
    TOLERANCE,
    batch_for,
    image_batch,
    learner_gradients,
    max_difference,
    small_learner,
)
from reference import conv_net, maml_plus_plus_loss, meta_gradient, mlp_net

from metaloop.algorithms import build_learner
from metaloop.algorithms.maml_plus_plus import multi_step_weights

ALL_ON = {"multi_step_loss": True, "per_step_lr": True, "per_step_bn": True}


def mamlpp(backbone: str = "conv4", steps: int = 3, **switches):
    """A float64 MAML++ on the small test network, its LSLR rates spread so that steps differ."""
    options = {**ALL_ON, **switches}
    if backbone == "mlp":
        options["per_step_bn"] = False  # the MLP has no batch norm
    learner = small_learner(
        "mamlpp", backbone, inner_steps=steps, eval_inner_steps=steps, msl_steps=10, **options
    )
    with torch.no_grad():
        for rates in learner.step_lr.values():
            rates.copy_(torch.linspace(0.05, 0.3, steps, dtype=torch.float64))
        for rows in learner.step_norm.values():  # per-step batch-norm rows made different too
            rows.add_(
                0.1 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(1), dtype=rows.dtype)
            )
    return learner


def reference_gradients(learner, batch):
    """The reference meta-loss and meta-gradient, by the learner's parameter names."""
    h, key = learner.hparams, lambda name: name.replace(".", "-")
    steps = h["inner_steps"]
    net = conv_net if h["backbone"] == "conv4" else mlp_net
    params = {
        name: p.detach().clone().requires_grad_()
        for name, p in learner.net.named_parameters()
        if name not in learner.norm_names
    }
    step_norm = {
        name: learner.step_norm[key(name)].detach().clone().requires_grad_() for name in learner.norm_names
    }
    lr = (
        {name: learner.step_lr[key(name)].detach().clone().requires_grad_() for name in params}
        if h["per_step_lr"]
        else h["inner_lr"]
    )
    weights = learner.loss_weights()
    first_order = h["first_order"] or learner.outer_step < h["second_order_after"]
    loss = maml_plus_plus_loss(
        net, params, batch, lr, steps, None if weights is None else weights.tolist(), first_order, step_norm
    )
    named = {
        **{"net." + k: v for k, v in params.items()},
        **{"step_norm." + key(k): v for k, v in step_norm.items()},
    }
    if isinstance(lr, dict):
        named.update({"step_lr." + key(k): v for k, v in lr.items()})
    return loss, meta_gradient(loss, named)


def trained_gradients(learner, batch):
    loss, grads = learner_gradients(learner, batch)
    return loss, {name: g for name, g in grads.items() if g is not None}


@pytest.mark.parametrize("backbone", ["conv4", "mlp"])
@pytest.mark.parametrize("outer_step", [0, 4, 10])  # MSL at its start, midway, and over (last step only)
def test_meta_gradient_equals_reference(backbone, outer_step):
    learner = mamlpp(backbone)
    learner.begin_outer_step(outer_step, 100)
    batch = batch_for(backbone)
    loss, grads = trained_gradients(learner, batch)
    ref_loss, ref_grads = reference_gradients(learner, batch)
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE


@pytest.mark.parametrize("strategy", ["vmap", "batched"])
def test_every_strategy_gives_the_loop_meta_gradient(strategy):
    batch = image_batch()
    learner, other = mamlpp(), mamlpp(strategy=strategy)
    for each in (learner, other):
        each.begin_outer_step(3, 100)
    loss, grads = trained_gradients(learner, batch)
    other_loss, other_grads = trained_gradients(other, batch)
    assert abs(loss.item() - other_loss.item()) < TOLERANCE
    assert max_difference(grads, other_grads) < TOLERANCE


def test_all_switches_off_is_maml():
    batch = image_batch()
    off = small_learner(
        "mamlpp",
        "conv4",
        inner_steps=2,
        eval_inner_steps=2,
        inner_lr=0.3,
        multi_step_loss=False,
        per_step_lr=False,
        per_step_bn=False,
    )
    maml = small_learner("maml", "conv4", inner_steps=2, eval_inner_steps=2, inner_lr=0.3)
    loss, grads = learner_gradients(off, batch)
    maml_loss, maml_grads = learner_gradients(maml, batch)
    assert abs(loss.item() - maml_loss.item()) < TOLERANCE
    assert max_difference(grads, maml_grads) < TOLERANCE


@pytest.mark.parametrize(
    "switch, setting",
    [
        ("multi_step_loss", {"multi_step_loss": False}),
        ("per_step_lr", {"per_step_lr": False}),
        ("per_step_bn", {"per_step_bn": False}),
        ("derivative_order", {"second_order_after": 5}),
    ],
)
def test_each_switch_changes_the_meta_gradient(switch, setting):
    """Turning one component off (or, for derivative-order annealing, on) changes the gradient of the
    parameters both versions share: the network's convolutions and head."""
    batch = image_batch()
    on, off = mamlpp(), mamlpp(**setting)
    for each in (on, off):
        each.begin_outer_step(2, 100)
    _, grads = trained_gradients(on, batch)
    _, other = trained_gradients(off, batch)
    shared = [name for name in grads if name.startswith("net.") and name in other]
    assert "net.head.weight" in shared
    assert max((grads[n] - other[n]).abs().max().item() for n in shared) > 1e-4, switch


def test_learned_step_sizes_and_per_step_norms_get_their_own_gradients():
    learner = mamlpp()
    learner.begin_outer_step(0, 100)
    _, grads = trained_gradients(learner, image_batch())
    rates = grads["step_lr.blocks-0-conv"]
    scale = grads["step_norm.blocks-1-scale"]
    assert rates.shape == (3,) and bool((rates != 0).all()) and len(set(rates.tolist())) == 3
    assert scale.shape == (3, 4) and bool((scale.abs().sum(1) > 0).all())
    assert learner.net.blocks[1].scale.grad is None  # replaced by its per-step rows


def test_multi_step_weights_follow_the_paper_schedule():
    assert torch.allclose(multi_step_weights(5, 0.0), torch.full((5,), 0.2, dtype=torch.float64))
    midway = multi_step_weights(5, 0.5)
    assert torch.allclose(midway, torch.tensor([0.1, 0.1, 0.1, 0.1, 0.6], dtype=torch.float64))
    end = multi_step_weights(5, 1.0)
    assert torch.allclose(end, torch.tensor([0.006] * 4 + [0.976], dtype=torch.float64))
    for progress in (0.0, 0.3, 0.97, 1.0):
        assert abs(multi_step_weights(5, progress).sum().item() - 1) < 1e-12
    learner = mamlpp(steps=3)
    learner.begin_outer_step(10, 100)  # msl_steps = 10: over
    assert learner.loss_weights() is None


def test_predict_equals_per_task_adapt_with_per_step_norms():
    """The queries' pass after adaptation uses the last step's batch norm on both paths."""
    learner = mamlpp().eval()
    batch = image_batch()
    with torch.no_grad():
        logits = learner.predict(batch)
        single = [learner.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t]) for t in range(3)]
    assert torch.allclose(logits, torch.stack(single), atol=1e-12)


def test_rebuilds_from_hparams():
    learner = mamlpp()
    clone = build_learner("mamlpp", **learner.hparams).double()
    clone.load_state_dict(learner.state_dict())
    batch = image_batch()
    assert torch.equal(clone.predict(batch), learner.predict(batch))


def test_actionable_errors():
    with pytest.raises(ValueError, match="eval_inner_steps must be at most 2"):
        build_learner("mamlpp", backbone="conv4", inner_steps=2, eval_inner_steps=4)
    with pytest.raises(ValueError, match="per_step_bn needs batch norm"):
        build_learner("mamlpp", backbone="mlp")
    learner = mamlpp(steps=2)
    batch = image_batch()
    with pytest.raises(ValueError, match="per-step parameters for 2 inner steps; it cannot take 3"):
        learner.run_inner(batch.support_x, batch.support_y, batch.query_x, 3, meta=False)


def user_net_reference(p, x):
    """The user network below written out: conv, batch norm from its definition, ReLU, mean, linear."""
    h = torch.nn.functional.conv2d(x, p["0.weight"], p["0.bias"], padding=1)
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    h = (h - mean) / torch.sqrt(var + 1e-5) * p["1.weight"].view(1, -1, 1, 1) + p["1.bias"].view(1, -1, 1, 1)
    return torch.nn.functional.linear(torch.relu(h).mean(dim=(2, 3)), p["5.weight"], p["5.bias"])


def test_a_user_network_gets_per_step_batch_norm_with_the_reference_gradient():
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    learner = build_learner(
        "mamlpp", backbone=net, inner_lr=0.1, ways=3, inner_steps=2, msl_steps=10
    ).double()
    assert learner.norm_names == ["1.weight", "1.bias"]
    learner.begin_outer_step(5, 100)
    batch = image_batch()
    loss, grads = trained_gradients(learner, batch)
    key = lambda name: name.replace(".", "-")  # noqa: E731
    params = {
        n: p.detach().clone().requires_grad_() for n, p in learner.net.named_parameters() if n[0] != "1"
    }
    norms = {n: learner.step_norm[key(n)].detach().clone().requires_grad_() for n in learner.norm_names}
    rates = {n: learner.step_lr[key(n)].detach().clone().requires_grad_() for n in params}
    weights = learner.loss_weights().tolist()
    ref = maml_plus_plus_loss(user_net_reference, params, batch, rates, 2, weights, False, norms)
    named = {
        **{"net." + k: v for k, v in params.items()},
        **{"step_norm." + key(k): v for k, v in norms.items()},
        **{"step_lr." + key(k): v for k, v in rates.items()},
    }
    assert abs(loss.item() - ref.item()) < TOLERANCE
    assert max_difference(grads, meta_gradient(ref, named)) < TOLERANCE
