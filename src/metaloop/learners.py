"""Learners from recipes and from checkpoints (the layer above :mod:`metaloop.algorithms`, below the
trainer: evaluating or predicting with a saved model never imports the trainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaloop.algorithms import LEARNERS, build_learner
from metaloop.algorithms.base import MetaLearner
from metaloop.checkpoint import CheckpointError, save_checkpoint
from metaloop.config import Config, ConfigError
from metaloop.nn.backbones import BackboneError
from metaloop.tasks.source import TaskSource


def learner_class(name: str) -> type[MetaLearner]:
    """The learner registered as ``name`` (``algorithm.name``); :class:`ConfigError` if none is."""
    if name not in LEARNERS:
        raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(sorted(LEARNERS))}")
    return LEARNERS[name]


def learner_from_config(config: Config, tasks: TaskSource) -> MetaLearner:
    """A freshly initialised learner for ``config``; see :meth:`MetaLearner.from_config`."""
    return learner_class(config.algorithm.name).from_config(config, tasks)


def learner_from_checkpoint(state: dict[str, Any]) -> MetaLearner:
    """Rebuild the learner a checkpoint was saved from (its class, hyper-parameters and network
    recipe: built-in name or import path and arguments), with its weights."""
    try:
        learner = build_learner(state["algorithm"], **state["hparams"])
    except BackboneError as error:
        raise CheckpointError(
            f"cannot rebuild this {state['algorithm']} checkpoint's network: {error}"
        ) from error
    try:
        learner.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint weights do not fit a {state['algorithm']} learner: {error}"
        ) from error
    return learner


def learner_checkpoint(learner: MetaLearner, config: Config, **extra: Any) -> dict[str, Any]:
    """What a checkpoint holds to rebuild ``learner`` (:func:`learner_from_checkpoint`), and ``extra``."""
    return {
        "algorithm": learner.name,
        "hparams": learner.hparams,
        "config": config.to_dict(),
        "model": learner.state_dict(),
        **extra,
    }


def export_learner(config: Config, path: str | Path) -> MetaLearner:
    """Build the learner of ``config`` without meta-training it (e.g. ProtoNet over a pretrained
    ``algorithm.backbone_weights``) and write it to ``path`` as a checkpoint that ``metaloop eval``,
    ``metaloop predict`` and :class:`metaloop.predict.FewShotPredictor` take like a trained one."""
    learner = learner_from_config(config, TaskSource(config))
    save_checkpoint(path, learner_checkpoint(learner, config, step=0, val=None))
    return learner
