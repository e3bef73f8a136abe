"""Heterogeneous episodes: the number of ways, the number of shots and the dataset vary per task.

Real task distributions are not one fixed k-way n-shot shape (Triantafillou et al., "Meta-Dataset",
ICLR 2020, arXiv:1903.03096). :class:`MixedEpisodeSampler` draws, for every task, a dataset of a
mixture (uniformly), a number of ways in ``[ways, max_ways]`` and of shots in ``[shots, max_shots]``
(uniformly), then the task itself as :class:`~metaloop.tasks.episodes.EpisodeSampler` does.

Unequal tasks cannot be stacked into one tensor. They are grouped by shape instead of padded
(:class:`TaskGroups`): each group is an ordinary :class:`TaskBatch` whose tasks all have W ways and
S shots, so every learner runs on them unchanged, batch norm never sees a padding image, and a
loss averaged over groups weighted by their number of tasks is the mean over tasks
(:func:`mean_over_tasks`; for gradients added group by group, :func:`backward_over_tasks`).
``positions`` records where each task was in the draw, so per-task values can be put back in draw
order (:meth:`TaskGroups.scatter`), as evaluation needs for paired comparisons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from metaloop.data.base import ClassImages
from metaloop.tasks.augment import TaskAugmentation
from metaloop.tasks.episodes import EpisodeSampler, TaskBatch, kept_rows, stack_tasks


@dataclass
class TaskGroups:
    """Tasks of unequal shapes as homogeneous groups: ``groups[g]`` holds the tasks that were at
    positions ``positions[g]`` (int64 ``[T_g]``) of the draw (after ``keep``)."""

    groups: list[TaskBatch]
    positions: list[torch.Tensor]

    @property
    def num_tasks(self) -> int:
        return sum(group.num_tasks for group in self.groups)

    @property
    def ways(self) -> int:
        """The largest number of ways of any task."""
        return max(group.ways for group in self.groups)

    def to(self, device: torch.device | str) -> TaskGroups:
        return TaskGroups([group.to(device) for group in self.groups], self.positions)

    def scatter(self, values: Callable[[TaskBatch], torch.Tensor]) -> torch.Tensor:
        """``values(group)`` (``[T_g, ...]`` per group) put back in draw order: ``[T, ...]``."""
        parts = [values(group) for group in self.groups]
        out = parts[0].new_empty(self.num_tasks, *parts[0].shape[1:])
        for part, where in zip(parts, self.positions, strict=True):
            out[where.to(out.device)] = part
        return out


Tasks = TaskBatch | TaskGroups


def mean_over_tasks(
    tasks: Tasks, fn: Callable[[TaskBatch], tuple[torch.Tensor, dict[str, float]]]
) -> tuple[torch.Tensor, dict[str, float]]:
    """``fn`` (a meta-loss: mean over the tasks of a batch, and metrics) of a batch, or of groups
    combined as the mean over all their tasks: Σ_g (T_g / T) fn(group_g)."""
    if isinstance(tasks, TaskBatch):
        return fn(tasks)
    total = tasks.num_tasks
    loss: torch.Tensor | float = 0.0
    metrics: dict[str, float] = {}
    for group in tasks.groups:
        share = group.num_tasks / total
        group_loss, group_metrics = fn(group)
        loss = loss + share * group_loss
        for key, value in group_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + share * value
    return loss, metrics


def backward_over_tasks(tasks: Tasks, fn: Callable[[TaskBatch, float], dict[str, float]]) -> dict[str, float]:
    """``fn(batch, scale)`` (a meta-backward: adds ``scale`` × the gradient of the mean loss over
    the batch's tasks, returns its metrics) over a batch, or over groups with ``scale = T_g / T``,
    so the gradients add up to that of the mean over all tasks; metrics are weighted the same way."""
    if isinstance(tasks, TaskBatch):
        return fn(tasks, 1.0)
    total = tasks.num_tasks
    metrics: dict[str, float] = {}
    for group in tasks.groups:
        share = group.num_tasks / total
        for key, value in fn(group, share).items():
            metrics[key] = metrics.get(key, 0.0) + share * value
    return metrics


class MixedEpisodeSampler:
    """Seeded episodes whose dataset, ways and shots are drawn per task.

    Args:
        datasets: one or more class-grouped datasets with the same image shape (the mixture;
            a task comes from one of them, chosen uniformly).
        ways, max_ways: each task has W ways, W uniform in ``[ways, max_ways]`` (default: ways).
        shots, max_shots: and S shots per class, S uniform in ``[shots, max_shots]``.
        queries: query examples per class (Q, the same for every task).
        seed: seeds the sampler's own generator.
        augment: episode-level augmentation of every task, see :mod:`metaloop.tasks.augment`.

    ``sample`` returns a :class:`TaskBatch` when every task drawn has the same shape, else
    :class:`TaskGroups`. ``classes`` of a task are numbered across the mixture: the classes of
    ``datasets[d]`` come after those of ``datasets[:d]``.
    """

    def __init__(
        self,
        datasets: list[ClassImages],
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        max_ways: int | None = None,
        max_shots: int | None = None,
        augment: str = "none",
    ) -> None:
        self.augmentation = TaskAugmentation.parse(augment)
        max_ways, max_shots = max_ways or ways, max_shots or shots
        if max_ways < ways or max_shots < shots:
            raise ValueError(
                f"max_ways and max_shots must be at least ways and shots, got ways {ways}..{max_ways}, "
                f"shots {shots}..{max_shots}"
            )
        shapes = {tuple(d.image_shape) for d in datasets}
        if len(shapes) > 1:
            names = ", ".join(f"{d.name} {tuple(d.image_shape)}" for d in datasets)
            raise ValueError(
                f"a mixture needs images of one shape, got {names}; give every dataset the same "
                "data.image_size and colour mode"
            )
        # one EpisodeSampler per dataset for its class tables and checks; all draw from one generator
        self.samplers = [EpisodeSampler(d, max_ways, max_shots, queries, seed) for d in datasets]
        self.generator = torch.Generator().manual_seed(seed)
        for sampler in self.samplers:
            sampler.generator = self.generator
        self.class_offsets = torch.tensor([0] + [d.num_classes for d in datasets]).cumsum(0)[:-1].tolist()
        self.ways, self.shots, self.queries = ways, shots, queries
        self.max_ways, self.max_shots = max_ways, max_shots
        self.seed = seed

    def _uniform(self, low: int, high: int) -> int:
        return low if low == high else int(torch.randint(low, high + 1, (), generator=self.generator))

    def sample(self, num_tasks: int = 1, keep: range | None = None) -> Tasks:
        """Draw ``num_tasks`` tasks; return the kept ones (``keep`` as for ``EpisodeSampler.sample``:
        all are drawn, so the stream advances the same) as one batch or as groups of equal shape."""
        drawn = []  # (ways, shots, dataset index, rows [W, S+Q], classes [W], augmentation) per task
        size = self.samplers[0].dataset.image_shape[-1]
        for _ in range(num_tasks):
            d = self._uniform(0, len(self.samplers) - 1)
            ways, shots = self._uniform(self.ways, self.max_ways), self._uniform(self.shots, self.max_shots)
            rows, classes = self.samplers[d]._task_indices(ways, shots)
            augmentation = self.augmentation.draw(self.generator, rows.numel(), size)
            drawn.append((ways, shots, d, rows, classes, augmentation))
        rows_kept = kept_rows(num_tasks, keep)
        if rows_kept is not None:
            drawn = [drawn[i] for i in rows_kept.tolist()]
        shapes: dict[tuple[int, int], list[int]] = {}
        for i, (ways, shots, *_) in enumerate(drawn):
            shapes.setdefault((ways, shots), []).append(i)
        groups, positions = [], []
        for (_, shots), members in shapes.items():
            images = torch.stack(
                [
                    self.augmentation.apply(
                        self.samplers[drawn[i][2]].dataset.images[drawn[i][3]], drawn[i][5]
                    )
                    for i in members
                ]
            )
            classes = torch.stack([drawn[i][4] + self.class_offsets[drawn[i][2]] for i in members])
            groups.append(stack_tasks(images, classes, shots))
            positions.append(torch.tensor(members, dtype=torch.long))
        if len(groups) == 1:
            return groups[0]
        return TaskGroups(groups, positions)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state, so a resumed run draws the same next episodes."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
