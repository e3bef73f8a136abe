"""How much of an Omniglot test number is the test protocol: one checkpoint tested on the Vinyals test
split with several numbers of queries per class, on every class (each rotation of a character a class
of its own, 1,692 classes) or on the unrotated characters only (``rot000``, 423 classes).

Papers do not all test alike. metaloop's recipes test on all 1,692 classes with 15 queries per class.
Nichol et al.'s Reptile code (``run_omniglot.py`` of openai/supervised-reptile) tests on held-out
characters without rotations, with one query per class (it draws ``num_shots + 1`` images of each
class), and its batch norm is transductive, so the number of queries also sets the batch whose
statistics normalise them. Finn et al.'s MAML code (``main.py`` of cbfinn/maml) tests with batch statistics
of the query batch too, and with as many queries per class as shots (it draws ``2 * update_batch_size``
images of each class): one query per class at 1 shot, five at 5 shots. This script puts a number on
each of those differences for a trained model; the differences in training (Reptile's 1,200 random training
characters against the Vinyals split's 1,028, its nearest-neighbour, uninverted images) need a run of
their own.

Each cell draws its episodes from a sampler seeded with the checkpoint's ``eval.seed``, as ``metaloop
eval`` does, so the ``all`` cells equal ``metaloop eval --checkpoint RUN --queries Q --episodes N``.

Run: OMP_NUM_THREADS=1 python benchmarks/eval_protocols.py --checkpoint runs/reptile_omniglot_5w1s_100k \
    --classes rot000 --queries 15 1 --episodes 1000 2000
(reads Omniglot from $METALOOP_DATA; writes benchmarks/results/eval_protocols_<run folder or file name>.json)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from metaloop import zoo
from metaloop.checkpoint import load_checkpoint
from metaloop.config import config_from_dict
from metaloop.data.base import ClassImages
from metaloop.evaluate import evaluate
from metaloop.learners import learner_from_checkpoint
from metaloop.tasks.episodes import EpisodeSampler
from metaloop.tasks.source import TaskSource

RESULTS = Path(__file__).resolve().parent / "results"
CLASS_SETS = ("all", "rot000")


def protocol_classes(dataset: ClassImages, which: str) -> ClassImages:
    """``dataset`` itself (``"all"``) or its unrotated classes (``"rot000"``)."""
    if not all(name.rsplit("/", 1)[-1].startswith("rot") for name in dataset.class_names):
        raise SystemExit(
            f"{dataset.name} has no rotation classes (names end in /rotDDD); this script compares "
            "protocols on a Vinyals split of Omniglot"
        )
    if which == "all":
        return dataset
    kept = [k for k, name in enumerate(dataset.class_names) if name.endswith("/rot000")]
    return dataset.subset(kept, name=f"{dataset.name}[rot000]")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run folder (its best.pt), a .pt file or zoo:<name>"
    )
    parser.add_argument("--classes", nargs="+", choices=CLASS_SETS, default=list(CLASS_SETS))
    parser.add_argument("--queries", nargs="+", type=int, default=[15, 1], help="queries per class")
    parser.add_argument(
        "--episodes", nargs="+", type=int, default=[1000, 2000], help="episodes for each --queries value"
    )
    args = parser.parse_args()
    if len(args.episodes) != len(args.queries):
        parser.error(f"give one --episodes value per --queries value, got {args.episodes}")
    path = zoo.resolve(args.checkpoint)
    state = load_checkpoint(path / "best.pt" if path.is_dir() else path)
    config = config_from_dict(state["config"])
    learner = learner_from_checkpoint(state)
    test = TaskSource(config).dataset(config.data.test_split)
    ev = config.eval
    cells = []
    for which in args.classes:
        classes = protocol_classes(test, which)
        for queries, episodes in zip(args.queries, args.episodes, strict=True):
            sampler = EpisodeSampler(classes, ev.ways, ev.shots, queries, seed=ev.seed)
            start = time.perf_counter()
            result = evaluate(learner, sampler, episodes, ev.batch_size, "cpu", progress=False)
            cells.append(
                {
                    "classes": which,
                    "num_classes": classes.num_classes,
                    "seconds": round(time.perf_counter() - start, 1),
                    **result.to_dict(),
                }
            )
            print(f"{which} ({classes.num_classes} classes), {queries} per class: {result}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"eval_protocols_{path.resolve().name if path.is_dir() else path.stem}.json"
    record = {
        "checkpoint": str(args.checkpoint),
        "algorithm": state["algorithm"],
        "step": state.get("step", state.get("run_state", {}).get("step")),
        "test_split": config.data.test_split,
        "ways": ev.ways,
        "shots": ev.shots,
        "seed": ev.seed,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
        },
        "threads": torch.get_num_threads(),
        "cells": cells,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
