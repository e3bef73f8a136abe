"""Evaluation on fixed-seed test episodes: mean accuracy with a 95% confidence interval.

Under torchrun the episodes are sharded over the ranks and the per-episode values gathered
(:func:`sharded_episode_values`): every rank gets the result one process would compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from metaloop import distributed
from metaloop.algorithms.base import MetaLearner
from metaloop.config import Config
from metaloop.ensemble import Ensemble
from metaloop.tasks.episodes import EpisodeSampler, TaskBatch
from metaloop.tasks.heterogeneous import MixedEpisodeSampler, TaskGroups, Tasks
from metaloop.tasks.sinusoid import SinusoidTasks
from metaloop.tasks.source import TaskSource

Sampler = EpisodeSampler | MixedEpisodeSampler | SinusoidTasks
Predictor = MetaLearner | Ensemble  # anything with the learners' predict(tasks)


@dataclass
class EvalResult:
    """Mean ``metric`` over ``episodes`` test episodes and the half-width of its 95% CI.

    ``metric`` is ``"accuracy"`` for classification and ``"mse"`` (query mean squared error)
    for regression tasks (``ways == 0``).

    ``ci95 = 1.96 * std / sqrt(episodes)`` with the sample standard deviation (ddof=1)
    of the per-episode accuracies, the normal approximation used across the few-shot
    literature (Snell et al. 2017, Finn et al. 2017).
    """

    mean: float
    ci95: float
    std: float
    episodes: int
    ways: int
    shots: int
    queries: int
    metric: str = "accuracy"

    def __str__(self) -> str:
        if self.metric == "mse":
            return f"{self.shots}-shot MSE: {self.mean:.3f} ± {self.ci95:.3f} (95% CI, {self.episodes} tasks)"
        return (
            f"{self.ways}-way {self.shots}-shot accuracy: {100 * self.mean:.2f} ± {100 * self.ci95:.2f}% "
            f"(95% CI, {self.episodes} episodes)"
        )

    @property
    def score(self) -> float:
        """Higher is better: accuracy, or minus the MSE."""
        return -self.mean if self.metric == "mse" else self.mean

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def confidence_interval(values: torch.Tensor) -> tuple[float, float, float]:
    """``(mean, ci95, std)`` of a 1-D tensor: ci95 = 1.96 * std / sqrt(n), std with ddof=1."""
    values = values.double()
    n = values.numel()
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {n}")
    mean = values.mean().item()
    std = values.std(unbiased=True).item()
    return mean, 1.96 * std / math.sqrt(n), std


def per_task_metric(predictions: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """float ``[T]``: query accuracy of logits ``[T, M, W]``, or query MSE of predictions ``[T, M, 1]``
    for regression batches (``ways == 0``)."""
    if batch.ways == 0:
        return (predictions - batch.query_y).pow(2).flatten(1).mean(1)
    return (predictions.argmax(-1) == batch.query_y).float().mean(1)


EpisodeValues = Callable[[Tasks, range], torch.Tensor]
"""``values(batch, numbers)``: float ``[T, K]``, K values for each of the T tasks of ``batch``, which
are the episodes numbered ``numbers`` (0-based positions in the evaluation's stream of episodes)."""


def sharded_episode_values(
    values: EpisodeValues,
    columns: int,
    sampler: Sampler,
    episodes: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """``values`` of each of the next ``episodes`` tasks of ``sampler``: float ``[episodes, columns]``.

    Under torchrun (W ranks) the episodes are drawn in chunks of ``W * batch_size``; every rank
    draws each chunk (the same seeded stream), evaluates its :func:`~metaloop.distributed.shard`
    of it, and the values are gathered, so every rank returns the same values in the same order
    as one process. Progress is shown on rank 0 only.
    """
    chunks = []  # this rank's values of each chunk, [len(shard), columns] each
    world = distributed.world_size() if distributed.active() else 1
    show = progress and distributed.is_main()
    with tqdm(total=episodes, desc="evaluate", unit="episode", disable=not show, leave=False) as bar:
        done = 0
        while done < episodes:
            size = min(batch_size * world, episodes - done)
            keep = distributed.shard(size) if world > 1 else range(size)
            batch = sampler.sample(size, keep=keep if world > 1 else None).to(device)
            numbers = range(done + keep.start, done + keep.stop)
            chunk = values(batch, numbers) if batch.num_tasks else torch.empty(0, columns)
            chunks.append(chunk.cpu())
            done += size
            bar.update(size)
    if world == 1:
        return torch.cat(chunks)
    return torch.stack([distributed.gather_chunks([c[:, j] for c in chunks]) for j in range(columns)], 1)


@contextmanager
def evaluation_mode(learner: Predictor) -> Iterator[None]:
    """``learner`` in eval mode for the ``with`` block, then back in the mode it was in."""
    was_training = learner.training
    learner.eval()
    try:
        yield
    finally:
        learner.train(was_training)


def episode_metrics(
    learner: Predictor,
    sampler: Sampler,
    episodes: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Accuracy (or MSE) of ``learner`` on each of the next ``episodes`` tasks: float ``[episodes]``,
    the same on every torchrun rank (see :func:`sharded_episode_values`)."""

    def values(tasks: Tasks, _: range) -> torch.Tensor:
        if isinstance(tasks, TaskGroups):  # unequal shapes: each group on its own, back in draw order
            return tasks.scatter(lambda group: per_task_metric(learner.predict(group), group)[:, None])
        return per_task_metric(learner.predict(tasks), tasks)[:, None]

    with evaluation_mode(learner):
        return sharded_episode_values(values, 1, sampler, episodes, batch_size, device, progress)[:, 0]


def evaluate(
    learner: Predictor,
    sampler: Sampler,
    episodes: int = 1000,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Mean accuracy (or MSE) ± 95% CI of ``learner`` over ``episodes`` tasks drawn from ``sampler``.

    Pass a freshly seeded sampler to get the same test episodes for every learner.
    """
    values = episode_metrics(learner, sampler, episodes, batch_size, device, progress)
    mean, ci95, std = confidence_interval(values)
    metric = "mse" if sampler.ways == 0 else "accuracy"
    return EvalResult(mean, ci95, std, episodes, sampler.ways, sampler.shots, sampler.queries, metric)


def test_learner(config: Config, learner: Predictor, progress: bool = True) -> EvalResult:
    """Meta-test ``learner`` on ``config.eval`` episodes of the test split."""
    ev = config.eval
    sampler = TaskSource(config).sampler(config.data.test_split, ev.ways, ev.shots, ev.queries, seed=ev.seed)
    device = distributed.local_device(config.device)
    return evaluate(learner, sampler, ev.episodes, ev.batch_size, device, progress)
