"""Command line: ``metaloop train | eval | compare | predict | export | data | recipes | zoo``; ``--help``
on each explains it. How failures are reported (one line, or a traceback): :mod:`metaloop.cli_errors`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from metaloop import distributed
from metaloop.algorithms import LEARNERS
from metaloop.allocator import keep_freed_memory
from metaloop.checkpoint import load_checkpoint
from metaloop.cli_errors import check_data_dir, check_settings, log_to_console, run_command
from metaloop.config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from metaloop.device import DEVICE_NAMES, check_device, saved_device_or_cpu
from metaloop.recipebook import all_recipes, recipe_path

EXAMPLES = """examples:
  metaloop train                                        # ProtoNet on the embedded glyph set (no download)
  metaloop recipes                                      # the recipes that ship with metaloop
  metaloop zoo                                          # the trained models that ship with it
  metaloop train --recipe protonet-omniglot-5w1s --set train.steps=2000
  metaloop train --config my_recipe.yaml                # any YAML recipe file
  metaloop train --resume runs/protonet_omniglot_5w1s   # continue an interrupted run
  metaloop eval --checkpoint runs/protonet_omniglot_5w1s --ways 20 --shots 1
  metaloop eval --checkpoint runs/protonet_omniglot_5w1s --attack pgd --epsilon 0.1   # robustness
  metaloop compare runs/protonet_omniglot_5w1s configs/maml_omniglot_5w1s.yaml --out cmp   # same episodes
  metaloop predict --checkpoint runs/default --support my_support --query my_queries --out predictions.csv
  metaloop export --config my_protonet.yaml --set algorithm.backbone_weights=encoder.pt --out model.pt
  metaloop data prepare omniglot                        # download + verify into $METALOOP_DATA
  torchrun --nproc-per-node 2 -m metaloop train --config configs/maml_omniglot_5w1s.yaml   # 2 processes
"""


def _train(args: argparse.Namespace) -> int:
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


def _eval(args: argparse.Namespace) -> int:
    from metaloop.evaluate import test_learner
    from metaloop.learners import learner_class, learner_from_checkpoint

    if args.ways is not None and args.ways < 2:
        raise ConfigError(
            f"--ways must be at least 2 (a task with one class is always right), got {args.ways}"
        )
    if args.device:
        check_device(args.device)  # before reading a checkpoint
    state = load_checkpoint(args.checkpoint)
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
        state["hparams"]["eval_inner_steps"] = args.inner_steps
    _check_test_input(state, config)
    if args.attack is not None:
        return _eval_attack(args, state, config)
    if args.epsilon is not None or args.attack_steps is not None:
        raise ConfigError("--epsilon and --attack-steps set up an attack: add --attack fgsm or --attack pgd")
    with distributed.process_group(config.device, config.dist_timeout_s):  # torchrun: shard the episodes
        learner = learner_from_checkpoint(state).to(distributed.local_device(config.device))
        result = test_learner(config, learner, progress=not args.no_progress)
    if not distributed.is_main():
        return 0
    steps = state["hparams"]["eval_inner_steps"] if adapts_by_gradient else None
    after = f" after {steps} inner step{'s' * (steps != 1)}" if steps is not None else ""
    print(f"{state['algorithm']} on {config.data.name}/{config.data.test_split}{after}: {result}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


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


def _compare(args: argparse.Namespace) -> int:
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


def _predict(args: argparse.Namespace) -> int:
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


def _export(args: argparse.Namespace) -> int:
    from metaloop.learners import export_learner

    config = load_config(args.config, list(args.set))
    if Path(args.out).exists():
        raise FileExistsError(f"{args.out} already exists; choose another --out or delete it")
    learner = export_learner(config, args.out)
    print(f"{learner.name} over a {type(learner.backbone).__name__}, not meta-trained: {args.out}")
    return 0


def _data(args: argparse.Namespace) -> int:
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


def _recipes(args: argparse.Namespace) -> int:
    for recipe in all_recipes():
        print(recipe.line() + (f"  {recipe.path}" if args.paths else ""))
    return 0


def _zoo(args: argparse.Namespace) -> int:
    from metaloop import zoo

    names = zoo.names()
    for name, line in zip(names, zoo.summaries(names), strict=True):
        print(line + (f"  {zoo.model_folder(name)}" if args.paths else ""))
    return 0


DEBUG_HELP = "show the traceback of every error, a mistake in the input too (or set METALOOP_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaloop",
        description="Meta-learning and few-shot learning on PyTorch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    common = argparse.ArgumentParser(add_help=False)  # options every command takes
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        parents=[common],
        help="meta-train a learner, then evaluate it on meta-test episodes",
        description="Meta-train from a YAML recipe (default: ProtoNet on the embedded glyph set), "
        "keep the best meta-validated model, and report meta-test accuracy ± 95% CI. "
        "Writes config.yaml, metrics.jsonl, metrics.csv, last.pt, best.pt, result.json and the learning "
        "curve into the run folder. Learners (algorithm.name): " + ", ".join(sorted(LEARNERS)) + ".",
    )
    train.add_argument(
        "--recipe", metavar="NAME", help="a shipped recipe by name (metaloop recipes lists them)"
    )
    train.add_argument(
        "--config", metavar="FILE", help="any YAML recipe file, e.g. configs/maml_sinusoid.yaml"
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.steps=500",
    )
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    train.add_argument("--data-dir", help="dataset folder (default: $METALOOP_DATA or ~/.cache/metaloop)")
    train.add_argument("--device", help=f"{DEVICE_NAMES} (default auto: cuda when a GPU is visible)")
    train.add_argument("--seed", type=int, help="seed of the run: initial weights and training episodes")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    ev = commands.add_parser(
        "eval",
        parents=[common],
        help="evaluate a checkpoint on seeded test episodes",
        description="Mean accuracy ± 95% CI (1.96·std/√N) over N seeded test episodes. "
        "Episode shape and split default to the run's own eval config.",
    )
    ev.add_argument("--checkpoint", required=True, help="a .pt file, or a run folder (uses best.pt)")
    ev.add_argument("--ways", type=int)
    ev.add_argument("--shots", type=int)
    ev.add_argument("--queries", type=int, help="queries per class")
    ev.add_argument(
        "--episodes", type=int, help="test episodes (default: the run's eval.episodes, 1000 if unset)"
    )
    ev.add_argument("--seed", type=int, help="seed of the test episodes")
    ev.add_argument(
        "--batch-size",
        type=int,
        help="episodes evaluated at once (default: the run's eval.batch_size): a speed and memory "
        "setting (the same episodes; sums in another order can move a borderline query's prediction)",
    )
    ev.add_argument("--inner-steps", type=int, help="gradient-based learners: inner steps at test time")
    ev.add_argument("--split", help="dataset split to test on (default: the run's test split)")
    ev.add_argument("--data-dir", help="dataset folder (default: $METALOOP_DATA or ~/.cache/metaloop)")
    ev.add_argument(
        "--device",
        help=f"{DEVICE_NAMES} (default: the run's device setting; the CPU where this machine lacks its GPU)",
    )
    ev.add_argument(
        "--attack",
        metavar="NAME",
        help="fgsm | pgd: also attack each episode's queries (white box, against the predictor adapted "
        "on the clean support set) and report clean and adversarial accuracy over the same episodes",
    )
    ev.add_argument("--epsilon", type=float, help="--attack: L-infinity radius in (0, 1], pixel units")
    ev.add_argument("--attack-steps", type=int, help="--attack pgd: gradient steps (default 10)")
    ev.add_argument("--json", metavar="FILE", help="also write the result as JSON (with --attack: both)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(handler=_eval)

    co = commands.add_parser(
        "compare",
        parents=[common],
        help="test several learners on the same seeded episodes, with paired differences",
        description="Test every learner on the same seeded test episodes for each --ways x --shots cell and "
        "write OUT/comparison.json and OUT/comparison.md: mean accuracy ± 95% CI per cell, differences "
        "against the reference with 95% CIs from the per-episode differences, accuracy vs shots and vs "
        "ways, training cost, and plots (accuracy vs shots with CI bands, every run's learning curves). "
        "Learners with a fixed output layer (MAML, Reptile, CAVIA, ADML, attention, ...) are tested at "
        "their own number of ways only; LABEL=RUN joins such runs of different ways into one learner "
        "(one row). Runs must share one test set (dataset, test split, image size).",
    )
    co.add_argument(
        "learners",
        nargs="+",
        metavar="RUN_OR_RECIPE",
        help="a run folder holding best.pt, or a recipe YAML (its finished run at run_dir, or with --train "
        "trained into OUT/runs/<name>); as LABEL=RUN_OR_RECIPE it is tested as learner LABEL, which "
        "several runs of fixed output layers of different ways may share",
    )
    co.add_argument("--out", required=True, metavar="DIR", help="folder for the comparison's files")
    co.add_argument("--ways", type=int, nargs="+", default=[5, 20], help="ways of the cells (default 5 20)")
    co.add_argument(
        "--shots", type=int, nargs="+", default=[1, 2, 5, 10], help="shots of the cells (default 1 2 5 10)"
    )
    co.add_argument(
        "--queries",
        type=int,
        default=15,
        help="queries per class (default 15; fewer where shots + queries exceed the smallest test class)",
    )
    co.add_argument("--episodes", type=int, default=1000, help="test episodes per cell (default 1000)")
    co.add_argument("--seed", type=int, default=1234, help="seed of the test episodes (default 1234)")
    co.add_argument(
        "--reference",
        metavar="LABEL",
        help="learner (its label or run name) the differences are taken against (default: the first)",
    )
    co.add_argument(
        "--train",
        action="store_true",
        help="train the recipes first, all under one budget (--steps and/or --minutes; run folders are "
        "used as they are); a finished run of the same configuration in OUT/runs is reused, an "
        "interrupted one resumed",
    )
    co.add_argument("--steps", type=int, help="--train: outer steps of every recipe (sets train.steps)")
    co.add_argument(
        "--minutes", type=float, help="--train: wall-clock minutes for every recipe (sets train.max_minutes)"
    )
    co.add_argument("--device", help=f"{DEVICE_NAMES} (default: the first run's device setting)")
    co.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    co.set_defaults(handler=_compare)

    pr = commands.add_parser(
        "predict",
        parents=[common],
        help="classify your own images with a trained model and a support folder",
        description="Adapt a trained classifier to SUPPORT/<class_name>/<images> and classify the query "
        "images (files, or every image below a folder). Writes CSV: path, predicted class, then one "
        "column p_<class> per support class (softmax probabilities), one row per query in sorted path "
        "order. Images are converted as the training images were: the input transform the checkpoint "
        "records (image size, channels, resize filter, polarity, value range). A warning line says when the "
        "support images look unlike the training data (e.g. inverted).",
    )
    pr.add_argument("--checkpoint", required=True, help="a .pt file, or a run folder (uses best.pt)")
    pr.add_argument("--support", required=True, metavar="DIR", help="folder of class folders of images")
    pr.add_argument("--query", required=True, nargs="+", metavar="PATH", help="query image files or folders")
    pr.add_argument("--out", metavar="FILE.csv", help="write the CSV here (atomically); default: stdout")
    pr.add_argument(
        "--invert",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override the polarity the model records for its training data: --invert reads 255 - pixel, "
        "--no-invert the pixels as they are (default: as the training data; Omniglot and glyph models "
        "invert, so black-ink-on-white files need no flag)",
    )
    pr.add_argument("--device", default="cpu", help=f"{DEVICE_NAMES} (default cpu)")
    pr.set_defaults(handler=_predict)

    ex = commands.add_parser(
        "export",
        help="write a checkpoint of a learner built from a recipe, without meta-training",
        description="Build the learner of a recipe (for example ProtoNet over a pretrained network: "
        "algorithm.backbone=package.module:factory, algorithm.backbone_weights=weights.pt) and write it as "
        "a checkpoint for 'metaloop eval' and 'metaloop predict'. No meta-training happens.",
    )
    ex.add_argument("--config", help="YAML recipe (default: the built-in defaults)")
    ex.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ex.add_argument("--out", required=True, metavar="FILE.pt", help="the checkpoint to write")
    ex.set_defaults(handler=_export)

    data = commands.add_parser(
        "data",
        parents=[common],
        help="list, prepare (download + verify) or verify datasets",
        description="Datasets live in --data-dir, $METALOOP_DATA or ~/.cache/metaloop. "
        "Omniglot is downloaded and checksummed by 'prepare'; 'verify' checks files already there.",
    )
    data.add_argument("action", choices=["list", "prepare", "verify"])
    data.add_argument("name", nargs="?", help="prepare, verify: the dataset (omniglot, the default)")
    data.add_argument("--data-dir")
    data.add_argument("--no-download", action="store_true", help="prepare: only check what is on disk")
    data.set_defaults(handler=_data)

    recipes = commands.add_parser(
        "recipes",
        parents=[common],
        help="list the recipes that ship with metaloop",
        description="One line per shipped recipe: name, learner, dataset, test setting, paper (read from "
        "the recipe files). Run one with 'metaloop train --recipe NAME'.",
    )
    recipes.add_argument("--paths", action="store_true", help="also print each recipe's file")
    recipes.set_defaults(handler=_recipes)

    models = commands.add_parser(
        "zoo",
        parents=[common],
        help="list the trained models that ship with metaloop",
        description="One line per zoo model: name, learner, dataset, test setting, and its result.json "
        "(mean ± 95% CI, test episodes, steps trained). Use one as --checkpoint zoo:NAME; its files "
        "are checked against their sha256 sums then.",
    )
    models.add_argument("--paths", action="store_true", help="also print each model's folder")
    models.set_defaults(handler=_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    log_to_console()
    code = run_command(args.handler, args)
    if distributed.launched():
        # One of several torchrun processes: its work is done and the group is gone (or broken).
        # gloo's C++ teardown at interpreter exit can abort a finished process ("terminate called
        # without an active exception", seen under load), so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
