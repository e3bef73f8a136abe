"""Episodes: k-way n-shot classification tasks cut from a class-grouped dataset.

A task draws ``ways`` classes, then ``shots`` support and ``queries`` query examples of
each. Labels are remapped to ``0..ways-1`` per task in the order the classes were drawn.
The same seed gives the same stream of episodes, whichever learner consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metaloop.data.base import ClassImages


@dataclass
class TaskBatch:
    """A stack of ``T`` tasks, one tensor per field.

    Classification (images): ``support_x`` float ``[T, W*S, C, H, W]`` in [0, 1],
    ``support_y`` int64 ``[T, W*S]`` in ``0..W-1``; ``query_x`` ``[T, W*Q, C, H, W]``,
    ``query_y`` ``[T, W*Q]``. Examples are grouped by class (class-major order).

    Regression: ``support_x``/``support_y`` float ``[T, S, 1]``, ``query_x``/``query_y``
    float ``[T, Q, 1]`` and ``ways`` is 0.

    ``classes`` (episodes of a dataset): int64 ``[T, W]``, the dataset class index behind each
    task label, for learners that train on global classes (the transfer baseline); else None.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int
    classes: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(
            self.support_x.to(device),
            self.support_y.to(device),
            self.query_x.to(device),
            self.query_y.to(device),
            self.ways,
            None if self.classes is None else self.classes.to(device),
        )

    def task(self, t: int) -> TaskBatch:
        """Task ``t`` alone, as a batch of one."""
        return self.slice(t, t + 1)

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start..stop-1`` as a batch."""
        return TaskBatch(
            self.support_x[start:stop],
            self.support_y[start:stop],
            self.query_x[start:stop],
            self.query_y[start:stop],
            self.ways,
            None if self.classes is None else self.classes[start:stop],
        )


def kept_rows(num_tasks: int, keep: range | None) -> torch.Tensor | None:
    """int64 ``[K]`` positions to keep out of ``num_tasks`` drawn tasks; ``None`` means all."""
    if keep is None or keep == range(num_tasks):
        return None
    if len(keep) and (min(keep) < 0 or max(keep) >= num_tasks):
        raise ValueError(f"keep={keep} reaches outside the {num_tasks} tasks drawn (0..{num_tasks - 1})")
    return torch.tensor(list(keep), dtype=torch.long)


def stack_tasks(images: torch.Tensor, classes: torch.Tensor, shots: int) -> TaskBatch:
    """A :class:`TaskBatch` from uint8 images ``[T, W, S+Q, C, H, W]`` (per task, per class: S
    support then Q query examples) and their classes ``[T, W]``; pixels scaled to [0, 1]."""
    tasks, ways, per_class = images.shape[:3]
    queries = per_class - shots
    images = images.float().div_(255.0)
    shape = images.shape[3:]
    support_x = images[:, :, :shots].reshape(tasks, ways * shots, *shape)
    query_x = images[:, :, shots:].reshape(tasks, ways * queries, *shape)
    labels = torch.arange(ways)
    support_y = labels.repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = labels.repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(support_x, support_y, query_x, query_y, ways, classes)


class EpisodeSampler:
    """Seeded sampler of k-way n-shot episodes.

    Args:
        dataset: the classes to draw from (a meta-train, meta-val or meta-test split).
        ways: classes per task (W).
        shots: support examples per class (S).
        queries: query examples per class (Q).
        seed: seeds the sampler's own ``torch.Generator``; nothing global is touched.

    Tasks are drawn one after another from the generator, so the i-th task is the same
    whatever the meta-batch size used to ask for it.
    """

    def __init__(self, dataset: ClassImages, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        for label, value, least in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{label} must be an integer >= {least}, got {value!r}")
        if ways > dataset.num_classes:
            raise ValueError(
                f"asked for {ways}-way tasks but {dataset.name} has only {dataset.num_classes} classes; "
                f"use ways <= {dataset.num_classes}"
            )
        sizes = dataset.class_sizes
        smallest = int(sizes.argmin())
        if int(sizes[smallest]) < shots + queries:
            raise ValueError(
                f"asked for shots + queries = {shots} + {queries} = {shots + queries} examples per class "
                f"but class {dataset.class_names[smallest]!r} of {dataset.name} holds only "
                f"{int(sizes[smallest])}; use shots + queries <= {int(sizes[smallest])}"
            )
        self.dataset = dataset
        self.ways, self.shots, self.queries = ways, shots, queries
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._max_size = int(sizes.max())
        # [K, max_size] True where a class has no example at that position
        self._padding = torch.arange(self._max_size)[None, :] >= sizes[:, None]

    def _task_indices(
        self, ways: int | None = None, shots: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``[W, S+Q]`` dataset rows of one task (one row of indices per class) and int64
        ``[W]`` the classes drawn, in label order (label k is class ``classes[k]``: the labels are
        a fresh random assignment for every task). ``ways``/``shots`` default to the sampler's."""
        ways, shots = ways or self.ways, shots or self.shots
        g = self.generator
        classes = torch.randperm(self.dataset.num_classes, generator=g)[:ways]
        scores = torch.rand(ways, self._max_size, generator=g)
        scores.masked_fill_(self._padding[classes], 2.0)  # padding sorts last
        picks = scores.argsort(dim=1)[:, : shots + self.queries]
        return self.dataset.offsets[classes][:, None] + picks, classes

    def sample(self, num_tasks: int = 1, keep: range | None = None) -> TaskBatch:
        """Draw ``num_tasks`` tasks, stacked into a :class:`TaskBatch`.

        ``keep`` (positions in ``range(num_tasks)``, e.g. one rank's shard of a meta-batch):
        all ``num_tasks`` tasks are still drawn, so the stream advances exactly as without it,
        but only the kept ones are gathered and returned, in order (``[len(keep), ...]``).
        """
        drawn = [self._task_indices() for _ in range(num_tasks)]
        indices = torch.stack([rows for rows, _ in drawn])  # [T, W, S+Q]
        classes = torch.stack([c for _, c in drawn])  # [T, W]
        rows = kept_rows(num_tasks, keep)
        if rows is not None:
            indices, classes = indices[rows], classes[rows]  # [K, W, S+Q], [K, W]
        return stack_tasks(self.dataset.images[indices], classes, self.shots)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state, so a resumed run draws the same next episodes."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
