"""Learners behind the common :class:`MetaLearner` interface, by name."""

from __future__ import annotations

from metaloop.algorithms.base import MetaLearner
from metaloop.algorithms.protonet import ProtoNet

LEARNERS: dict[str, type[MetaLearner]] = {ProtoNet.name: ProtoNet}


def build_learner(name: str, **hparams: object) -> MetaLearner:
    """Instantiate the learner registered as ``name`` with ``hparams``."""
    if name not in LEARNERS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(sorted(LEARNERS))}")
    return LEARNERS[name](**hparams)


__all__ = ["LEARNERS", "MetaLearner", "ProtoNet", "build_learner"]
