"""Evaluation on fixed-seed test episodes: mean accuracy with a 95% confidence interval."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from metaloop.algorithms.base import MetaLearner
from metaloop.tasks.episodes import EpisodeSampler


@dataclass
class EvalResult:
    """Mean accuracy over ``episodes`` test episodes and the half-width of its 95% CI.

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

    def __str__(self) -> str:
        return (
            f"{self.ways}-way {self.shots}-shot accuracy: {100 * self.mean:.2f} ± {100 * self.ci95:.2f}% "
            f"(95% CI, {self.episodes} episodes)"
        )

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


def episode_accuracies(
    learner: MetaLearner,
    sampler: EpisodeSampler,
    episodes: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Accuracy of ``learner`` on each of the next ``episodes`` tasks of ``sampler``: float ``[episodes]``."""
    was_training = learner.training
    learner.eval()
    accuracies = []
    try:
        with tqdm(total=episodes, desc="evaluate", unit="episode", disable=not progress, leave=False) as bar:
            done = 0
            while done < episodes:
                batch = sampler.sample(min(batch_size, episodes - done)).to(device)
                logits = learner.predict(batch)  # [T, W*Q, W]
                accuracies.append((logits.argmax(-1) == batch.query_y).float().mean(1).cpu())
                done += batch.num_tasks
                bar.update(batch.num_tasks)
    finally:
        learner.train(was_training)
    return torch.cat(accuracies)


def evaluate(
    learner: MetaLearner,
    sampler: EpisodeSampler,
    episodes: int = 1000,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Mean accuracy ± 95% CI of ``learner`` over ``episodes`` tasks drawn from ``sampler``.

    Pass a freshly seeded sampler to get the same test episodes for every learner.
    """
    accuracies = episode_accuracies(learner, sampler, episodes, batch_size, device, progress)
    mean, ci95, std = confidence_interval(accuracies)
    return EvalResult(mean, ci95, std, episodes, sampler.ways, sampler.shots, sampler.queries)
