"""Learners behind the common :class:`MetaLearner` interface, by name."""

from __future__ import annotations

from metaloop.algorithms.adml import ADML
from metaloop.algorithms.attention import AttentiveLearner
from metaloop.algorithms.base import MetaLearner
from metaloop.algorithms.baseline import TransferBaseline
from metaloop.algorithms.cavia import CAVIA
from metaloop.algorithms.imaml import IMAML
from metaloop.algorithms.maml import ANIL, FOMAML, MAML, MetaSGD
from metaloop.algorithms.maml_plus_plus import MAMLPlusPlus
from metaloop.algorithms.protonet import ProtoNet
from metaloop.algorithms.reptile import Reptile
from metaloop.algorithms.siamese import Siamese

LEARNERS: dict[str, type[MetaLearner]] = {
    learner.name: learner
    for learner in (
        ProtoNet,
        MAML,
        MAMLPlusPlus,
        FOMAML,
        MetaSGD,
        ANIL,
        Reptile,
        CAVIA,
        TransferBaseline,
        Siamese,
        ADML,
        AttentiveLearner,
        IMAML,
    )
}


def build_learner(name: str, **hparams: object) -> MetaLearner:
    """Instantiate the learner registered as ``name`` with ``hparams``."""
    if name not in LEARNERS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(sorted(LEARNERS))}")
    return LEARNERS[name](**hparams)


__all__ = [
    "ADML",
    "ANIL",
    "AttentiveLearner",
    "CAVIA",
    "FOMAML",
    "IMAML",
    "LEARNERS",
    "MAML",
    "MAMLPlusPlus",
    "MetaLearner",
    "MetaSGD",
    "ProtoNet",
    "Reptile",
    "Siamese",
    "TransferBaseline",
    "build_learner",
]
