"""What a meta-learner is: a module that turns a task batch into a meta-training loss,
and a support set into a predictor for queries; and what it declares about itself (task type,
fixed output ways, adaptation by gradient steps, bf16 safety, how a recipe builds it), so that
training, comparison, prediction and the command line never guess it from signatures or keys."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from metaloop.config import Config, ConfigError
from metaloop.nn.backbones import describe, load_weights, probe
from metaloop.tasks.episodes import TaskBatch
from metaloop.tasks.source import TaskSource

Predictor = Callable[[torch.Tensor], torch.Tensor]

# algorithm.* keys that act on the built learner (its network's weights and training) rather than
# being hyper-parameters recorded in checkpoints; see MetaLearner.from_config
RECIPE_ACTIONS = ("backbone_weights", "freeze_backbone")


def most_ways(config: Config, learner: str) -> int:
    """The most ways of a training task (``train.max_ways`` or ``train.ways``), which fixes an output
    layer; raises :class:`ConfigError` if ``eval.ways`` asks for more."""
    most = max(config.train.ways, config.train.max_ways or 0)
    if config.eval.ways > most:
        raise ConfigError(
            f"{learner} has a {most}-way output layer (the most ways of a training task), so "
            f"eval.ways must be at most {most}, got {config.eval.ways}"
        )
    return most


class MetaLearner(nn.Module, ABC):
    """Base class of every learner.

    Subclasses implement :meth:`meta_loss` (training) and :meth:`adapt` (prediction);
    :meth:`predict` has a per-task default that batched learners override. Training calls
    :meth:`meta_backward`, which by default is ``meta_loss`` then ``backward()``.
    The constructor arguments a learner needs are recorded in ``self.hparams`` so that a
    checkpoint can rebuild it.

    What a learner declares (class attributes unless noted):

    - ``task_types``: the task types it can learn, ``"classification"`` and/or ``"regression"``;
      the instance's :attr:`task_type` is the one it was built for.
    - :meth:`output_ways`: the number of ways its output layer is built for, or None when it
      takes tasks of any number of ways (instance: :attr:`fixed_ways`).
    - ``adapts_by_gradient``: it adapts to a task by gradient steps (``eval_inner_steps`` of them).
    - ``bf16_safe``: ``train.precision=bf16`` may be used.
    - ``config_keys``: the ``algorithm.*`` keys a recipe may set; :meth:`from_config` builds it.
    - ``backbone_attribute``: the submodule that is its network (``backbone_weights`` load into it).
    """

    name: str = "learner"
    task_types: ClassVar[tuple[str, ...]] = ("classification",)
    adapts_by_gradient: ClassVar[bool] = False
    # Whether train.precision=bf16 may be used: its bfloat16 meta-gradient points the way the float32
    # one does (cosine >= 0.96 on each of several seeded 5-way 1-shot batches, with margin on every CPU
    # kernel measured), checked for every learner in tests/test_amp.py.
    bf16_safe: bool = False
    config_keys: ClassVar[tuple[str, ...]] = ()
    backbone_attribute: ClassVar[str] = "encoder"

    def __init__(self, **hparams: object) -> None:
        super().__init__()
        # a built-in backbone without arguments records none (as checkpoints before backbone_args did)
        self.hparams = {k: v for k, v in hparams.items() if not (k == "backbone_args" and v is None)}
        self.backbone_frozen = False

    # ----- declarations ---------------------------------------------------------------------------
    @property
    def task_type(self) -> str:
        """``"classification"`` or ``"regression"``: what this learner was built for."""
        return self.task_types[0]

    @classmethod
    def output_ways(cls, hparams: dict[str, Any]) -> int | None:
        """The ways of the output layer of a learner with these ``hparams``, or None (any ways)."""
        return None

    @property
    def fixed_ways(self) -> int | None:
        """See :meth:`output_ways`."""
        return type(self).output_ways(self.hparams)

    @property
    def input_channels(self) -> int:
        """Channels of the images it was built for (every learner records ``in_channels``)."""
        return int(self.hparams["in_channels"])

    @property
    def backbone(self) -> nn.Module:
        """The learner's network (its embedding, or the whole network of an optimisation-based learner)."""
        return getattr(self, self.backbone_attribute)

    # ----- building from a recipe -----------------------------------------------------------------
    @classmethod
    def data_hparams(cls, config: Config, tasks: TaskSource) -> dict[str, Any]:
        """Hyper-parameters the data fixes rather than the recipe (default: the image channels)."""
        return {"in_channels": tasks.input_channels()}

    @classmethod
    def from_config(cls, config: Config, tasks: TaskSource) -> MetaLearner:
        """A freshly initialised learner for ``config`` (seeded by ``config.seed``).

        Takes the ``algorithm`` keys that are set (each must be one of ``config_keys``) and
        :meth:`data_hparams`; then loads ``algorithm.backbone_weights`` into the network, freezes it
        if ``algorithm.freeze_backbone``, and checks its output on one input of the data's shape.
        """
        algorithm = config.algorithm
        hparams = {
            k: v
            for k, v in dataclasses.asdict(algorithm).items()
            if k != "name" and k not in RECIPE_ACTIONS and v is not None
        }
        unused = sorted(set(hparams) - set(cls.config_keys))
        if unused:
            raise ConfigError(
                f"algorithm {cls.name!r} takes no {', '.join('algorithm.' + k for k in unused)}; "
                f"its hyper-parameters: {', '.join(cls.config_keys)}"
            )
        if algorithm.freeze_backbone and not algorithm.backbone_weights:
            raise ConfigError(
                "algorithm.freeze_backbone keeps pretrained weights fixed: set algorithm.backbone_weights too"
            )
        hparams.update(cls.data_hparams(config, tasks))
        torch.manual_seed(config.seed)
        learner = cls(**hparams)
        if algorithm.backbone_weights:
            load_weights(learner.backbone, algorithm.backbone_weights)
        if algorithm.freeze_backbone:
            learner.freeze_backbone()
        learner.check_network(tasks.input_shape())
        return learner

    def check_network(self, input_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` (naming the expected and actual shapes) unless the network maps two
        inputs of ``input_shape`` to embeddings ``[2, D]``. Runs in eval mode, changes nothing."""
        out = probe(self.backbone, self.backbone, input_shape)
        if out.dim() != 2:
            raise ValueError(
                f"backbone {describe(self.hparams.get('backbone', self.backbone))} maps inputs "
                f"[2, {', '.join(map(str, input_shape))}] to {list(out.shape)}; {self.name} needs embeddings "
                "[2, D] (flatten the features in the network's forward)"
            )

    # ----- pretrained networks --------------------------------------------------------------------
    def freeze_backbone(self) -> None:
        """Keep the network's (pretrained) weights and batch-norm statistics fixed while meta-training:
        its parameters stop requiring gradients and it stays in eval mode."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> MetaLearner:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    # ----- learning ---------------------------------------------------------------------------------
    def begin_outer_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer before outer step ``step`` (0-based) of ``total_steps``, for learners
        whose meta-loss changes over training (MAML++ anneals its multi-step loss and its derivative
        order); the default ignores it. A custom training loop calls it the same way."""

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
