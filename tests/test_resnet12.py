"""ResNet-12: its shape, DropBlock, exact MAML meta-gradients under every strategy, and every learner
meta-training over it (narrow widths and 16x16 images keep the tests fast)."""

import pytest
import torch
import torch.nn.functional as F
from gradient_helpers import TOLERANCE, image_batch, learner_gradients, max_difference, net_params
from reference import maml_loss, meta_gradient

from metaloop.algorithms import LEARNERS, build_learner
from metaloop.nn.resnet12 import ResNet12, drop_block

WIDTHS = [4, 6, 8, 8]


def resnet12_reference(p, x):
    """MAML's ResNet-12 written out for one task: ``x`` ``[n, C, H, W]`` -> logits."""

    def batch_norm(h, block, which):
        mean = h.mean((0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean((0, 2, 3), keepdim=True)
        scale, shift = p[f"{block}scale{which}"], p[f"{block}shift{which}"]
        return (h - mean) / torch.sqrt(var + 1e-5) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    h = x
    for i in range(4):
        b = f"blocks.{i}."
        out = F.leaky_relu(batch_norm(F.conv2d(h, p[b + "conv1"], padding=1), b, "1"), 0.1)
        out = F.leaky_relu(batch_norm(F.conv2d(out, p[b + "conv2"], padding=1), b, "2"), 0.1)
        out = batch_norm(F.conv2d(out, p[b + "conv3"], padding=1), b, "3")
        skip = batch_norm(F.conv2d(h, p[b + "shortcut"]), b, "_shortcut")
        h = F.max_pool2d(F.leaky_relu(out + skip, 0.1), 2)
    return F.linear(h.mean((2, 3)), p["head.weight"], p["head.bias"])


def test_the_standard_resnet12_embeds_into_640_dimensions():
    network = ResNet12(in_channels=3)
    assert [block.conv1.out_channels for block in network.blocks] == [64, 160, 320, 640]
    assert network(torch.zeros(2, 3, 32, 32)).shape == (2, 640)
    assert sum(p.numel() for p in network.parameters()) == 12_424_320  # ResNet-12's 12.4M weights


def test_drop_block_drops_square_blocks_while_training_only():
    torch.manual_seed(0)
    h = torch.ones(2, 3, 12, 12)
    out = drop_block(h, 0.2, 3)
    dropped = (out == 0).float().mean().item()
    assert 0.05 < dropped < 0.4 and torch.allclose(out.mean(), h.mean(), rtol=0.05)
    network = ResNet12(1, WIDTHS, drop_rate=0.2, block_size=2).eval()
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(network(x), network(x))  # eval: no DropBlock
    network.train()
    assert not torch.equal(network(x), network(x))


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
def test_maml_meta_gradient_over_resnet12_equals_the_reference(strategy):
    torch.manual_seed(0)
    learner = build_learner(
        "maml",
        backbone="resnet12",
        backbone_args={"widths": WIDTHS},
        ways=3,
        inner_lr=0.2,
        inner_steps=2,
        strategy=strategy,
    ).double()
    batch = image_batch()
    loss, grads = learner_gradients(learner, batch)
    params = net_params(learner)
    ref_loss = maml_loss(resnet12_reference, params, batch, 0.2, 2)
    ref_grads = {"net." + k: v for k, v in meta_gradient(ref_loss, params).items()}
    assert abs(loss.item() - ref_loss.item()) < TOLERANCE
    assert max_difference(grads, ref_grads) < TOLERANCE


def resnet12_learner(name):
    settings = {"backbone": "resnet12", "backbone_args": {"widths": WIDTHS}, "in_channels": 1}
    if LEARNERS[name].adapts_by_gradient:
        settings.update(ways=3, inner_lr=0.1, inner_steps=1, eval_inner_steps=1)
        if name == "cavia":
            settings["num_context_params"] = 4
        if name == "metasgd":
            del settings["inner_lr"]
    elif name != "protonet":
        settings["image_size"] = 16
        settings.update(
            {
                "baseline": {"num_classes": 6, "finetune_steps": 3},
                "attention": {"ways": 3, "d_model": 8, "heads": 2},
            }.get(name, {})
        )
    return build_learner(name, **settings)


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_learner_meta_trains_over_resnet12(name):
    torch.manual_seed(0)
    learner = resnet12_learner(name)
    batch = image_batch(tasks=2, seed=1)
    batch = type(batch)(
        batch.support_x.float(),
        batch.support_y,
        batch.query_x.float(),
        batch.query_y,
        3,
        classes=torch.arange(6).view(2, 3),
    )
    before = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for _ in range(3):
        loss, metrics = learner.meta_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and 0 <= metrics["accuracy"] <= 1
    assert any(not torch.equal(before[k], v) for k, v in learner.state_dict().items())
    assert learner.eval().predict(batch).shape == (2, 6, 3)
