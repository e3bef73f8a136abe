"""Command line: ``metaloop train | eval | data``. Run ``metaloop <command> --help`` for details."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from metaloop import distributed
from metaloop.allocator import keep_freed_memory
from metaloop.checkpoint import CheckpointError, load_checkpoint
from metaloop.config import ConfigError, apply_overrides, config_from_dict, load_config
from metaloop.data.download import DownloadError
from metaloop.data.omniglot import OmniglotError
from metaloop.train import TrainingDiverged

EXAMPLES = """examples:
  metaloop train                                        # ProtoNet on the embedded glyph set (no download)
  metaloop train --config configs/protonet_omniglot_5w1s.yaml --set train.steps=2000
  metaloop train --resume runs/protonet_omniglot_5w1s   # continue an interrupted run
  metaloop eval --checkpoint runs/protonet_omniglot_5w1s --ways 20 --shots 1
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
    if args.resume:
        if args.config:
            raise ConfigError(
                "--resume continues a run with its own config; drop --config (use --set to change keys)"
            )
        base = config_of_run(args.resume).to_dict()
        base["run_dir"] = str(args.resume)
        config = config_from_dict(apply_overrides(base, overrides))
    else:
        config = load_config(args.config, overrides)
    if distributed.is_main():
        print(f"run folder: {config.run_dir}", file=sys.stderr)
    result = run(config, resume=bool(args.resume), progress=not args.no_progress)
    if distributed.is_main():
        print(f"{config.algorithm.name} on {config.data.name}/{config.data.test_split}: {result}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from metaloop.train import learner_from_checkpoint, test_learner

    state = load_checkpoint(args.checkpoint)
    overrides = [
        f"eval.{k}={v}"
        for k in ("ways", "shots", "queries", "episodes", "seed")
        if (v := getattr(args, k)) is not None
    ]
    if args.split:
        overrides.append(f"data.test_split={args.split}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.device:
        overrides.append(f"device={args.device}")
    config = config_from_dict(apply_overrides(state["config"], overrides))
    if args.inner_steps is not None:
        if "eval_inner_steps" not in state["hparams"]:
            raise ConfigError(f"--inner-steps applies to gradient-based learners, not {state['algorithm']}")
        state["hparams"]["eval_inner_steps"] = args.inner_steps
    with distributed.process_group(config.device, config.dist_timeout_s):  # torchrun: shard the episodes
        learner = learner_from_checkpoint(state).to(distributed.local_device(config.device))
        result = test_learner(config, learner, progress=not args.no_progress)
    if not distributed.is_main():
        return 0
    steps = state["hparams"].get("eval_inner_steps")
    after = f" after {steps} inner step{'s' * (steps != 1)}" if steps is not None else ""
    print(f"{state['algorithm']} on {config.data.name}/{config.data.test_split}{after}: {result}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _data(args: argparse.Namespace) -> int:
    from metaloop.data import DATASETS
    from metaloop.data.base import default_data_dir
    from metaloop.data.omniglot import prepare_omniglot, verify_omniglot

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if args.action == "list":
        print(f"data folder: {data_dir}")
        for name in DATASETS:
            present = {"omniglot": (data_dir / "omniglot" / "images_background.zip").is_file()}.get(name)
            status = {True: "present", False: "absent (metaloop data prepare omniglot)", None: "built in"}[
                present
            ]
            print(f"  {name:10s} {status}")
        print(f"  {'sinusoid':10s} built in (regression tasks)")
        return 0
    if args.name != "omniglot":
        raise ConfigError(
            f"'{args.action}' applies to omniglot only (glyphs are generated, folders are yours)"
        )
    if args.action == "prepare":
        print(f"omniglot ready in {prepare_omniglot(data_dir, download=not args.no_download)}")
    else:
        for line in verify_omniglot(data_dir):
            print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaloop",
        description="Meta-learning and few-shot learning on PyTorch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="meta-train a learner, then evaluate it on meta-test episodes",
        description="Meta-train from a YAML recipe (default: ProtoNet on the embedded glyph set), "
        "keep the best meta-validated model, and report meta-test accuracy ± 95%% CI. "
        "Writes config.yaml, metrics.jsonl, last.pt, best.pt and result.json into the run folder.",
    )
    train.add_argument("--config", help="YAML recipe, e.g. configs/protonet_omniglot_5w1s.yaml")
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
    train.add_argument("--device", help="cpu | cuda | auto (default auto: cuda when a GPU is visible)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    ev = commands.add_parser(
        "eval",
        help="evaluate a checkpoint on seeded test episodes",
        description="Mean accuracy ± 95%% CI (1.96·std/√N) over N seeded test episodes. "
        "Episode shape and split default to the run's own eval config.",
    )
    ev.add_argument("--checkpoint", required=True, help="a .pt file, or a run folder (uses best.pt)")
    ev.add_argument("--ways", type=int)
    ev.add_argument("--shots", type=int)
    ev.add_argument("--queries", type=int, help="queries per class")
    ev.add_argument("--episodes", type=int, help="number of test episodes (default 1000)")
    ev.add_argument("--seed", type=int, help="seed of the test episodes")
    ev.add_argument("--inner-steps", type=int, help="gradient-based learners: inner steps at test time")
    ev.add_argument("--split", help="dataset split to test on (default: the run's test split)")
    ev.add_argument("--data-dir", help="dataset folder (default: $METALOOP_DATA or ~/.cache/metaloop)")
    ev.add_argument("--device", help="cpu | cuda | auto (default: the run's device setting)")
    ev.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(handler=_eval)

    data = commands.add_parser(
        "data",
        help="list, prepare (download + verify) or verify datasets",
        description="Datasets live in --data-dir, $METALOOP_DATA or ~/.cache/metaloop. "
        "Omniglot is downloaded and checksummed by 'prepare'; 'verify' checks files already there.",
    )
    data.add_argument("action", choices=["list", "prepare", "verify"])
    data.add_argument("name", nargs="?", default="omniglot")
    data.add_argument("--data-dir")
    data.add_argument("--no-download", action="store_true", help="prepare: only check what is on disk")
    data.set_defaults(handler=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    code = _handle(args)
    if distributed.launched():
        # One of several torchrun processes: its work is done and the group is gone (or broken).
        # gloo's C++ teardown at interpreter exit can abort a finished process ("terminate called
        # without an active exception", seen under load), so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _handle(args: argparse.Namespace) -> int:
    """Run the command; expected errors become one line on stderr and an exit code."""
    try:
        return args.handler(args)
    except (
        ConfigError,
        CheckpointError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
        DownloadError,
        OmniglotError,
    ) as error:
        print(f"metaloop {args.command}: error: {_where()}{error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"metaloop {args.command}: error: {_where()}{error}", file=sys.stderr)
        return 3
    except distributed.DistributedError as error:  # its message names the rank
        print(f"metaloop {args.command}: error: {error}", file=sys.stderr)
        return 1


def _where() -> str:
    """``"[rank r/W] "`` when launched as one of several processes, else nothing."""
    return f"[rank {distributed.rank()}/{distributed.world_size()}] " if distributed.launched() else ""


if __name__ == "__main__":
    sys.exit(main())
