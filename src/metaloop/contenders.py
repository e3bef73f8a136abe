"""The learners of a ``metaloop compare``: each command-line argument (a run folder, a zoo model or a
recipe, optionally ``LABEL=``) as a :class:`Contender`, training the recipes under the comparison's
budget, and what each run cost and how steady its meta-validation was (the comparison records both).
:mod:`metaloop.compare` tests them on shared episodes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaloop import zoo
from metaloop.checkpoint import load_checkpoint
from metaloop.config import Config, config_from_dict, flat_settings, load_config

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
