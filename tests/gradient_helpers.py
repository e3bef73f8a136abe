"""Small float64 task batches and learners for the exactness tests of the gradient-based learners."""

from __future__ import annotations

import torch

from metaloop.algorithms import build_learner
from metaloop.algorithms.base import MetaLearner
from metaloop.tasks.episodes import TaskBatch
from metaloop.tasks.sinusoid import SinusoidTasks

TOLERANCE = 1e-8


def image_batch(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> TaskBatch:
    """Random 16x16 one-channel images, float64, labels class-major."""
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(tasks, ways * shots, 1, 16, 16, generator=g, dtype=torch.float64)
    query_x = torch.rand(tasks, ways * queries, 1, 16, 16, generator=g, dtype=torch.float64)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(support_x, support_y, query_x, query_y, ways)


def sine_batch(tasks: int = 3, shots: int = 5, queries: int = 5, seed: int = 0) -> TaskBatch:
    """Sinusoid tasks in float64."""
    b = SinusoidTasks(shots, queries, seed=seed).sample(tasks)
    return TaskBatch(b.support_x.double(), b.support_y.double(), b.query_x.double(), b.query_y.double(), 0)


def batch_for(backbone: str, **kwargs: int) -> TaskBatch:
    return image_batch(**kwargs) if backbone == "conv4" else sine_batch(**kwargs)


def small_learner(name: str, backbone: str, seed: int = 0, **hparams: object) -> MetaLearner:
    """A float64 learner on a small network: Conv-4 with 4 filters (3-way) or the sinusoid MLP."""
    torch.manual_seed(seed)
    size = {"hidden": 4, "ways": 3} if backbone == "conv4" else {"hidden": 8}
    return build_learner(name, backbone=backbone, **size, **hparams).double()


def learner_gradients(learner: MetaLearner, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The meta-loss and the ``.grad`` its ``backward()`` leaves on every parameter."""
    learner.zero_grad(set_to_none=True)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    return loss, {name: p.grad for name, p in learner.named_parameters()}


def net_params(learner: MetaLearner) -> dict[str, torch.Tensor]:
    """Fresh leaf copies of the network's parameters, by their names in the network."""
    return {name: p.detach().clone().requires_grad_() for name, p in learner.net.named_parameters()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
