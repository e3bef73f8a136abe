"""Siamese networks for one-shot image recognition (Koch, Zemel & Salakhutdinov, ICML 2015
Deep Learning Workshop), and the contrastive-loss variant (Hadsell, Chopra & LeCun, CVPR 2006).

Twin encoders with shared weights f_ω (a Conv-4) embed two images; their similarity is

    bce:          s(x1, x2) = Σ_j a_j |f(x1)_j − f(x2)_j| + b,   p(same) = σ(s)     (weighted L1, Koch)
    contrastive:  s(x1, x2) = −d,  d = ||f(x1) − f(x2)||₂

trained on balanced same/different pairs of meta-train images: binary cross-entropy on σ(s), or
the contrastive loss y d² + (1 − y) max(0, m − d)² with margin m.

Pairs come from the trainer's episodes (:func:`episode_pairs`): every query is paired with a
support example of its own class (same) and one of another class (different), so there are as
many same as different pairs, and only meta-train classes are ever seen. The pairing depends on
the episode alone (no random draws), so a meta-batch split over processes pairs as one process
does.

Few-shot prediction: a query's logit for class k is its mean similarity to the support examples
of class k (the most similar example's class in 1-shot). No parameter changes at test time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.algorithms.embedding import EmbeddingReader
from metaloop.config import Config
from metaloop.nn.backbones import embedding_backbone, embedding_size
from metaloop.nn.task_norm import encode_tasks
from metaloop.tasks.episodes import TaskBatch
from metaloop.tasks.source import TaskSource

LOSSES = ("bce", "contrastive")
NEGATIVES = ("cycle", "hardest")


def episode_pairs(support_y: torch.Tensor, query_y: torch.Tensor, ways: int) -> tuple[torch.Tensor, ...]:
    """Balanced pairs of one episode's queries with its support examples.

    Args:
        support_y: int64 ``[N]`` support labels in ``0..W-1``, every class present.
        query_y: int64 ``[M]`` query labels.
        ways: W >= 2.

    Returns:
        ``(query_index [2M], support_index [2M], same [2M])``: query j (class c, the r-th query
        of its class) is paired with support example ``r mod S_c`` of class c (same = 1) and
        with support example ``r mod S_c'`` of class ``c' = (c + 1 + r mod (W − 1)) mod W``
        (same = 0), so that the different-class partners of a class's queries cycle over the
        other classes.
    """
    if ways < 2:
        raise ValueError(f"pairs need at least 2 classes per episode, got ways = {ways}")
    by_class = [torch.nonzero(support_y == k).flatten() for k in range(ways)]  # support rows of class k
    rank = torch.zeros_like(query_y)  # r: position of each query among the queries of its class
    for k in range(ways):
        rows = torch.nonzero(query_y == k).flatten()
        rank[rows] = torch.arange(rows.numel())
    other = (query_y + 1 + rank % (ways - 1)) % ways
    same_support = torch.stack(
        [by_class[c][r % by_class[c].numel()] for c, r in zip(query_y, rank, strict=True)]
    )
    other_support = torch.stack(
        [by_class[c][r % by_class[c].numel()] for c, r in zip(other, rank, strict=True)]
    )
    queries = torch.arange(query_y.numel())
    same = torch.cat([torch.ones_like(queries), torch.zeros_like(queries)]).float()
    return torch.cat([queries, queries]), torch.cat([same_support, other_support]), same


class Siamese(EmbeddingReader):
    """Siamese network on a Conv-4 embedding, weighted-L1 + sigmoid (Koch) or contrastive.

    Args:
        backbone: the twin embedding, images ``[B, C, H, W]`` -> ``[B, D]``: a module, ``"conv4"``,
            ``"resnet12"`` or an import path ``package.module:factory`` (see :class:`ProtoNet`).
        in_channels: image channels (1 for Omniglot).
        image_size: height = width of the images; fixes the embedding size D.
        hidden: filters per conv layer of the Conv-4 (64).
        loss: ``"bce"`` (Koch et al.) or ``"contrastive"`` (Hadsell et al.).
        margin: m of the contrastive loss (1.0).
        negatives: each query's different-class partner: ``"cycle"`` (the other classes in turn,
            :func:`episode_pairs`) or ``"hardest"`` (the support example of another class it is
            currently most similar to, the pair the nearest-neighbour decision gets wrong first;
            hard-negative mining as in FaceNet, Schroff et al. 2015). Balanced either way.
        backbone_args: keyword arguments of the backbone's factory (or of ``"resnet12"``).

    Example:
        >>> learner = Siamese(in_channels=1, image_size=28)
        >>> p_same = torch.sigmoid(learner.similarity(z1, z2))     # embeddings [..., D]
        >>> logits = learner.eval().adapt(support_x, support_y)(query_x)   # [M, W]
    """

    name = "siamese"
    bf16_safe = True
    config_keys = ("backbone", "backbone_args", "hidden", "loss", "margin", "negatives")

    @classmethod
    def data_hparams(cls, config: Config, tasks: TaskSource) -> dict[str, Any]:
        """Image channels and size."""
        return {"in_channels": tasks.input_channels(), "image_size": config.data.image_size}

    def __init__(
        self,
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 64,
        loss: str = "bce",
        margin: float = 1.0,
        negatives: str = "cycle",
        backbone_args: dict | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
        if negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives {negatives!r}; use one of {', '.join(NEGATIVES)}")
        encoder, spec = embedding_backbone(backbone, in_channels, hidden, backbone_args)
        dim = embedding_size(encoder, (in_channels, image_size, image_size))
        super().__init__(
            backbone=spec,
            in_channels=in_channels,
            image_size=image_size,
            hidden=hidden,
            loss=loss,
            margin=margin,
            negatives=negatives,
            backbone_args=backbone_args,
        )
        self.encoder = encoder
        self.distance_weights = nn.Linear(dim, 1)  # a_j and b of the weighted L1 distance
        with torch.no_grad():  # start with "closer means more similar": a_j < 0
            self.distance_weights.weight.uniform_(-2.0 / dim, 0.0)
            self.distance_weights.bias.fill_(1.0)

    def similarity(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """s(x1, x2) of embeddings ``[..., D]`` (broadcast): ``[...]``; larger is more similar."""
        if self.hparams["loss"] == "contrastive":
            return -(z1 - z2).pow(2).sum(-1).clamp_min(1e-12).sqrt()
        return self.distance_weights((z1 - z2).abs()).squeeze(-1)

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean pair loss over the balanced pairs of every task (:func:`episode_pairs`).

        Metrics: ``loss`` and ``accuracy`` of the same/different decisions (s > 0 for bce,
        d < m/2 for contrastive).
        """
        n = batch.support_y.shape[1]
        z = encode_tasks(self.encoder, torch.cat([batch.support_x, batch.query_x], 1))  # [T, N+M, D]
        losses, correct = [], []
        for t in range(batch.num_tasks):
            q, s, same = episode_pairs(batch.support_y[t], batch.query_y[t], batch.ways)
            if self.hparams["negatives"] == "hardest":
                s = self.hardest_negatives(z[t, n:], z[t, :n], batch.support_y[t], batch.query_y[t], s)
            score = self.similarity(z[t, n + q], z[t, s])  # [2M]
            same = same.to(score.dtype)
            if self.hparams["loss"] == "contrastive":
                d, m = -score, float(self.hparams["margin"])
                losses.append((same * d.pow(2) + (1 - same) * (m - d).clamp_min(0).pow(2)).mean())
                correct.append(((d < m / 2).to(same.dtype) == same).float().mean())
            else:
                losses.append(F.binary_cross_entropy_with_logits(score, same))
                correct.append(((score > 0).to(same.dtype) == same).float().mean())
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.item(), "accuracy": torch.stack(correct).mean().item()}

    def hardest_negatives(
        self,
        query_z: torch.Tensor,
        support_z: torch.Tensor,
        support_y: torch.Tensor,
        query_y: torch.Tensor,
        partners: torch.Tensor,
    ) -> torch.Tensor:
        """``partners`` ``[2M]`` (from :func:`episode_pairs`: M same-class, then M other-class
        support rows) with each query's other-class partner replaced by the support example of
        another class most similar to it. Embeddings ``[M, D]`` / ``[N, D]``, labels ``[M]`` /
        ``[N]``. The choice is made on detached scores; the loss still flows through the pair."""
        with torch.no_grad():
            scores = self.similarity(query_z.unsqueeze(1), support_z.unsqueeze(0))  # [M, N]
            scores = scores.masked_fill(query_y[:, None] == support_y[None, :], float("-inf"))
            hardest = scores.argmax(1)  # [M]
        return torch.cat([partners[: query_y.numel()], hardest])

    def forward(
        self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Logits ``[T, M, W]``: mean similarity of each query ``[T, M, D]`` to the support
        examples ``[T, N, D]`` of each class (labels ``[T, N]``)."""
        scores = self.similarity(query_z.unsqueeze(2), support_z.unsqueeze(1))  # [T, M, N]
        one_hot = F.one_hot(support_y, ways).to(scores.dtype)  # [T, N, W]
        return (scores @ one_hot) / one_hot.sum(1, keepdim=True).clamp_min(1.0)
