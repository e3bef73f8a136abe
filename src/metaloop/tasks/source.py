"""Where tasks come from in a run: task samplers for the splits a configuration names."""

from __future__ import annotations

import torch

from metaloop.config import Config, ConfigError
from metaloop.data import load_dataset
from metaloop.data.base import ClassImages
from metaloop.tasks.episodes import EpisodeSampler
from metaloop.tasks.heterogeneous import MixedEpisodeSampler
from metaloop.tasks.sinusoid import SinusoidTasks

Sampler = EpisodeSampler | MixedEpisodeSampler | SinusoidTasks


class TaskSource:
    """Task samplers for the splits named in ``config.data``; each dataset split is loaded once.

    ``data.name: sinusoid`` gives regression tasks (:class:`SinusoidTasks`; the split only picks
    the seed); every other name is a class-grouped image dataset cut into episodes, or a mixture
    of them joined by ``+`` (``omniglot+glyphs``: each task from one of them, chosen uniformly).
    With ``train.max_ways``/``train.max_shots``, ``train.augment`` (or a mixture) the training
    episodes come from a :class:`MixedEpisodeSampler` and may differ in shape from task to task.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._datasets: dict[str, list[ClassImages]] = {}

    @property
    def regression(self) -> bool:
        return self.config.data.name == "sinusoid"

    @property
    def names(self) -> list[str]:
        """The dataset names of ``data.name`` (several for a mixture)."""
        return self.config.data.name.split("+")

    def datasets(self, split: str) -> list[ClassImages]:
        """The split of every dataset of ``data.name``."""
        if split not in self._datasets:
            data = self.config.data
            self._datasets[split] = [
                load_dataset(
                    name,
                    split,
                    image_size=data.image_size,
                    data_dir=data.data_dir,
                    seed=self.config.seed,
                    root=data.root,
                    resize=data.resize,
                )
                for name in self.names
            ]
            keep = data.train_classes
            if split == data.train_split and keep is not None:
                self._datasets[split] = [self.fewer_classes(d, keep) for d in self._datasets[split]]
        return self._datasets[split]

    def fewer_classes(self, dataset: ClassImages, keep: int) -> ClassImages:
        """``keep`` classes of ``dataset`` picked at random (seed ``config.seed``): scarce tasks."""
        if not 2 <= keep <= dataset.num_classes:
            raise ConfigError(
                f"data.train_classes must be between 2 and the {dataset.num_classes} classes of "
                f"{dataset.name}, got {keep}"
            )
        generator = torch.Generator().manual_seed(self.config.seed)
        picked = torch.randperm(dataset.num_classes, generator=generator)[:keep].sort().values
        return dataset.subset(picked.tolist(), name=f"{dataset.name}[{keep} classes]")

    def dataset(self, split: str) -> ClassImages:
        """The split of the first (or only) dataset."""
        return self.datasets(split)[0]

    def num_classes(self, split: str) -> int:
        """Classes of ``split`` over the whole mixture."""
        return sum(d.num_classes for d in self.datasets(split))

    def sampler(
        self,
        split: str,
        ways: int,
        shots: int,
        queries: int,
        seed: int,
        max_ways: int | None = None,
        max_shots: int | None = None,
        augment: str = "none",
    ) -> Sampler:
        if self.regression:
            return SinusoidTasks(shots, queries, seed)
        varied = (max_ways or ways) != ways or (max_shots or shots) != shots or augment != "none"
        if len(self.names) > 1 or varied:
            return MixedEpisodeSampler(
                self.datasets(split), ways, shots, queries, seed, max_ways, max_shots, augment
            )
        return EpisodeSampler(self.dataset(split), ways, shots, queries, seed)

    def input_channels(self) -> int:
        """Image channels of the training data (1 for regression inputs)."""
        return 1 if self.regression else self.dataset(self.config.data.train_split).image_shape[0]

    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input: ``(C, H, W)`` of the training images, or ``(1,)`` for regression."""
        return (1,) if self.regression else tuple(self.dataset(self.config.data.train_split).image_shape)
