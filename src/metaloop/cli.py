"""Command line: ``metaloop train | eval | compare | predict | export | data | recipes | zoo``; ``--help``
on each explains it. The arguments are defined here; what each command does is in
:mod:`metaloop.cli_commands`, and how failures are reported (one line, or a traceback) in
:mod:`metaloop.cli_errors`."""

from __future__ import annotations

import argparse
import os
import sys

from metaloop import distributed
from metaloop.algorithms import LEARNERS
from metaloop.allocator import keep_freed_memory
from metaloop.cli_commands import (
    compare_command,
    data_command,
    eval_command,
    export_command,
    predict_command,
    recipes_command,
    train_command,
    zoo_command,
)
from metaloop.cli_errors import log_to_console, run_command
from metaloop.device import DEVICE_NAMES

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
    train.set_defaults(handler=train_command)

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
    ev.add_argument(
        "--top",
        type=int,
        metavar="K",
        help="--checkpoint a run folder trained with train.keep_top: test the ensemble of its K "
        "best-validated models (the mean of their logits; MAML++'s test, Antoniou et al. 2019)",
    )
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
    ev.set_defaults(handler=eval_command)

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
    co.set_defaults(handler=compare_command)

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
    pr.set_defaults(handler=predict_command)

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
    ex.set_defaults(handler=export_command)

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
    data.set_defaults(handler=data_command)

    recipes = commands.add_parser(
        "recipes",
        parents=[common],
        help="list the recipes that ship with metaloop",
        description="One line per shipped recipe: name, learner, dataset, test setting, paper (read from "
        "the recipe files). Run one with 'metaloop train --recipe NAME'.",
    )
    recipes.add_argument("--paths", action="store_true", help="also print each recipe's file")
    recipes.set_defaults(handler=recipes_command)

    models = commands.add_parser(
        "zoo",
        parents=[common],
        help="list the trained models that ship with metaloop",
        description="One line per zoo model: name, learner, dataset, test setting, and its result.json "
        "(mean ± 95% CI, test episodes, steps trained), and --top K where the model ships the K models of "
        "its paper's ensemble test. Use one as --checkpoint zoo:NAME; its files are checked against "
        "their sha256 sums then.",
    )
    models.add_argument("--paths", action="store_true", help="also print each model's folder")
    models.set_defaults(handler=zoo_command)
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
