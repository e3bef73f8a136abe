"""Every learner over a user's own ``nn.Module``: exact MAML meta-gradients for a network with batch
norm and a residual connection and for a Transformer (float64, against an independent reference),
strategies that are right for such networks, and the errors for networks a learner cannot use."""

import copy

import pytest
import torch
import torch.nn.functional as F
from gradient_helpers import TOLERANCE, image_batch, learner_gradients, max_difference, net_params
from reference import maml_loss, meta_gradient
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from user_networks import ContextNet, Encoder, ResidualNet, TokenTransformer

from metaloop.algorithms import (
    ADML,
    ANIL,
    CAVIA,
    FOMAML,
    MAML,
    AttentiveLearner,
    MetaSGD,
    ProtoNet,
    Reptile,
    Siamese,
    TransferBaseline,
)
from metaloop.nn.task_norm import TaskBatchNorm
from metaloop.tasks.episodes import TaskBatch


def residual_reference(p, x):
    """:class:`user_networks.ResidualNet` written out: batch norm from its definition (batch statistics)."""

    def batch_norm(h, weight, bias):
        mean = h.mean((0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean((0, 2, 3), keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

    h = F.conv2d(x, p["stem.weight"], p["stem.bias"], stride=2, padding=1)
    h = F.relu(batch_norm(h, p["bn.weight"], p["bn.bias"]))
    r = batch_norm(
        F.conv2d(h, p["block.0.weight"], p["block.0.bias"], padding=1), p["block.1.weight"], p["block.1.bias"]
    )
    h = F.relu(h + r)
    return F.linear(h.mean((2, 3)), p["fc.weight"], p["fc.bias"])


def token_batch(tasks=3, ways=3, shots=2, queries=2, vocab=7, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    support_x = torch.randint(vocab, (tasks, ways * shots, length), generator=g)
    query_x = torch.randint(vocab, (tasks, ways * queries, length), generator=g)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(support_x, support_y, query_x, query_y, ways)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_over_a_network_with_batch_norm_and_a_residual_equals_the_reference(strategy, steps):
    torch.manual_seed(0)
    learner = MAML(ResidualNet(width=4, ways=3), inner_lr=0.3, inner_steps=steps, strategy=strategy).double()
    assert sum(isinstance(m, TaskBatchNorm) for m in learner.net.modules()) == 2  # both batch norms swapped
    batch = image_batch()
    loss, grads = learner_gradients(learner, batch)
    params = net_params(learner)
    ref_loss = maml_loss(residual_reference, params, batch, 0.3, steps)
    ref_grads = {"net." + k: v for k, v in meta_gradient(ref_loss, params).items()}
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE
    first_order = FOMAML(copy.deepcopy(learner.net), inner_lr=0.3, inner_steps=steps, strategy=strategy)
    _, fo_grads = learner_gradients(first_order, batch)
    assert max_difference(fo_grads, ref_grads) > 1e-4  # the second-order terms are really there


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of the fused attention kernel
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_maml_over_a_transformer_equals_the_reference(strategy):
    torch.manual_seed(0)
    network = TokenTransformer().double()
    reference_copy = copy.deepcopy(network)  # the reference runs its own copy, no metaloop code
    learner = MAML(network, inner_lr=0.5, inner_steps=2, strategy=strategy)
    batch = token_batch()
    loss, grads = learner_gradients(learner, batch)
    params = net_params(learner)
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no second derivative
        ref_loss = maml_loss(lambda p, x: functional_call(reference_copy, p, (x,)), params, batch, 0.5, 2)
    ref_grads = {"net." + k: v for k, v in meta_gradient(ref_loss, params).items()}
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE
    first_order = FOMAML(copy.deepcopy(network), inner_lr=0.5, inner_steps=2, strategy=strategy)
    _, fo_grads = learner_gradients(first_order, batch)
    assert max_difference(fo_grads, ref_grads) > 1e-4


def test_batched_is_refused_and_auto_is_the_loop_for_a_user_network():
    with pytest.raises(
        ValueError, match="strategy 'batched' runs the built-in networks.*use strategy 'loop'"
    ):
        MAML(ResidualNet(), inner_lr=0.1, strategy="batched")
    assert MAML(ResidualNet(), inner_lr=0.1).strategy(torch.device("cpu")) == "loop"
    assert MAML(ResidualNet(), inner_lr=0.1).strategy(torch.device("cuda")) == "loop"


def test_vmap_is_refused_for_a_network_whose_norm_it_may_differentiate_wrongly():
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(), torch.nn.LazyLinear(3)
    )
    with pytest.raises(
        ValueError, match="strategy 'vmap' is refused.*GroupNorm layer '1'.*use strategy 'loop'"
    ):
        MAML(network, inner_lr=0.1, strategy="vmap")


def test_user_networks_need_an_inner_lr_and_cavia_a_network_that_takes_context():
    with pytest.raises(ValueError, match="no default inner_lr: give inner_lr=..."):
        MAML(ResidualNet())
    with pytest.raises(
        ValueError, match=r"ResidualNet.forward\(x: .*cannot be called as forward\(x, context\)"
    ):
        CAVIA(ResidualNet(), inner_lr=1.0, num_context_params=2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MAML(ResidualNet(), inner_lr=0.1, ways=3),
        lambda: FOMAML(ResidualNet(), inner_lr=0.1, ways=3),
        lambda: MetaSGD(ResidualNet(), ways=3),
        lambda: ANIL(ResidualNet(), inner_lr=0.1, ways=3, head="fc"),
        lambda: ANIL(ResidualNet(), inner_lr=0.1, ways=3, head=lambda name: name.startswith("fc.")),
        lambda: Reptile(ResidualNet(), inner_lr=0.1, ways=3),
        lambda: ADML(ResidualNet(), inner_lr=0.1, ways=3),
        lambda: CAVIA(ContextNet(), inner_lr=1.0, num_context_params=2, ways=3),
        lambda: ProtoNet(Encoder()),
        lambda: Siamese(Encoder(), image_size=16),
        lambda: TransferBaseline(Encoder(), image_size=16, num_classes=12, finetune_steps=3),
        lambda: AttentiveLearner(Encoder(), image_size=16, ways=3, d_model=8, layers=1, heads=2),
    ],
    ids=[
        "maml",
        "fomaml",
        "metasgd",
        "anil",
        "anil-predicate",
        "reptile",
        "adml",
        "cavia",
        "protonet",
        "siamese",
        "baseline",
        "attention",
    ],
)
def test_every_learner_meta_trains_over_a_user_network(make):
    torch.manual_seed(0)
    learner = make()
    batch = image_batch(tasks=2, seed=1).to(torch.device("cpu"))
    batch = TaskBatch(
        batch.support_x.float(),
        batch.support_y,
        batch.query_x.float(),
        batch.query_y,
        3,
        classes=torch.arange(6).view(2, 3),
    )
    before = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss, metrics = learner.meta_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and 0 <= metrics["accuracy"] <= 1
    assert any(not torch.equal(before[k], v) for k, v in learner.state_dict().items())
    logits = learner.eval().adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    assert logits.shape == (6, 3)
