"""The inner loop on its own: every step-size form, first and second order, every execution
strategy, against the independent reference (float64, a Conv-4 with batch norm and an MLP)."""

import pytest
import torch
import torch.nn.functional as F
from gradient_helpers import TOLERANCE, batch_for, max_difference
from reference import conv_net, maml_loss, meta_gradient, mlp_net
from torch.func import functional_call

from metaloop.inner import STRATEGIES, InnerLoop, choose_strategy, cross_entropy_per_task, mse_per_task
from metaloop.nn.maml_conv import MamlConv4
from metaloop.nn.mlp import MLP


def small_net(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = MamlConv4(in_channels=1, hidden=4, ways=3) if backbone == "conv4" else MLP(hidden=8)
    return net.double()


def step_sizes(kind: str, params: dict[str, torch.Tensor]):
    """α as a float, one learned scalar per parameter tensor, or one learned value per element."""
    g = torch.Generator().manual_seed(2)
    if kind == "scalar":
        return 0.3
    if kind == "per_layer":
        return {
            k: (0.1 + 0.4 * torch.rand((), generator=g, dtype=torch.float64)).requires_grad_() for k in params
        }
    return {
        k: (0.1 + 0.4 * torch.rand(p.shape, generator=g, dtype=torch.float64)).requires_grad_()
        for k, p in params.items()
    }


def library_loss(net, params, lr, batch, steps, first_order, strategy):
    loss_fn = cross_entropy_per_task if batch.ways else mse_per_task

    def forward(p, x):
        return functional_call(net, p, (x,))

    inner = InnerLoop(loss_fn, first_order=first_order, strategy=strategy)
    outputs, _ = inner.run(forward, params, lr, batch.support_x, batch.support_y, batch.query_x, steps)
    return loss_fn(outputs, batch.query_y).mean()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind", ["scalar", "per_layer", "per_element"])
@pytest.mark.parametrize("backbone", ["conv4", "mlp"])
def test_meta_gradients_match_the_reference(backbone, kind, first_order, strategy):
    net = small_net(backbone)
    batch = batch_for(backbone)
    params = {k: p.detach().clone().requires_grad_() for k, p in net.named_parameters()}
    lr = step_sizes(kind, params)
    learned = {f"lr.{k}": v for k, v in lr.items()} if isinstance(lr, dict) else {}
    loss = library_loss(net, params, lr, batch, 2, first_order, strategy)
    grads = meta_gradient(loss, {**params, **learned})
    ref_params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    ref_lr = {k: v.detach().clone().requires_grad_() for k, v in lr.items()} if isinstance(lr, dict) else lr
    ref_loss = maml_loss(
        conv_net if backbone == "conv4" else mlp_net, ref_params, batch, ref_lr, 2, first_order
    )
    ref_learned = {f"lr.{k}": v for k, v in ref_lr.items()} if isinstance(ref_lr, dict) else {}
    ref_grads = meta_gradient(ref_loss, {**ref_params, **ref_learned})
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_zero_steps_is_the_unadapted_network(strategy):
    net = small_net("conv4")
    batch = batch_for("conv4")
    params = dict(net.named_parameters())
    inner = InnerLoop(cross_entropy_per_task, strategy=strategy)
    outputs, adapted = inner.run(
        lambda p, x: functional_call(net, p, (x,)),
        params,
        0.1,
        batch.support_x,
        batch.support_y,
        batch.query_x,
        0,
    )
    assert torch.allclose(outputs, torch.stack([net(x) for x in batch.query_x]), atol=1e-12)
    assert all(torch.equal(adapted[k], p.expand_as(adapted[k])) for k, p in params.items())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adapts_under_no_grad_and_returns_no_graph(strategy):
    net = small_net("mlp")
    batch = batch_for("mlp")
    params = {k: p.detach() for k, p in net.named_parameters()}
    inner = InnerLoop(mse_per_task, first_order=True, strategy=strategy)
    with torch.no_grad():
        outputs, adapted = inner.run(
            lambda p, x: functional_call(net, p, (x,)),
            params,
            0.1,
            batch.support_x,
            batch.support_y,
            batch.query_x,
            1,
        )
    assert not outputs.requires_grad
    assert all((adapted[k] - p).abs().max() > 0 for k, p in params.items())


def test_per_task_losses():
    logits, labels = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4))
    expected = torch.stack([F.cross_entropy(logits[t], labels[t]) for t in range(3)])
    assert torch.allclose(cross_entropy_per_task(logits, labels), expected)
    pred, target = torch.randn(3, 4, 1), torch.randn(3, 4, 1)
    assert torch.allclose(mse_per_task(pred, target), ((pred - target) ** 2).mean((1, 2)))


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="unknown strategy 'pmap'; use one of loop, vmap, batched"):
        InnerLoop(mse_per_task, strategy="pmap")


def test_the_rule_used_where_no_strategy_was_measured():
    assert choose_strategy("auto", torch.device("cpu")) == "loop"
    assert choose_strategy("auto", torch.device("cuda")) == "batched"
    assert choose_strategy("auto", torch.device("cpu"), convolutional=False) == "batched"
    assert choose_strategy("vmap", torch.device("cuda")) == "vmap"
    with pytest.raises(ValueError, match="use one of auto, loop, vmap, batched"):
        choose_strategy("fast", torch.device("cpu"))
