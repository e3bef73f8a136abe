"""What a meta-learner is: a module that turns a task batch into a meta-training loss,
and a support set into a predictor for queries."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from metaloop.tasks.episodes import TaskBatch

Predictor = Callable[[torch.Tensor], torch.Tensor]


class MetaLearner(nn.Module, ABC):
    """Base class of every learner.

    Subclasses implement :meth:`meta_loss` (training) and :meth:`adapt` (prediction);
    :meth:`predict` has a per-task default that batched learners override. Training calls
    :meth:`meta_backward`, which by default is ``meta_loss`` then ``backward()``.
    The constructor arguments a learner needs are recorded in ``self.hparams`` so that a
    checkpoint can rebuild it.
    """

    name: str = "learner"
    # Whether train.precision=bf16 may be used: its bfloat16 meta-gradient points the way the float32
    # one does (cosine >= 0.99 on a 5-way 1-shot batch), checked for every learner in tests/test_amp.py.
    bf16_safe: bool = False

    def __init__(self, **hparams: object) -> None:
        super().__init__()
        self.hparams = dict(hparams)

    @abstractmethod
    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Outer-loop loss averaged over the tasks of ``batch``, and metrics to log
        (at least ``"loss"``; ``"accuracy"`` for classification)."""

    def meta_backward(
        self,
        batch: TaskBatch,
        scale: float = 1.0,
        max_task_chunk: int | None = None,
        memory_budget_mb: float | None = None,
    ) -> dict[str, float]:
        """Add ``scale`` × ∇ :meth:`meta_loss` to ``.grad`` of every parameter; return its metrics.

        This default holds the whole batch's graph until one ``backward()``; learners whose loss
        is a mean of independent per-task terms override it to go through the tasks a chunk at a
        time (at most ``max_task_chunk`` tasks, or what fits ``memory_budget_mb``; ``None``: the
        learner's choice), so memory does not grow with the batch. The backward pass runs with
        autocast off, as it would outside the forward's ``torch.autocast`` block.
        """
        loss, metrics = self.meta_loss(batch)
        with torch.autocast(batch.support_x.device.type, enabled=False):
            (loss * scale).backward()
        return metrics

    @abstractmethod
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Learn one task from its support set.

        Args:
            support_x: ``[W*S, C, H, W]`` images of one task.
            support_y: int64 ``[W*S]`` labels in ``0..W-1``.

        Returns:
            A function mapping query images ``[N, C, H, W]`` to logits ``[N, W]``.
        """

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """Logits ``[T, W*Q, W]`` for every query of every task, one task at a time."""
        return torch.stack(
            [
                self.adapt(batch.support_x[t], batch.support_y[t])(batch.query_x[t])
                for t in range(batch.num_tasks)
            ]
        )
