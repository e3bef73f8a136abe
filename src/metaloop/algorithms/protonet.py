"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

An embedding f_ω maps images to vectors. Each class prototype is the mean embedding of its
support examples, c_k = (1/S) Σ_{x in S_k} f_ω(x), and a query is classified by a softmax
over negative squared Euclidean distances, p(y = k | x) ∝ exp(-||f_ω(x) - c_k||²).
The outer loop minimises the query cross-entropy with respect to ω; there is no inner
loop (adaptation is computing prototypes).

The embedding is any network (a Conv-4 by default, or ResNet-12, or a user's module, pretrained
or not). While meta-training, each task of a meta-batch is its own batch-norm batch (statistics per
task, as in Snell et al.'s code, which trains on one episode per step): a task's embedding then
does not depend on which other tasks share its meta-batch, so splitting a meta-batch over
processes (:mod:`metaloop.distributed`) computes exactly what one process computes. The
running statistics used at test time are updated once per step with the mean over tasks of the
per-task statistics. The biases of convolutions followed by batch norm (the loss does not depend
on them) are not trained; see :func:`metaloop.nn.task_norm.statistics_per_task`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.algorithms.base import MetaLearner, Predictor
from metaloop.nn.backbones import embedding_backbone
from metaloop.nn.task_norm import encode_tasks
from metaloop.tasks.episodes import TaskBatch


def prototypes(support_emb: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means ``[T, W, D]`` of support embeddings ``[T, N, D]`` with labels ``[T, N]``."""
    one_hot = F.one_hot(support_y, ways).to(support_emb.dtype)  # [T, N, W]
    sums = one_hot.transpose(1, 2) @ support_emb  # [T, W, D]
    return sums / one_hot.sum(1).unsqueeze(-1).clamp_min(1.0)


def squared_distances(query_emb: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``||q - c||²`` as ``[T, M, W]`` for queries ``[T, M, D]`` and prototypes ``[T, W, D]``."""
    return (query_emb.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)


class ProtoNet(MetaLearner):
    """Prototypical Networks over any embedding network (a Conv-4 by default).

    Args:
        backbone: the embedding f_ω, images ``[B, C, H, W]`` -> ``[B, D]``: an ``nn.Module``, a
            built-in name (``"conv4"``, ``"resnet12"``) or an import path ``package.module:factory``.
        in_channels: image channels of the built-in backbones (1 for Omniglot).
        hidden: filters per conv layer of the Conv-4 (64 in the paper).
        backbone_args: keyword arguments of the backbone's factory (or of ``"resnet12"``).

    Example:
        >>> learner = ProtoNet(my_encoder)                        # any [B, C, H, W] -> [B, D] module
        >>> predictor = learner.adapt(support_x, support_y)   # [W*S, 1, 28, 28], [W*S]
        >>> logits = predictor(query_x)                        # [N, W]
    """

    name = "protonet"
    bf16_safe = True
    config_keys = ("backbone", "backbone_args", "hidden")

    def __init__(
        self,
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        hidden: int = 64,
        backbone_args: dict | None = None,
    ) -> None:
        encoder, spec = embedding_backbone(backbone, in_channels, hidden, backbone_args)
        super().__init__(backbone=spec, in_channels=in_channels, hidden=hidden, backbone_args=backbone_args)
        self.encoder = encoder

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
