"""``metaloop compare``: several learners tested on the same seeded episodes, with paired differences.

A comparison is fair when every learner meets the same tasks. Every (ways, shots) cell draws its
episodes from a fresh :class:`~metaloop.tasks.episodes.EpisodeSampler` with one seed over one test
set, so episode i of one learner is episode i of every other. The test set is each run's own (its
config's dataset, test split and image size); runs whose test sets hold different images are refused.

Because the episodes are shared, the difference between two learners is measured per episode: its
95% CI comes from the spread of the per-episode differences (:func:`paired_difference`), which
cancels the variation between easy and hard episodes that two separate intervals both carry.

Learners with a fixed output layer (those whose ``output_ways`` is a number: MAML, FOMAML,
Meta-SGD, ANIL, Reptile, CAVIA, ADML, attention) are tested at their own number of ways only,
and are n/a elsewhere. A label joins runs into one learner
(``maml=runs/maml_5w maml=runs/maml_20w``): one row of the tables, each cell tested with the
member built for its number of ways.

:func:`compare` trains (recipes under ``--train``, one budget for all) and evaluates;
:func:`metaloop.comparison_report.write_comparison_report` writes ``comparison.json``,
``comparison.md`` and the plots.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaloop import distributed
from metaloop.checkpoint import load_checkpoint
from metaloop.config import Config
from metaloop.contenders import (
    Contender,
    contenders,
    run_record,
    train_contender,
    training_cost,
    validation_steadiness,
)
from metaloop.data.base import ClassImages
from metaloop.data.transform import check_same_input, checkpoint_transform
from metaloop.device import saved_device_or_cpu
from metaloop.evaluate import confidence_interval, episode_metrics
from metaloop.learners import learner_class, learner_from_checkpoint
from metaloop.tasks.episodes import EpisodeSampler
from metaloop.tasks.source import TaskSource


@dataclass(frozen=True)
class Cell:
    """One episode shape of the comparison: ``ways``-way ``shots``-shot, ``queries`` per class."""

    ways: int
    shots: int
    queries: int

    @property
    def label(self) -> str:
        return f"{self.ways}-way {self.shots}-shot"


# ----- the shared test episodes -------------------------------------------------------------------
def describe_test_data(config: Config) -> str:
    """``"omniglot/test, 28x28 images, seed 0"`` (with ``of ROOT`` for an image folder)."""
    data = config.data
    root = f" of {data.root}" if data.root else ""
    return (
        f"{data.name}/{data.test_split}{root}, {data.image_size}x{data.image_size} images, seed {config.seed}"
    )


def fingerprint(dataset: ClassImages) -> str:
    """sha256 of a dataset's images ``[N, C, H, W]`` and class offsets ``[K + 1]``: equal fingerprints
    give equal episodes for equal sampler settings."""
    digest = hashlib.sha256(str(tuple(dataset.images.shape)).encode())
    digest.update(dataset.offsets.numpy().tobytes())
    digest.update(dataset.images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def shared_test_source(found: Sequence[Contender]) -> TaskSource:
    """The test data of the first contender, after checking every contender's test split holds the
    same images (so the episodes are the same for all); raises ``ValueError`` otherwise.

    Each distinct data setting is loaded once. Settings may differ and still agree (Omniglot ignores
    the config seed; glyphs and image folders use it to make or split the data).
    """
    sources: dict[str, TaskSource] = {}  # by data setting
    prints: dict[str, str] = {}
    first = found[0]
    for c in found:
        d = c.config.data
        key = json.dumps([d.name, d.root, d.data_dir, d.image_size, d.test_split, c.config.seed])
        if key not in sources:
            sources[key] = TaskSource(c.config)
            prints[key] = fingerprint(sources[key].dataset(d.test_split))
        if prints[key] != next(iter(prints.values())):
            raise ValueError(
                f"cannot compare {first.name} and {c.name}: their test episodes would differ, because "
                f"{first.name} is tested on {describe_test_data(first.config)} and {c.name} on "
                f"{describe_test_data(c.config)}, which hold different images. Compare runs trained on one "
                "dataset, test split and image size (for glyphs and image folders also one config seed, "
                "which makes or splits the data)"
            )
    return next(iter(sources.values()))


def plan_cells(dataset: ClassImages, ways: Sequence[int], shots: Sequence[int], queries: int) -> list[Cell]:
    """Every (ways, shots) cell, ways-major, both ascending; impossible shapes raise ``ValueError``.

    A cell's queries per class are ``queries``, cut to what the smallest test class has left after
    ``shots`` (Omniglot classes hold 20 images, so 10-shot cells get at most 10 queries).
    """
    smallest = int(dataset.class_sizes.min())
    cells = []
    for w in sorted(set(ways)):
        for s in sorted(set(shots)):
            q = min(queries, smallest - s)
            if q < 1:
                raise ValueError(
                    f"{s}-shot episodes leave no query images: the smallest class of {dataset.name} holds "
                    f"{smallest}; use --shots at most {smallest - 1}"
                )
            EpisodeSampler(dataset, w, s, q)  # its checks name any other impossible shape
            cells.append(Cell(w, s, q))
    return cells


def fixed_ways(state: dict[str, Any]) -> int | None:
    """The number of ways the output layer of a checkpoint's learner is built for, or None when it
    takes any (as the learner declares, :meth:`metaloop.algorithms.base.MetaLearner.output_ways`)."""
    return learner_class(state["algorithm"]).output_ways(state["hparams"])


def check_labels(found: Sequence[Contender], cells: Sequence[Cell]) -> None:
    """Raise ``ValueError`` when two runs of one label would both be tested in a cell (a label joins
    runs whose output layers are built for different numbers of ways)."""
    by_label: dict[str, list[Contender]] = {}
    for c in found:
        by_label.setdefault(c.label, []).append(c)
    for label, members in by_label.items():
        if len(members) < 2:
            continue
        claimed: dict[Cell, str] = {}
        for c in members:
            ways = fixed_ways(load_checkpoint(c.run_dir / "best.pt"))
            for cell in cells:
                if ways is not None and cell.ways != ways:
                    continue
                if cell in claimed:
                    raise ValueError(
                        f"{claimed[cell]} and {c.name} are both labelled {label!r} and would both be tested "
                        f"at {cell.label}: a label joins runs built for different numbers of ways "
                        "(e.g. maml=runs/maml_omniglot_5w1s maml=runs/maml_omniglot_20w1s)"
                    )
                claimed[cell] = c.name


# ----- statistics ----------------------------------------------------------------------------------
def summary(values: torch.Tensor) -> dict[str, float | int]:
    """``mean``, ``ci95`` (1.96·std/√n), ``std`` (ddof=1) and ``episodes`` of float ``[n]`` values."""
    mean, ci95, std = confidence_interval(values)
    return {"mean": mean, "ci95": ci95, "std": std, "episodes": values.numel()}


def paired_difference(values: torch.Tensor, reference: torch.Tensor) -> dict[str, float | bool]:
    """Mean ± 95% CI of ``values - reference``, both float ``[n]`` measured on the same n episodes.

    The mean difference equals the difference of the means; its CI is 1.96·std/√n of the n
    per-episode differences (ddof=1). ``significant``: the CI excludes 0.
    """
    if values.shape != reference.shape or values.dim() != 1:
        raise ValueError(
            f"paired values must be two [n] tensors of the same episodes, got {tuple(values.shape)} "
            f"and {tuple(reference.shape)}"
        )
    mean, ci95, std = confidence_interval(values.double() - reference.double())
    return {"mean": mean, "ci95": ci95, "std": std, "significant": abs(mean) > ci95}


# ----- the comparison ------------------------------------------------------------------------------
def episode_values(
    c: Contender,
    source: TaskSource,
    cells: Sequence[Cell],
    episodes: int,
    seed: int,
    device: torch.device,
    progress: bool,
) -> tuple[dict[str, Any], dict[Cell, torch.Tensor]]:
    """Load ``c``'s ``best.pt`` and test it in every cell its output layer allows.

    Returns its JSON description and ``{cell: accuracies float [episodes]}``; cell by cell the
    episodes come from a fresh sampler seeded with ``seed``, the same for every contender.
    """
    best = load_checkpoint(c.run_dir / "best.pt")
    test_data = source.dataset(source.config.data.test_split).transform
    check_same_input(checkpoint_transform(best), test_data, c.name)
    learner = learner_from_checkpoint(best).to(device)
    own_ways = learner.fixed_ways
    values = {}
    for cell in cells:
        if own_ways is not None and cell.ways != own_ways:
            continue
        if progress:
            print(f"{c.name}: {cell.label}, {cell.queries} queries", file=sys.stderr)
        sampler = source.sampler(source.config.data.test_split, cell.ways, cell.shots, cell.queries, seed)
        batch_size = c.config.eval.batch_size
        values[cell] = episode_metrics(learner, sampler, episodes, batch_size, device, progress)
    described = {
        "name": c.name,
        "label": c.label,
        "algorithm": best["algorithm"],
        "source": c.source,
        "run_dir": run_record(c),
        "trained_here": c.train,
        "fixed_ways": own_ways,
        "best_step": best["step"],
        "hparams": best["hparams"],
        "training": training_cost(c.run_dir),
        "validation": validation_steadiness(c.run_dir),
    }
    return described, values


def compare(
    arguments: Sequence[str],
    out_dir: str | Path,
    ways: Sequence[int] = (5, 20),
    shots: Sequence[int] = (1, 2, 5, 10),
    queries: int = 15,
    episodes: int = 1000,
    seed: int = 1234,
    train_overrides: list[str] | None = None,
    reference: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (recipes, when ``train_overrides`` is given) and test every learner; the comparison as
    JSON-ready dicts (see ``comparison.json`` in the README).

    Args:
        arguments: run folders (holding ``best.pt``) and recipe YAMLs.
        out_dir: where recipes are trained (``out_dir/runs/<name>``).
        ways, shots: the cells; queries per class: ``queries``, cut where the test classes are small
            (:func:`plan_cells`).
        episodes, seed: test episodes per cell and their sampler seed.
        train_overrides: ``["train.steps=N", "train.max_minutes=M"]``, the budget every recipe is
            trained with; None: recipes must already have a finished run at their ``run_dir``.
        reference: the label paired differences are taken against (default: the first learner's).
        device: where to evaluate (default: the first run's ``device`` setting, or the CPU where this
            machine lacks that GPU).
    """
    if episodes < 2:
        raise ValueError(f"a confidence interval needs at least 2 episodes, got --episodes {episodes}")
    if queries < 1:
        raise ValueError(f"--queries must be at least 1, got {queries}")
    found = contenders(arguments, Path(out_dir), train_overrides)
    labels = list(dict.fromkeys(c.label for c in found))
    reference = labels[0] if reference is None else reference
    if reference not in labels:
        raise ValueError(f"--reference {reference!r} is none of the learners compared: {', '.join(labels)}")
    source = shared_test_source(found)
    cells = plan_cells(source.dataset(source.config.data.test_split), ways, shots, queries)
    for c in found:
        if c.train:
            train_contender(c, progress)
    check_labels(found, cells)
    evaluation_device = distributed.local_device(device or saved_device_or_cpu(found[0].config.device))
    learners, values = [], {label: {} for label in labels}
    for c in found:
        described, by_cell = episode_values(c, source, cells, episodes, seed, evaluation_device, progress)
        values[c.label].update(by_cell)
        learners.append(described)
    notes = [
        f"{d['name']} has a fixed {d['fixed_ways']}-way output layer: tested at {d['fixed_ways']}-way only"
        for d in learners
        if d["fixed_ways"] is not None
    ]
    notes += [
        f"{s}-shot episodes have {q} queries per class, not {queries}: the smallest test class holds "
        f"{s + q} images"
        for s, q in sorted({(cell.shots, cell.queries) for cell in cells if cell.queries < queries})
    ]
    return {
        "settings": {
            "test_data": describe_test_data(source.config),
            "episodes": episodes,
            "seed": seed,
            "ways": sorted(set(ways)),
            "shots": sorted(set(shots)),
            "queries": queries,
            "reference": reference,
            "budget": train_overrides,
        },
        "learners": learners,
        "cells": [cell_record(cell, values, reference) for cell in cells],
        "notes": notes,
    }


def cell_record(cell: Cell, values: dict[str, dict[Cell, torch.Tensor]], reference: str) -> dict[str, Any]:
    """One cell of ``comparison.json``: accuracy of every learner (None where n/a) and its paired
    difference against ``reference`` (None where either is n/a)."""
    ref = values[reference].get(cell)
    accuracy, difference = {}, {}
    for name, by_cell in values.items():
        mine = by_cell.get(cell)
        accuracy[name] = None if mine is None else summary(mine)
        if name != reference:
            difference[name] = None if mine is None or ref is None else paired_difference(mine, ref)
    return {
        "ways": cell.ways,
        "shots": cell.shots,
        "queries": cell.queries,
        "accuracy": accuracy,
        "difference": difference,
    }
