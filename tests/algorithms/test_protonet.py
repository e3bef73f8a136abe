import copy

import pytest
import torch

from metaloop.algorithms import LEARNERS, ProtoNet, build_learner
from metaloop.algorithms.protonet import prototypes, squared_distances
from metaloop.tasks import EpisodeSampler


def test_prototypes_are_class_means():
    emb = torch.randn(2, 6, 4)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 0, 1, 1]])
    protos = prototypes(emb, labels, ways=3)
    for t in range(2):
        for k in range(3):
            assert torch.allclose(protos[t, k], emb[t][labels[t] == k].mean(0))


def test_distances_are_squared_euclidean():
    q, p = torch.randn(3, 5, 8), torch.randn(3, 4, 8)
    assert torch.allclose(squared_distances(q, p), torch.cdist(q, p).pow(2), atol=1e-5)


def test_batched_predict_equals_per_task_adapt(class_images):
    torch.manual_seed(0)
    learner = ProtoNet().eval()
    batch = EpisodeSampler(class_images, 4, 2, 3, seed=0).sample(3)
    batched = learner.predict(batch)
    assert batched.shape == (3, 12, 4)
    for t in range(3):
        single = learner.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t])
        assert torch.allclose(batched[t], single, atol=1e-4)


def reference_loss(learner, batch):
    """Query cross-entropy and accuracy of a ProtoNet, written out in float64 one task at a time: each
    task's support and query images embedded together (batch-norm statistics of that task), each
    prototype the mean of its class's support embeddings, logits minus squared Euclidean distances."""
    encoder = copy.deepcopy(learner.encoder).double().train()
    losses, right, count = [], 0, 0
    for t in range(batch.num_tasks):
        support_x, query_x = batch.support_x[t].double(), batch.query_x[t].double()
        emb = encoder(torch.cat([support_x, query_x])).flatten(1)  # [N + M, D]
        support, query = emb[: len(support_x)], emb[len(support_x) :]
        protos = [support[batch.support_y[t] == k].mean(0) for k in range(batch.ways)]
        for q, y in zip(query, batch.query_y[t].tolist(), strict=True):
            logits = torch.stack([-((q - c) ** 2).sum() for c in protos])
            losses.append(torch.logsumexp(logits, 0) - logits[y])
            right += int(logits.argmax()) == y
            count += 1
    return torch.stack(losses).mean().item(), right / count


def test_meta_loss_is_query_cross_entropy_and_trains(class_images):
    torch.manual_seed(0)
    learner = ProtoNet(hidden=16)
    sampler = EpisodeSampler(class_images, 5, 2, 3, seed=0)
    batch = sampler.sample(2)
    expected_loss, expected_accuracy = reference_loss(learner, batch)
    loss, metrics = learner.meta_loss(batch)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert set(metrics) == {"loss", "accuracy"}
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, _ = learner.meta_loss(sampler.sample(2))
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 2


def test_unknown_algorithm_lists_the_available_ones():
    assert {"adml", "anil", "cavia", "fomaml", "maml", "metasgd", "protonet", "reptile"} <= set(LEARNERS)
    expected = f"unknown algorithm 'mamll'; available: {', '.join(sorted(LEARNERS))}$"
    with pytest.raises(ValueError, match=expected):
        build_learner("mamll")


def test_conv4_batch_norm_scales_start_as_asked():
    torch.manual_seed(0)
    ones = ProtoNet()
    uniform = ProtoNet(backbone_args={"norm_scale_init": "uniform"})
    for default, drawn in zip(ones.encoder.blocks, uniform.encoder.blocks, strict=True):
        assert torch.equal(default[1].weight, torch.ones(64))
        scales = drawn[1].weight
        assert ((scales >= 0) & (scales < 1)).all() and scales.std() > 0.1
    assert uniform.hparams["backbone_args"] == {"norm_scale_init": "uniform"}
    with pytest.raises(ValueError, match="norm_scale_init must be one of ones, uniform; got 'normal'"):
        ProtoNet(backbone_args={"norm_scale_init": "normal"})
    with pytest.raises(ValueError, match="takes backbone_args norm_scale_init; got width"):
        ProtoNet(backbone_args={"width": 4})
