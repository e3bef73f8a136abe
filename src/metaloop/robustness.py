"""Robustness of any learner to adversarial queries: clean and adversarial accuracy ± 95% CI over
the same seeded test episodes.

For each episode the learner adapts on the clean support set; the attack (:mod:`metaloop.attacks`)
then perturbs the query images with input gradients of that adapted predictor (white box: the
attacker knows the adapted model), and the same predictor classifies the clean and the attacked
queries. Episodes are sharded over torchrun ranks as in :func:`metaloop.evaluate.evaluate`, and
PGD's random start for episode k comes from a generator seeded with ``(seed, k)``, so the numbers
depend neither on ``batch_size`` nor on the number of processes.
"""

from __future__ import annotations

import torch

from metaloop.algorithms.base import MetaLearner
from metaloop.attacks import check_attack, perturb
from metaloop.evaluate import (
    EvalResult,
    Sampler,
    confidence_interval,
    evaluation_mode,
    sharded_episode_values,
)
from metaloop.tasks.episodes import TaskBatch


def attacked_accuracies(
    learner: MetaLearner,
    batch: TaskBatch,
    numbers: range,
    attack: str,
    epsilon: float,
    steps: int = 10,
    seed: int = 0,
) -> torch.Tensor:
    """Query accuracy of each task of ``batch`` before and after the attack: float ``[T, 2]``
    (column 0 clean, column 1 adversarial). ``numbers`` are the tasks' episode numbers (they seed PGD)."""
    rows = []
    for t, number in zip(range(batch.num_tasks), numbers, strict=True):
        predictor = learner.adapt(batch.support_x[t], batch.support_y[t])
        query_x, query_y = batch.query_x[t], batch.query_y[t]  # [M, C, H, W], [M]
        generator = torch.Generator().manual_seed((seed * 1_000_003 + number) % 2**63)
        adversarial_x = perturb(attack, predictor, query_x, query_y, epsilon, steps, generator)
        with torch.no_grad():
            correct = [(predictor(x).argmax(-1) == query_y).float().mean() for x in (query_x, adversarial_x)]
        rows.append(torch.stack(correct))
    return torch.stack(rows)


def evaluate_under_attack(
    learner: MetaLearner,
    sampler: Sampler,
    attack: str,
    epsilon: float,
    steps: int = 10,
    episodes: int = 1000,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
    seed: int = 0,
) -> tuple[EvalResult, EvalResult]:
    """Clean and adversarial query accuracy ± 95% CI of ``learner`` over ``episodes`` tasks of ``sampler``.

    Args:
        learner: any trained learner; its ``adapt`` predictor must be differentiable with respect
            to the query images (every learner in :data:`metaloop.algorithms.LEARNERS` is).
        sampler: classification episodes (images in [0, 1]); pass a freshly seeded one.
        attack: ``"fgsm"`` or ``"pgd"``; epsilon: the L∞ radius in (0, 1]; steps: PGD's steps.
        seed: seeds PGD's random starts.

    Returns:
        ``(clean, adversarial)``: each the mean over the same episodes with its 95% CI.
    """
    check_attack(attack, epsilon, steps)
    if sampler.ways == 0:
        raise ValueError("attacks apply to image classification; these are regression tasks (ways = 0)")

    def values(batch: TaskBatch, numbers: range) -> torch.Tensor:
        return attacked_accuracies(learner, batch, numbers, attack, epsilon, steps, seed)

    with evaluation_mode(learner):
        accuracies = sharded_episode_values(values, 2, sampler, episodes, batch_size, device, progress)
    shape = (episodes, sampler.ways, sampler.shots, sampler.queries)
    clean, adversarial = (EvalResult(*confidence_interval(accuracies[:, j]), *shape) for j in (0, 1))
    return clean, adversarial
