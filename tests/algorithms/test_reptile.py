"""Reptile: the meta-gradient is exactly θ − mean_i θ_i, and SGD with it is Reptile's update."""

import pytest
import torch
from gradient_helpers import (
    TOLERANCE,
    batch_for,
    learner_gradients,
    max_difference,
    net_params,
    small_learner,
)
from reference import conv_net, mlp_net, reptile_gradient

from metaloop.algorithms import Reptile, build_learner
from metaloop.tasks.sinusoid import SinusoidTasks


def reference(learner, batch):
    net = conv_net if learner.hparams["backbone"] == "conv4" else mlp_net
    h = learner.hparams
    g, query_loss = reptile_gradient(net, net_params(learner), batch, h["inner_lr"], h["inner_steps"])
    return {"net." + k: v for k, v in g.items()}, query_loss


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
@pytest.mark.parametrize("backbone", ["conv4", "mlp"])
def test_gradient_is_theta_minus_mean_adapted_theta(backbone, strategy):
    learner = small_learner("reptile", backbone, inner_steps=3, inner_lr=0.1, strategy=strategy)
    batch = batch_for(backbone)
    loss, grads = learner_gradients(learner, batch)
    ref_grads, ref_loss = reference(learner, batch)
    assert max_difference(grads, ref_grads) < TOLERANCE
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE  # the value: the adapted query loss


def test_sgd_on_the_meta_gradient_is_the_reptile_update():
    learner = small_learner("reptile", "conv4", inner_steps=2, inner_lr=0.1)
    batch = batch_for("conv4")
    before = {k: v.detach().clone() for k, v in learner.named_parameters()}
    g, _ = reference(learner, batch)
    epsilon = 0.5
    optimizer = torch.optim.SGD(learner.parameters(), lr=epsilon)
    loss, metrics = learner.meta_loss(batch)
    loss.backward()
    optimizer.step()
    for name, p in learner.named_parameters():
        mean_adapted = before[name] - g[name]
        expected = before[name] + epsilon * (mean_adapted - before[name])
        assert (p.detach() - expected).abs().max() < TOLERANCE
    # the tensor's value is the post-adaptation query loss that gets logged
    assert loss.item() == pytest.approx(metrics["loss"], abs=1e-12)


def test_rebuilds_from_hparams_and_has_no_first_order_switch():
    learner = Reptile(backbone="mlp")
    assert "first_order" not in learner.hparams
    assert build_learner("reptile", **learner.hparams).hparams == learner.hparams


def test_reptile_learns_sinusoid_regression():
    torch.manual_seed(0)
    learner = Reptile(backbone="mlp", strategy="batched", inner_lr=0.02, inner_steps=5, eval_inner_steps=5)
    test_tasks = SinusoidTasks(10, 20, seed=123).sample(100)

    def mse() -> float:
        return ((learner.predict(test_tasks) - test_tasks.query_y) ** 2).mean().item()

    before = mse()
    tasks = SinusoidTasks(10, 10, seed=0)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for _ in range(300):
        loss, _ = learner.meta_loss(tasks.sample(10))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert mse() < 0.5 * before
