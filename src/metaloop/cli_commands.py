"""What each ``metaloop`` command does, given its parsed arguments (:mod:`metaloop.cli` defines the
arguments and dispatches to these). Each returns the process exit code; a mistake in the input raises
``ConfigError`` (or another error :mod:`metaloop.cli_errors` reports as one line)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from metaloop import distributed
from metaloop.checkpoint import load_checkpoint
from metaloop.cli_errors import check_data_dir, check_settings
from metaloop.config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from metaloop.device import check_device, saved_device_or_cpu
from metaloop.recipebook import all_recipes, recipe_path


def train_command(args: argparse.Namespace) -> int:
    from metaloop.train import config_of_run, run

    overrides = list(args.set)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.config and args.recipe:
        raise ConfigError("give --recipe NAME (a shipped recipe) or --config FILE (any YAML), not both")
    if args.resume:
        if args.config or args.recipe:
            raise ConfigError(
                "--resume continues a run with its config; drop --config and --recipe (--set changes keys)"
            )
        base = config_of_run(args.resume).to_dict()
        base["run_dir"] = str(args.resume)
        config = config_from_dict(apply_overrides(base, overrides))
    else:
        config = load_config(recipe_path(args.recipe) if args.recipe else args.config, overrides)
    check_settings(config)
    result = run(config, resume=bool(args.resume), progress=not args.no_progress)  # logs "run folder: ..."
    if distributed.is_main():
        print(f"{config.algorithm.name} on {config.data.name}/{config.data.test_split}: {result}")
        _draw_learning_curve(Path(config.run_dir))
    return 0


def _draw_learning_curve(run_dir: Path) -> None:
    """The run's learning curve (``metaloop.report.draw_learning_curve``, which never raises).
    Imported here: matplotlib takes a second to load, which eval, predict and the other torchrun
    ranks need not pay."""
    try:
        from metaloop.report import draw_learning_curve
    except ImportError as error:
        print(f"warning: learning curve not drawn: matplotlib is not usable ({error})", file=sys.stderr)
        return
    draw_learning_curve(run_dir)


def eval_command(args: argparse.Namespace) -> int:
    from metaloop.ensemble import Ensemble
    from metaloop.evaluate import test_learner
    from metaloop.learners import learner_class, learner_from_checkpoint

    if args.ways is not None and args.ways < 2:
        raise ConfigError(
            f"--ways must be at least 2 (a task with one class is always right), got {args.ways}"
        )
    if args.device:
        check_device(args.device)  # before reading a checkpoint
    members = _checkpoints_to_evaluate(args)
    state = members[0]
    overrides = [
        f"eval.{k}={v}"
        for k in ("ways", "shots", "queries", "episodes", "seed", "batch_size")
        if (v := getattr(args, k)) is not None
    ]
    if args.split:
        overrides.append(f"data.test_split={args.split}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    overrides.append(f"device={args.device or saved_device_or_cpu(state['config'].get('device', 'auto'))}")
    config = config_from_dict(apply_overrides(state["config"], overrides))
    check_settings(config)
    adapts_by_gradient = learner_class(state["algorithm"]).adapts_by_gradient
    if args.inner_steps is not None:
        if not adapts_by_gradient:
            raise ConfigError(f"--inner-steps applies to gradient-based learners, not {state['algorithm']}")
        for member in members:
            member["hparams"]["eval_inner_steps"] = args.inner_steps
    _check_test_input(state, config)
    if args.attack is not None:
        return _eval_attack(args, state, config)
    if args.epsilon is not None or args.attack_steps is not None:
        raise ConfigError("--epsilon and --attack-steps set up an attack: add --attack fgsm or --attack pgd")
    with distributed.process_group(config.device, config.dist_timeout_s):  # torchrun: shard the episodes
        device = distributed.local_device(config.device)
        learners = [learner_from_checkpoint(member).to(device) for member in members]
        model = learners[0] if args.top is None else Ensemble(learners)
        result = test_learner(config, model, progress=not args.no_progress)
    if not distributed.is_main():
        return 0
    steps = state["hparams"]["eval_inner_steps"] if adapts_by_gradient else None
    after = f" after {steps} inner step{'s' * (steps != 1)}" if steps is not None else ""
    which = ""
    if args.top is not None:
        kept = ", ".join(str(member["step"]) for member in members)
        which = (
            f", the mean logits of its {len(members)} best-validated models (steps {kept})"
            if len(members) > 1
            else f", its best-validated model (step {kept})"
        )
    print(f"{state['algorithm']} on {config.data.name}/{config.data.test_split}{after}{which}: {result}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _checkpoints_to_evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``eval``'s checkpoint, or with ``--top K`` the K best-validated models of the run folder."""
    from metaloop.ensemble import top_checkpoints

    if args.top is None:
        return [load_checkpoint(args.checkpoint)]
    if args.top < 1:
        raise ConfigError(f"--top K tests an ensemble of a run's K best-validated models; got K = {args.top}")
    if args.attack is not None:
        raise ConfigError("--attack attacks one model; --top evaluates an ensemble: give one or the other")
    return top_checkpoints(args.checkpoint, args.top)


def _check_test_input(state: dict[str, Any], config: Config) -> None:
    """The test images must be converted as the model's training images were (its recorded transform)."""
    from metaloop.data.transform import check_same_input, checkpoint_transform, dataset_transform

    if config.data.name == "sinusoid":
        return
    channels = int(state["hparams"].get("in_channels", 1))
    data = dataset_transform(config.data.name, config.data.image_size, channels, config.data.resize)
    check_same_input(checkpoint_transform(state), data, f"this {state['algorithm']} model")


def _eval_attack(args: argparse.Namespace, state: dict[str, Any], config: Config) -> int:
    """``eval --attack``: clean and adversarial accuracy ± 95% CI over the same test episodes."""
    from metaloop.attacks import check_attack
    from metaloop.learners import learner_from_checkpoint
    from metaloop.robustness import evaluate_under_attack
    from metaloop.tasks.source import TaskSource

    if args.epsilon is None:
        raise ConfigError(
            f"--attack {args.attack} needs --epsilon, the L-infinity radius in (0, 1], e.g. --epsilon 0.1"
        )
    if args.attack_steps is not None and args.attack != "pgd":
        raise ConfigError(f"--attack-steps sets the steps of --attack pgd; {args.attack} takes one step")
    steps = 10 if args.attack_steps is None else args.attack_steps
    check_attack(args.attack, args.epsilon, steps)
    if config.data.name == "sinusoid":
        raise ConfigError("--attack applies to image classification; this run is sinusoid regression")
    ev, split = config.eval, config.data.test_split
    with distributed.process_group(config.device, config.dist_timeout_s):  # torchrun: shard the episodes
        device = distributed.local_device(config.device)
        learner = learner_from_checkpoint(state).to(device)
        sampler = TaskSource(config).sampler(split, ev.ways, ev.shots, ev.queries, seed=ev.seed)
        clean, adversarial = evaluate_under_attack(
            learner,
            sampler,
            args.attack,
            args.epsilon,
            steps,
            ev.episodes,
            ev.batch_size,
            device,
            progress=not args.no_progress,
            seed=ev.seed,
        )
    if not distributed.is_main():
        return 0
    attack = {"name": args.attack, "epsilon": args.epsilon, "steps": steps if args.attack == "pgd" else 1}
    where = f"{state['algorithm']} on {config.data.name}/{config.data.test_split}"
    pgd_steps = f", {steps} steps" if args.attack == "pgd" else ""
    print(f"{where}, clean queries: {clean}")
    print(f"{where}, {args.attack} (ε = {args.epsilon}{pgd_steps}): {adversarial}")
    if args.json:
        record = {"attack": attack, "clean": clean.to_dict(), "adversarial": adversarial.to_dict()}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from metaloop.compare import compare
    from metaloop.comparison_report import labels, write_comparison_report

    if args.device:
        check_device(args.device)
    budget = [f"train.steps={args.steps}"] if args.steps is not None else []
    if args.minutes is not None:
        budget.append(f"train.max_minutes={args.minutes}")
    if args.train and not budget:
        raise ConfigError(
            "--train trains every recipe under one budget: give --steps N (train.steps) and/or --minutes M "
            "(train.max_minutes, a wall-clock limit)"
        )
    if budget and not args.train:
        raise ConfigError("--steps and --minutes are the training budget of --train: add --train")
    comparison = compare(
        args.learners,
        args.out,
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        episodes=args.episodes,
        seed=args.seed,
        train_overrides=budget if args.train else None,
        reference=args.reference,
        device=args.device,
        progress=not args.no_progress,
    )
    json_path, markdown_path = write_comparison_report(comparison, args.out)
    print(f"{len(labels(comparison))} learners compared: {markdown_path}, {json_path}")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from metaloop.predict import (
        FewShotPredictor,
        InputStatisticsWarning,
        predictions_csv,
        write_predictions_csv,
    )

    check_device(args.device)
    model = FewShotPredictor.from_run(args.checkpoint, invert=args.invert, device=args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputStatisticsWarning)  # printed as one line below
        model.fit_support(args.support)
    if model.support_warning is not None:
        print(f"metaloop predict: warning: {model.support_warning}", file=sys.stderr)
    predictions = model.predict(args.query)
    if args.out:
        write_predictions_csv(predictions, model.class_names, args.out)
        print(
            f"{len(predictions)} queries, {len(model.class_names)} classes: predictions in {args.out}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(predictions_csv(predictions, model.class_names))
    return 0


def export_command(args: argparse.Namespace) -> int:
    from metaloop.learners import export_learner

    config = load_config(args.config, list(args.set))
    if Path(args.out).exists():
        raise FileExistsError(f"{args.out} already exists; choose another --out or delete it")
    learner = export_learner(config, args.out)
    print(f"{learner.name} over a {type(learner.backbone).__name__}, not meta-trained: {args.out}")
    return 0


def data_command(args: argparse.Namespace) -> int:
    from metaloop.data import DATASETS
    from metaloop.data.base import default_data_dir
    from metaloop.data.miniimagenet import miniimagenet_status
    from metaloop.data.omniglot import prepare_omniglot, verify_omniglot

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if args.action == "list":
        if args.name is not None:
            raise ConfigError(f"'data list' lists every dataset and takes no name, got {args.name!r}")
        print(f"data folder: {data_dir}")
        for name in DATASETS:
            present = {"omniglot": (data_dir / "omniglot" / "images_background.zip").is_file()}.get(name)
            status = {True: "present", False: "absent (metaloop data prepare omniglot)", None: "built in"}[
                present
            ]
            if name == "miniimagenet":
                status = miniimagenet_status(data_dir)
            print(f"  {name:12s} {status}")
        print(f"  {'sinusoid':12s} built in (regression tasks)")
        return 0
    if args.action == "verify":
        check_data_dir(data_dir)
    if (args.name or "omniglot") != "omniglot":
        raise ConfigError(
            f"'{args.action}' applies to omniglot only (glyphs are generated, folders are yours)"
        )
    if args.action == "prepare":
        print(f"omniglot ready in {prepare_omniglot(data_dir, download=not args.no_download)}")
    else:
        for line in verify_omniglot(data_dir):
            print(line)
    return 0


def recipes_command(args: argparse.Namespace) -> int:
    recipes = all_recipes()
    name_width = max(len(recipe.name) for recipe in recipes)
    for recipe in recipes:
        print(recipe.line(name_width) + (f"  {recipe.path}" if args.paths else ""))
    return 0


def zoo_command(args: argparse.Namespace) -> int:
    from metaloop import zoo

    names = zoo.names()
    for name, line in zip(names, zoo.summaries(names), strict=True):
        print(line + (f"  {zoo.model_folder(name)}" if args.paths else ""))
    return 0
