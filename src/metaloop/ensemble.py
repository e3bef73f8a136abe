"""Ensembles of a run's best-validated models, the test of Antoniou et al.'s MAML++ code.

MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, arXiv:1810.09502) reports
the test accuracy of an ensemble: its code (``evaluated_test_set_using_the_best_models``) keeps the
model of each training epoch, takes the five with the best meta-validation accuracy, runs each on the
same test tasks and averages their output logits before the argmax. ``train.keep_top: K`` keeps a
run's K best-validated models as ``top-STEP.pt`` (:mod:`metaloop.train`); :func:`top_checkpoints`
finds them and :class:`Ensemble` averages their predictions, so ``metaloop eval --checkpoint RUN
--top 5`` is that test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaloop import zoo
from metaloop.algorithms.base import MetaLearner
from metaloop.checkpoint import CheckpointError, load_checkpoint
from metaloop.tasks.episodes import TaskBatch

TOP_PATTERN = "top-*.pt"


def top_file_name(step: int) -> str:
    """The file name of the model validated at outer step ``step`` among a run's kept best ones."""
    return f"top-{step:07d}.pt"


class Ensemble(nn.Module):
    """Several learners answering as one: each adapts to a task on its own, and the ensemble's
    prediction is the mean of theirs (logits ``[T, M, W]`` for classification, as MAML++'s code
    averages logits; predictions ``[T, M, 1]`` for regression).

    Any object with the learners' ``predict(tasks)`` is accepted by :func:`metaloop.evaluate.evaluate`,
    so an ensemble is evaluated like one learner. The members must answer the same tasks: the same
    number of ways (or all regression).
    """

    def __init__(self, learners: Sequence[MetaLearner]) -> None:
        super().__init__()
        if not learners:
            raise ValueError("an ensemble needs at least one learner")
        self.members = nn.ModuleList(learners)

    def predict(self, tasks: TaskBatch) -> torch.Tensor:
        """Mean of the members' ``predict(tasks)``: float ``[T, M, W]`` (``[T, M, 1]`` for regression)."""
        outputs = [member.predict(tasks) for member in self.members]
        shapes = {tuple(output.shape) for output in outputs}
        if len(shapes) > 1:
            raise ValueError(f"the ensemble's members answer in different shapes {sorted(shapes)}")
        return torch.stack(outputs).mean(0)


def top_checkpoints(run_dir: str | Path, k: int) -> list[dict[str, Any]]:
    """The ``k`` checkpoints of ``run_dir``'s ``top-*.pt`` with the best meta-validation scores,
    best first (ties: the earlier step first), as :func:`~metaloop.checkpoint.load_checkpoint` reads them.
    ``run_dir`` may be a zoo model, ``zoo:<name>``, shipped with its ``top-*.pt`` (their sha256 checked).

    Raises :class:`~metaloop.checkpoint.CheckpointError` when ``run_dir`` is not a run folder or holds
    fewer than ``k`` of them (a run trained without ``train.keep_top``, or with a smaller one).
    """
    run_dir = zoo.resolve(run_dir)
    if k < 1:
        raise ValueError(f"an ensemble of the top k models needs k >= 1, got {k}")
    if not run_dir.is_dir():
        raise CheckpointError(
            f"{run_dir} is not a run folder; an ensemble of a run's best-validated models reads the "
            "top-*.pt files of the run folder (trained with train.keep_top)"
        )
    states = [load_checkpoint(path) for path in sorted(run_dir.glob(TOP_PATTERN))]
    if len(states) < k:
        raise CheckpointError(
            f"{run_dir} holds {len(states)} top-*.pt model{'s' * (len(states) != 1)}, fewer than the {k} "
            f"asked for: train with --set train.keep_top={k} (or more) to keep them, or ask for at most "
            f"{len(states)}"
        )
    from metaloop.evaluate import EvalResult  # here: metaloop.evaluate imports this module

    states.sort(key=lambda state: (-EvalResult(**state["val"]).score, state["step"]))
    return states[:k]
