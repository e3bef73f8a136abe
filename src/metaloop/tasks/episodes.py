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
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int

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
        )


def kept_rows(num_tasks: int, keep: range | None) -> torch.Tensor | None:
    """int64 ``[K]`` positions to keep out of ``num_tasks`` drawn tasks; ``None`` means all."""
    if keep is None or keep == range(num_tasks):
        return None
    if len(keep) and (min(keep) < 0 or max(keep) >= num_tasks):
        raise ValueError(f"keep={keep} reaches outside the {num_tasks} tasks drawn (0..{num_tasks - 1})")
    return torch.tensor(list(keep), dtype=torch.long)


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

    def _task_indices(self) -> torch.Tensor:
        """int64 ``[W, S+Q]``: dataset rows of one task, one row of indices per class."""
        g = self.generator
        classes = torch.randperm(self.dataset.num_classes, generator=g)[: self.ways]
        scores = torch.rand(self.ways, self._max_size, generator=g)
        scores.masked_fill_(self._padding[classes], 2.0)  # padding sorts last
        picks = scores.argsort(dim=1)[:, : self.shots + self.queries]
        return self.dataset.offsets[classes][:, None] + picks

    def sample(self, num_tasks: int = 1, keep: range | None = None) -> TaskBatch:
        """Draw ``num_tasks`` tasks, stacked into a :class:`TaskBatch`.

        ``keep`` (positions in ``range(num_tasks)``, e.g. one rank's shard of a meta-batch):
        all ``num_tasks`` tasks are still drawn, so the stream advances exactly as without it,
        but only the kept ones are gathered and returned, in order (``[len(keep), ...]``).
        """
        indices = torch.stack([self._task_indices() for _ in range(num_tasks)])  # [T, W, S+Q]
        rows = kept_rows(num_tasks, keep)
        if rows is not None:
            indices = indices[rows]  # [K, W, S+Q]
        tasks = indices.shape[0]
        images = self.dataset.images[indices].float().div_(255.0)  # [K, W, S+Q, C, H, W]
        shape = images.shape[3:]
        support_x = images[:, :, : self.shots].reshape(tasks, self.ways * self.shots, *shape)
        query_x = images[:, :, self.shots :].reshape(tasks, self.ways * self.queries, *shape)
        labels = torch.arange(self.ways)
        support_y = labels.repeat_interleave(self.shots).expand(tasks, -1).contiguous()
        query_y = labels.repeat_interleave(self.queries).expand(tasks, -1).contiguous()
        return TaskBatch(support_x, support_y, query_x, query_y, self.ways)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state, so a resumed run draws the same next episodes."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
