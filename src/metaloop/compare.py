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

from metaloop import distributed, zoo
from metaloop.checkpoint import load_checkpoint
from metaloop.config import Config, config_from_dict, flat_settings, load_config
from metaloop.data.base import ClassImages
from metaloop.data.transform import check_same_input, checkpoint_transform
from metaloop.device import saved_device_or_cpu
from metaloop.evaluate import confidence_interval, episode_metrics
from metaloop.learners import learner_class, learner_from_checkpoint
from metaloop.tasks.episodes import EpisodeSampler
from metaloop.tasks.source import TaskSource

RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass
class Contender:
    """One learner of a comparison.

    Attributes:
        name: the run folder's name or the recipe's file name without ``.yaml``; unique.
        source: the command-line argument it came from.
        run_dir: the run folder that holds (for a recipe still to train: will hold) its ``best.pt``.
        config: the run's configuration (from its ``best.pt``; for a recipe to train: the recipe with
            the comparison's budget and ``run_dir`` applied).
        train: whether this comparison trains it (a recipe under ``--train``).
        label: the learner (table row) it is tested as: ``LABEL`` of a ``LABEL=RUN_OR_RECIPE``
            argument, else ``name``. Runs sharing a label fill different cells of one row.
    """

    name: str
    source: str
    run_dir: Path
    config: Config
    train: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name


@dataclass(frozen=True)
class Cell:
    """One episode shape of the comparison: ``ways``-way ``shots``-shot, ``queries`` per class."""

    ways: int
    shots: int
    queries: int

    @property
    def label(self) -> str:
        return f"{self.ways}-way {self.shots}-shot"


# ----- what is compared ----------------------------------------------------------------------------
def run_config(run_dir: Path) -> Config:
    """The configuration of the run in ``run_dir``, read from its ``best.pt``."""
    if not (run_dir / "best.pt").is_file():
        raise FileNotFoundError(
            f"run folder {run_dir} holds no best.pt (no meta-validation finished yet); continue it with "
            f"'metaloop train --resume {run_dir}', or leave it out of the comparison"
        )
    return config_from_dict(load_checkpoint(run_dir / "best.pt")["config"])


def recipe_contender(path: Path, out_dir: Path, train_overrides: list[str] | None) -> Contender:
    """A recipe: trained into ``out_dir/runs/<name>`` when ``train_overrides`` (the budget) is given,
    else the finished run at the recipe's ``run_dir``."""
    name = path.stem
    if train_overrides is not None:
        run_dir = out_dir / "runs" / name
        config = load_config(path, [*train_overrides, f"run_dir={run_dir}"])
        return Contender(name, str(path), run_dir, config, train=True)
    recipe = load_config(path)
    run_dir = Path(recipe.run_dir)
    if not (run_dir / "best.pt").is_file():
        raise FileNotFoundError(
            f"recipe {path} has no trained run at its run_dir {run_dir} (no best.pt): add --train "
            "(with --steps N and/or --minutes M) to train every recipe under one budget, or train it "
            f"first with 'metaloop train --config {path}'"
        )
    config = run_config(run_dir)
    if config.algorithm.name != recipe.algorithm.name:
        raise ValueError(
            f"{run_dir} holds a {config.algorithm.name} run but recipe {path} trains "
            f"{recipe.algorithm.name}; pass the run folder itself, or use --train"
        )
    return Contender(name, str(path), run_dir, config)


def split_label(argument: str) -> tuple[str, str]:
    """``"maml=runs/maml_5w"`` -> ``("maml", "runs/maml_5w")``; ``("", argument)`` for an argument
    without ``=`` or one that names an existing path."""
    if "=" not in argument or Path(argument).exists():
        return "", argument
    label, _, path = argument.partition("=")
    if not label or not path:
        raise ValueError(
            f"{argument!r}: a labelled learner is LABEL=RUN_OR_RECIPE with both parts given "
            "(e.g. maml=runs/maml_omniglot_20w1s)"
        )
    return label, path


def contender(argument: str, out_dir: Path, train_overrides: list[str] | None) -> Contender:
    """The learner named by ``argument``: a run folder holding ``best.pt``, a zoo model (``zoo:<name>``)
    or a recipe YAML, each optionally as ``LABEL=PATH``."""
    label, given = split_label(argument)
    path = zoo.resolve(given)
    if path.is_dir():
        found = Contender(path.name, argument, path, run_config(path))
    elif path.is_file() and path.suffix in RECIPE_SUFFIXES:
        found = recipe_contender(path, out_dir, train_overrides)
        found.source = argument
    elif path.exists():
        raise ValueError(f"{given} is neither a run folder nor a recipe (.yaml): give one of those")
    else:
        raise FileNotFoundError(
            f"{given} does not exist; give run folders (holding best.pt) or recipes (configs/*.yaml)"
        )
    if label:
        found.label = label
    return found


def contenders(arguments: Sequence[str], out_dir: Path, train_overrides: list[str] | None) -> list[Contender]:
    """One :class:`Contender` per argument; names must be unique and runs must be classification."""
    found = [contender(argument, out_dir, train_overrides) for argument in arguments]
    by_name: dict[str, Contender] = {}
    for c in found:
        if c.name in by_name:
            twin = by_name[c.name]
            same = twin.run_dir.resolve() == c.run_dir.resolve()
            raise ValueError(
                f"{twin.source} and {c.source} are both named {c.name!r} (names come from the run folder "
                "or the recipe file): "
                + (f"both are the run in {c.run_dir}, give it once" if same else "rename one of them")
            )
        by_name[c.name] = c
        if c.config.data.name == "sinusoid":
            raise ValueError(
                f"{c.source} is a sinusoid regression run; compare tests classifiers on image episodes. "
                "Evaluate regression runs with 'metaloop eval --checkpoint RUN --inner-steps N'"
            )
    return found


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


# ----- training ------------------------------------------------------------------------------------
def train_contender(c: Contender, progress: bool) -> None:
    """Train a recipe into ``c.run_dir``. A finished run of the same configuration there is kept (so a
    second comparison reuses it), an interrupted one is resumed; any other run there is an error."""
    from metaloop.train import config_of_run, run  # the trainer only where a comparison trains

    if not (c.run_dir / "last.pt").is_file():
        run(c.config, progress=progress)
        return
    there, wanted = flat_settings(config_of_run(c.run_dir).to_dict()), flat_settings(c.config.to_dict())
    differ = sorted(
        k for k in wanted.keys() | there.keys() if k != "device" and there.get(k) != wanted.get(k)
    )
    if differ:
        changes = ", ".join(f"{k}: {there.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
        raise FileExistsError(
            f"{c.run_dir} holds a run of another configuration ({changes}); choose another --out or "
            f"delete {c.run_dir}"
        )
    if not (c.run_dir / "result.json").is_file():
        run(c.config, resume=True, progress=progress)


def run_record(c: Contender) -> str:
    """Where ``c``'s run is, as the comparison records it: ``zoo:<name>`` for a zoo model (the same
    on every installation, so two machines write the same files), else the run folder."""
    _, given = split_label(c.source)
    return f"{zoo.PREFIX}{c.name}" if zoo.is_zoo(given) else str(c.run_dir)


def training_cost(run_dir: Path) -> dict[str, Any]:
    """``steps``, ``train_seconds`` (outer steps only), ``wall_seconds`` (validation and checkpoints
    included; None in runs older than that key) and ``source``: from ``result.json``, or from
    ``last.pt`` for a run that has not finished."""
    keys = ("steps", "train_seconds", "wall_seconds")
    if (run_dir / "result.json").is_file():
        result = json.loads((run_dir / "result.json").read_text())
        return {**{k: result.get(k) for k in keys}, "source": "result.json"}
    if (run_dir / "last.pt").is_file():
        state = load_checkpoint(run_dir / "last.pt")["run_state"]
        return {"steps": state["step"], **{k: state.get(k) for k in keys[1:]}, "source": "last.pt"}
    return {**dict.fromkeys(keys), "source": None}


def validation_steadiness(run_dir: Path) -> dict[str, Any]:
    """How steady a run's meta-validation accuracy was, in accuracy points (from ``metrics.jsonl``):

    - ``validations``: how many validations it logged (None without a log);
    - ``change_sd``: the standard deviation (ddof=1) of the change from one validation to the next;
    - ``late_change_sd``: the same over the second half of the run, the validations at steps above
      half the last validated step, where a fast early rise no longer counts as unsteadiness.

    Each sd is None with fewer than three validations in its range (or no log: e.g. a zoo model)."""
    from metaloop.report import read_metrics  # matplotlib: only when a comparison is made

    if not (run_dir / "metrics.jsonl").is_file():
        return dict.fromkeys(("validations", "change_sd", "late_change_sd"))
    _, val = read_metrics(run_dir)
    points = [(int(r["step"]), 100 * float(r["val_accuracy"])) for r in val if "val_accuracy" in r]

    def change_sd(scores: list[float]) -> float | None:
        changes = torch.tensor(scores, dtype=torch.float64).diff()
        return float(changes.std()) if changes.numel() >= 2 else None

    half = points[-1][0] / 2 if points else 0
    return {
        "validations": len(points),
        "change_sd": change_sd([score for _, score in points]),
        "late_change_sd": change_sd([score for step, score in points if step > half]),
    }


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
