"""Sinusoid regression tasks (Finn et al. 2017, "Model-Agnostic Meta-Learning", section 5.1).

A task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5], phase phi ~ U[0, pi], and inputs
x ~ U[-5, 5]; the learner sees ``shots`` (x, y) pairs and is judged by MSE on ``queries`` more.
"""

from __future__ import annotations

import math

import torch

from metaloop.tasks.episodes import TaskBatch, kept_rows

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidTasks:
    """Seeded generator of sinusoid regression tasks.

    Args:
        shots: support points per task (K in the MAML paper).
        queries: query points per task.
        seed: seeds this generator's own ``torch.Generator``.
    """

    def __init__(self, shots: int = 10, queries: int = 10, seed: int = 0) -> None:
        if shots < 1 or queries < 1:
            raise ValueError(f"shots and queries must be >= 1, got shots={shots}, queries={queries}")
        self.shots, self.queries = shots, queries
        self.ways = 0  # regression: no classes
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=self.generator)

    def sample(self, num_tasks: int = 1, keep: range | None = None) -> TaskBatch:
        """``num_tasks`` tasks: x, y float ``[T, S, 1]`` (support) and ``[T, Q, 1]`` (query).

        ``keep``: return only these positions of the ``num_tasks`` drawn (``T = len(keep)``);
        the generator advances as if all were returned (see :meth:`EpisodeSampler.sample`).
        """
        amplitude = self._uniform((num_tasks, 1, 1), AMPLITUDE_RANGE)
        phase = self._uniform((num_tasks, 1, 1), PHASE_RANGE)
        x = self._uniform((num_tasks, self.shots + self.queries, 1), INPUT_RANGE)
        rows = kept_rows(num_tasks, keep)
        if rows is not None:
            amplitude, phase, x = amplitude[rows], phase[rows], x[rows]
        y = amplitude * torch.sin(x - phase)
        s = self.shots
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:], ways=0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
