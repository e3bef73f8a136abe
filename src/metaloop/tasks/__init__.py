"""Where tasks come from: episodes over class-grouped datasets, and sinusoid regression."""

from metaloop.tasks.episodes import EpisodeSampler, TaskBatch
from metaloop.tasks.sinusoid import SinusoidTasks

__all__ = ["EpisodeSampler", "SinusoidTasks", "TaskBatch"]
