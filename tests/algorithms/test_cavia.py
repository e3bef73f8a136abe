"""CAVIA: exact meta-gradients, context that starts at 0 for every task, shared weights learned outside."""

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
from reference import cavia_loss, conv_net, meta_gradient, mlp_net

from metaloop.algorithms import CAVIA, build_learner
from metaloop.tasks.sinusoid import SinusoidTasks


def reference_gradients(learner, batch):
    h = learner.hparams
    net = conv_net if h["backbone"] == "conv4" else mlp_net
    params = net_params(learner)
    loss = cavia_loss(
        net, params, batch, h["inner_lr"], h["inner_steps"], h["num_context_params"], h["first_order"]
    )
    return loss, {"net." + k: v for k, v in meta_gradient(loss, params).items()}


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("backbone", ["conv4", "mlp"])
def test_meta_gradient_equals_reference(backbone, steps, first_order):
    learner = small_learner(
        "cavia", backbone, num_context_params=3, inner_lr=0.5, inner_steps=steps, first_order=first_order
    )
    batch = batch_for(backbone)
    loss, grads = learner_gradients(learner, batch)
    ref_loss, ref_grads = reference_gradients(learner, batch)
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE
    assert grads["net.film.weight" if backbone == "conv4" else "net.layers.0.weight"].abs().max() > 0


@pytest.mark.parametrize("strategy", ["vmap", "batched"])
@pytest.mark.parametrize("backbone", ["conv4", "mlp"])
def test_every_strategy_gives_the_loop_meta_gradient(backbone, strategy):
    batch = batch_for(backbone)
    hp = {"num_context_params": 3, "inner_lr": 0.5, "inner_steps": 2}
    _, loop = learner_gradients(small_learner("cavia", backbone, **hp), batch)
    _, other = learner_gradients(small_learner("cavia", backbone, strategy=strategy, **hp), batch)
    assert max_difference(loop, other) < TOLERANCE


def test_context_starts_at_zero_for_every_task_and_is_not_a_parameter():
    learner = small_learner("cavia", "mlp", num_context_params=3, inner_lr=0.5)
    assert not any("context" in name for name in learner.state_dict())
    batch = batch_for("mlp")
    outputs, adapted = learner.run_inner(batch.support_x, batch.support_y, batch.query_x, steps=0, meta=True)
    assert torch.equal(adapted["context"], torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(outputs, learner.net(batch.query_x, context=torch.zeros(3, dtype=torch.float64)))
    # one inner step from 0: φ_i = −α ∇φ L_support_i(0), different per task
    _, adapted = learner.run_inner(batch.support_x, batch.support_y, batch.query_x, steps=1, meta=True)
    for t in range(3):
        zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        loss = ((learner.net(batch.support_x[t], context=zero) - batch.support_y[t]) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, zero)
        assert torch.allclose(adapted["context"][t], -0.5 * grad, atol=1e-12)
    # nothing is carried from one call to the next
    assert learner.meta_loss(batch)[0].item() == learner.meta_loss(batch)[0].item()


def test_shared_weights_change_in_the_outer_loop():
    learner = small_learner("cavia", "conv4", num_context_params=3)
    before = {k: v.detach().clone() for k, v in learner.named_parameters()}
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner_gradients(learner, batch_for("conv4"))
    optimizer.step()
    for name, p in learner.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name


def test_rebuilds_from_hparams_with_the_papers_context_sizes():
    assert CAVIA(backbone="mlp").hparams["num_context_params"] == 4
    assert CAVIA().hparams["num_context_params"] == 100
    learner = CAVIA(backbone="mlp")
    clone = build_learner("cavia", **learner.hparams)
    clone.load_state_dict(learner.state_dict())
    batch = SinusoidTasks(5, 5, seed=0).sample(2)
    assert torch.equal(clone.predict(batch), learner.predict(batch))
