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
from reference import conv_net, mlp_net, reptile_adam_gradient, reptile_gradient

from metaloop.algorithms import Reptile, build_learner
from metaloop.algorithms.reptile import minibatch_indices
from metaloop.tasks.episodes import TaskBatch
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


def adam_learner(**hparams: object) -> Reptile:
    settings = {"inner_steps": 3, "inner_lr": 0.01, "inner_optimizer": "adam", "inner_batch_size": 4}
    return small_learner("reptile", "conv4", **{**settings, **hparams})


def call_batches(batch, size: int, steps: int) -> list[torch.Tensor]:
    """The minibatches one call of the learner draws for each task (a generator seeded with 0)."""
    generator = torch.Generator().manual_seed(0)
    n = batch.support_x.shape[1]
    return [minibatch_indices(n, size, steps, generator) for _ in range(batch.num_tasks)]


def test_minibatches_are_shuffled_passes_without_replacement():
    rows = minibatch_indices(6, 4, 3, torch.Generator().manual_seed(1))
    assert rows.shape == (3, 4)
    flat = rows.flatten()
    assert sorted(flat[:6].tolist()) == list(range(6))  # the first pass: each example once
    assert sorted(flat[6:].tolist()) == list(range(6))  # the second pass: a fresh shuffle
    assert not torch.equal(flat[:6], flat[6:])
    assert minibatch_indices(5, 10, 2, torch.Generator()).shape == (2, 5)  # b = min(batch, n)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_adam_inner_loop_matches_torch_adam_carried_across_tasks(strategy):
    """Two meta-batches in a row: the meta-gradient, the logged loss and the carried v and k
    equal those of one torch.optim.Adam (betas (0, 0.999)) stepping through the tasks in turn."""
    learner = adam_learner(strategy=strategy)
    state = None
    for seed in (0, 1):
        batch = batch_for("conv4", seed=seed)
        params = net_params(learner)
        g, ref_loss, optimizer = reptile_adam_gradient(
            conv_net, params, batch, 0.01, call_batches(batch, 4, 3), state
        )
        state = optimizer.state_dict()
        loss, grads = learner_gradients(learner, batch)
        assert max_difference(grads, {"net." + k: v for k, v in g.items()}) < TOLERANCE
        assert abs(loss.item() - ref_loss.item()) < TOLERANCE
        adam_state = optimizer.state_dict()["state"]
        for index, name in enumerate(params):
            carried = getattr(learner.inner_adam, name.replace(".", "__"))
            assert (carried - adam_state[index]["exp_avg_sq"]).abs().max() < TOLERANCE
            # Adam steps so far: 3 tasks of 3 minibatch steps in each meta-batch, carried across them
            expected_steps = 3 * 3 * (seed + 1)
            assert learner.inner_adam.steps.item() == adam_state[index]["step"].item() == expected_steps


def test_adaptation_at_test_time_starts_from_and_keeps_the_trained_moments():
    learner = adam_learner(eval_inner_steps=5)
    batch = batch_for("conv4")
    learner.meta_loss(batch)
    saved = {k: v.clone() for k, v in learner.state_dict().items()}
    params = net_params(learner)
    _, _, optimizer = reptile_adam_gradient(conv_net, params, batch, 0.01, call_batches(batch, 4, 3))
    g, _, _ = reptile_adam_gradient(
        conv_net, params, batch.task(0), 0.01, call_batches(batch.task(0), 4, 5), optimizer.state_dict()
    )
    expected = {name: p - g[name] for name, p in params.items()}  # θ_0: the only task
    predictor = learner.adapt(batch.support_x[0], batch.support_y[0])
    assert (predictor(batch.query_x[0]) - conv_net(expected, batch.query_x[0])).abs().max() < TOLERANCE
    learner.predict(batch)
    for key, value in learner.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_minibatch_sgd_takes_plain_steps_on_the_drawn_rows():
    learner = small_learner("reptile", "conv4", inner_steps=2, inner_lr=0.1, inner_batch_size=4)
    batch = batch_for("conv4")
    params = net_params(learner)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for t, rows in enumerate(call_batches(batch, 4, 2)):
        fast = dict(params)
        for r in rows:
            sub = TaskBatch(
                batch.support_x[t : t + 1, r],
                batch.support_y[t : t + 1, r],
                batch.query_x[t : t + 1],
                batch.query_y[t : t + 1],
                batch.ways,
            )
            g, _ = reptile_gradient(conv_net, fast, sub, 0.1, 1)
            fast = {name: (p - g[name]).detach().requires_grad_() for name, p in fast.items()}
        for name in total:
            total[name] += fast[name].detach()
    expected = {"net." + name: p.detach() - total[name] / batch.num_tasks for name, p in params.items()}
    _, grads = learner_gradients(learner, batch)
    assert max_difference(grads, expected) < TOLERANCE
    assert learner.inner_adam is None


def test_adam_moments_round_trip_through_the_state_dict_and_bad_options_are_refused():
    learner = adam_learner()
    learner.meta_loss(batch_for("conv4"))
    copy = adam_learner(seed=1)
    copy.load_state_dict(learner.state_dict())
    assert torch.equal(copy.inner_adam.steps, learner.inner_adam.steps)
    with pytest.raises(ValueError, match="unknown inner_optimizer 'rmsprop'; use one of sgd, adam"):
        Reptile(inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="inner_batch_size must be a positive int"):
        Reptile(inner_batch_size=0)


def test_test_time_minibatches_take_their_own_size_while_training_keeps_the_full_batch():
    """``eval_inner_batch_size`` (Nichol et al.'s --eval-batch) changes adaptation at test time only."""
    learner = small_learner(
        "reptile", "conv4", inner_steps=2, inner_lr=0.1, eval_inner_steps=3, eval_inner_batch_size=2
    )
    batch = batch_for("conv4")
    _, grads = learner_gradients(learner, batch)
    assert max_difference(grads, reference(learner, batch)[0]) < TOLERANCE  # full-batch training
    task = batch.task(0)
    fast = net_params(learner)
    (rows_per_step,) = call_batches(task, 2, 3)
    for rows in rows_per_step:
        sub = TaskBatch(
            task.support_x[:, rows], task.support_y[:, rows], task.query_x, task.query_y, task.ways
        )
        g, _ = reptile_gradient(conv_net, fast, sub, 0.1, 1)
        fast = {name: (p - g[name]).detach().requires_grad_() for name, p in fast.items()}
    predictor = learner.adapt(task.support_x[0], task.support_y[0])
    assert (predictor(task.query_x[0]) - conv_net(fast, task.query_x[0])).abs().max() < TOLERANCE
    with pytest.raises(ValueError, match="eval_inner_batch_size must be a positive int"):
        Reptile(eval_inner_batch_size=0)
