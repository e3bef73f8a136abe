"""What the learners that read a task from embeddings share (the Siamese net, the attention
learner): an embedding of every image (a Conv-4, ResNet-12 or any module), then a head
``forward(support_z, support_y, query_z, ways)`` that turns the embedded task into query logits,
with no gradient step at test time."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch.func import functional_call

from metaloop.algorithms.base import MetaLearner, Predictor
from metaloop.tasks.episodes import TaskBatch


class EmbeddingReader(MetaLearner):
    """Base class: subclasses set ``self.encoder`` (images ``[B, C, H, W]`` -> ``[B, D]``) and define
    :meth:`forward`."""

    encoder: torch.nn.Module

    @abstractmethod
    def forward(
        self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Logits ``[T, M, W]`` of query embeddings ``[T, M, D]`` given support embeddings
        ``[T, N, D]`` with labels ``[T, N]`` in ``0..ways-1``."""

    def check_ways(self, ways: int) -> None:
        """Raise ``ValueError`` if this learner cannot read ``ways``-way tasks (default: any)."""

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """Query logits ``[T, W*Q, W]`` (support and query embedded with the running statistics)."""
        self.check_ways(batch.ways)
        with torch.no_grad():
            n = batch.support_y.shape[1]
            images = torch.cat([batch.support_x, batch.query_x], 1)
            z = self.encoder(images.flatten(0, 1)).view(batch.num_tasks, images.shape[1], -1)
            return self(z[:, :n], batch.support_y, z[:, n:], batch.ways)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Embed the support set once; each call of the predictor reads it.

        The predictor runs on detached parameters: differentiable with respect to the queries
        (attacks), never with respect to the parameters.
        """
        ways = int(support_y.max()) + 1
        self.check_ways(ways)
        with torch.no_grad():
            support_z = self.encoder(support_x)[None]
        frozen = {name: p.detach() for name, p in self.named_parameters()}
        encoder = {
            name.removeprefix("encoder."): p for name, p in frozen.items() if name.startswith("encoder.")
        }

        def predictor(query_x: torch.Tensor) -> torch.Tensor:
            query_z = functional_call(self.encoder, encoder, (query_x,))[None]
            return functional_call(self, frozen, (support_z, support_y[None], query_z, ways))[0]

        return predictor
