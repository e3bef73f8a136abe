"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

An embedding f_ω maps images to vectors. Each class prototype is the mean embedding of its
support examples, c_k = (1/S) Σ_{x in S_k} f_ω(x), and a query is classified by a softmax
over negative squared Euclidean distances, p(y = k | x) ∝ exp(-||f_ω(x) - c_k||²).
The outer loop minimises the query cross-entropy with respect to ω; there is no inner
loop (adaptation is computing prototypes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

    def __init__(self, in_channels: int = 1, hidden: int = 64) -> None:
        super().__init__(in_channels=in_channels, hidden=hidden)
        self.encoder = Conv4(in_channels, hidden)

    def _logits(self, batch: TaskBatch) -> torch.Tensor:
        """Logits ``[T, W*Q, W]``; support and query pass through the encoder together."""
        t, n_support = batch.support_y.shape
        images = torch.cat([batch.support_x, batch.query_x], dim=1)  # [T, N+M, C, H, W]
        emb = self.encoder(images.flatten(0, 1)).view(t, images.shape[1], -1)  # [T, N+M, D]
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
        ways = int(support_y.max()) + 1
        protos = prototypes(self.encoder(support_x).unsqueeze(0), support_y.unsqueeze(0), ways)

        def predictor(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return -squared_distances(self.encoder(query_x).unsqueeze(0), protos)[0]

        return predictor
