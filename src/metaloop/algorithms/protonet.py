"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

An embedding f_ω maps images to vectors. Each class prototype is the mean embedding of its
support examples, c_k = (1/S) Σ_{x in S_k} f_ω(x), and a query is classified by a softmax
over negative squared Euclidean distances, p(y = k | x) ∝ exp(-||f_ω(x) - c_k||²).
The outer loop minimises the query cross-entropy with respect to ω; there is no inner
loop (adaptation is computing prototypes).

While meta-training, each task of a meta-batch is its own batch-norm batch (statistics per
task, as in Snell et al.'s code, which trains on one episode per step): a task's embedding then
does not depend on which other tasks share its meta-batch, so splitting a meta-batch over
processes (:mod:`metaloop.distributed`) computes exactly what one process computes. The
running statistics used at test time are updated once per step with the mean over tasks of the
per-task statistics. The convolution biases (each followed by batch norm, so the loss does not
depend on them) are not trained; see :meth:`ProtoNet.encode`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.algorithms.base import MetaLearner, Predictor
from metaloop.nn.conv4 import Conv4
from metaloop.tasks.episodes import TaskBatch


def prototypes(support_emb: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means ``[T, W, D]`` of support embeddings ``[T, N, D]`` with labels ``[T, N]``."""
    one_hot = F.one_hot(support_y, ways).to(support_emb.dtype)  # [T, N, W]
    sums = one_hot.transpose(1, 2) @ support_emb  # [T, W, D]
    return sums / one_hot.sum(1).unsqueeze(-1).clamp_min(1.0)


def squared_distances(query_emb: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``||q - c||²`` as ``[T, M, W]`` for queries ``[T, M, D]`` and prototypes ``[T, W, D]``."""
    return (query_emb.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)


def task_batch_norm(bn: nn.BatchNorm2d, h: torch.Tensor, tasks: int) -> torch.Tensor:
    """``bn`` applied to ``h`` ``[T*n, C, H, W]`` (T tasks of n images, task-major) with batch
    statistics per task while training; ``[T*n, C, H, W]`` out.

    The T tasks become T groups of channels of one ``F.batch_norm`` call (``[n, T*C, H, W]``),
    so the statistics of channel c of task t are over that task's n images only. The running
    statistics move once, towards the mean over tasks of the per-task mean and (unbiased)
    variance; for T = 1 this is exactly ``bn(h)``. In eval mode it is ``bn(h)``.
    """
    if not bn.training:
        return bn(h)
    # T = 1 goes the same way rather than through bn(h): on the CPU, bn(h) saves the running-statistics
    # buffers for its backward, so a later in-place update of them (another forward before backward,
    # as for tasks of unequal shapes) would break that backward.
    n, c, rest = h.shape[0] // tasks, h.shape[1], h.shape[2:]
    x = h.view(tasks, n, c, *rest).transpose(0, 1).reshape(n, tasks * c, *rest)  # [n, T*C, H, W]
    momentum = bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm does
            momentum = 1.0 / float(bn.num_batches_tracked)
    tracking = bn.track_running_stats and bn.running_mean is not None
    # [T*C] copies of the running statistics: F.batch_norm moves copy t towards task t's statistics
    running_mean = bn.running_mean.repeat(tasks) if tracking else None
    running_var = bn.running_var.repeat(tasks) if tracking else None
    weight = bn.weight.repeat(tasks) if bn.weight is not None else None
    bias = bn.bias.repeat(tasks) if bn.bias is not None else None
    out = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum or 0.0, bn.eps)
    if tracking:
        with torch.no_grad():
            bn.running_mean.copy_(running_mean.view(tasks, c).mean(0))
            bn.running_var.copy_(running_var.view(tasks, c).mean(0))
    return out.view(n, tasks, c, *rest).transpose(0, 1).reshape(tasks * n, c, *rest)


def encode_tasks(encoder: Conv4, images: torch.Tensor) -> torch.Tensor:
    """Embeddings ``[T, n, D]`` of images ``[T, n, C, H, W]``; batch norm per task (training).

    The bias of each convolution is used but not trained: every convolution feeds a batch norm,
    which subtracts the batch mean, so the loss does not depend on that bias and its true
    gradient is zero. The float32 gradient is rounding noise (~1e-9), which Adam would
    normalise into steps of about ``lr`` in random directions: a random walk that changes
    nothing while training, drags the running means along (so test-time outputs drift), and
    makes a run depend on how its sums were ordered (threads, processes).
    """
    tasks, n = images.shape[:2]
    h = images.flatten(0, 1)  # [T*n, C, H, W]
    for block in encoder.blocks:
        for layer in block:
            if isinstance(layer, nn.BatchNorm2d):
                h = task_batch_norm(layer, h, tasks)
            elif isinstance(layer, nn.Conv2d) and layer.bias is not None:
                bias = layer.bias.detach()
                h = F.conv2d(h, layer.weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
            else:
                h = layer(h)
    return h.flatten(1).view(tasks, n, -1)


class ProtoNet(MetaLearner):
    """Prototypical Networks on a Conv-4 embedding.

    Args:
        in_channels: image channels (1 for Omniglot).
        hidden: filters per conv layer (64 in the paper).

    Example:
        >>> learner = ProtoNet(in_channels=1, hidden=64)
        >>> predictor = learner.adapt(support_x, support_y)   # [W*S, 1, 28, 28], [W*S]
        >>> logits = predictor(query_x)                        # [N, W]
    """

    name = "protonet"
    bf16_safe = True

    def __init__(self, in_channels: int = 1, hidden: int = 64) -> None:
        super().__init__(in_channels=in_channels, hidden=hidden)
        self.encoder = Conv4(in_channels, hidden)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[T, n, D]`` of images ``[T, n, C, H, W]``; see :func:`encode_tasks`."""
        return encode_tasks(self.encoder, images)

    def _logits(self, batch: TaskBatch) -> torch.Tensor:
        """Logits ``[T, W*Q, W]``; a task's support and query pass through the encoder together."""
        n_support = batch.support_y.shape[1]
        images = torch.cat([batch.support_x, batch.query_x], dim=1)  # [T, N+M, C, H, W]
        emb = self.encode(images)  # [T, N+M, D]
        protos = prototypes(emb[:, :n_support], batch.support_y, batch.ways)
        return -squared_distances(emb[:, n_support:], protos)

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self._logits(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        accuracy = (logits.argmax(-1) == batch.query_y).float().mean()
        return loss, {"loss": loss.item(), "accuracy": accuracy.item()}

    @torch.no_grad()
    def predict(self, batch: TaskBatch) -> torch.Tensor:
        return self._logits(batch)

    @torch.no_grad()
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Prototypes ``[W, D]`` of one task's support set ``[W*S, C, H, W]``, labels ``[W*S]``.

        The predictor maps queries ``[M, C, H, W]`` to logits ``[M, W]`` with detached copies of the
        encoder's parameters: differentiable with respect to the queries (when they require grad,
        for attacks such as :mod:`metaloop.attacks`), never with respect to the parameters.
        """
        ways = int(support_y.max()) + 1
        protos = prototypes(self.encoder(support_x).unsqueeze(0), support_y.unsqueeze(0), ways)
        frozen = {name: p.detach() for name, p in self.encoder.named_parameters()}

        def predictor(query_x: torch.Tensor) -> torch.Tensor:
            embeddings = torch.func.functional_call(self.encoder, frozen, (query_x,))  # [M, D]
            return -squared_distances(embeddings.unsqueeze(0), protos)[0]

        return predictor
