"""Scarce tasks: meta-test accuracy against the number of meta-train classes.

Trains the recipe ``--config`` (default ``configs/study_scarce_tasks.yaml``: ProtoNet on the glyph
set, no download) once for every value of ``--classes``, setting ``data.train_classes`` (a seeded
pick of that many meta-train classes) and, with ``--augment``, also with ``train.augment`` (e.g.
``rot90``: rotated tasks as new tasks, the usual remedy when classes are scarce). Every run is
tested on the SAME test episodes (the recipe's eval seed), so the points are comparable.

    OMP_NUM_THREADS=1 python benchmarks/scarce_tasks.py --classes 10 40 160 0 --augment rot90

(0 = all classes) writes benchmarks/results/scarce_tasks.json, .md and .png/.svg (accuracy ± 95% CI
against classes, one line per augmentation setting).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from metaloop.config import load_config
from metaloop.report import plot_accuracy_vs_shots
from metaloop.tasks.source import TaskSource
from metaloop.train import run

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/study_scarce_tasks.yaml")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 40, 160, 0], help="0 = all")
    parser.add_argument("--augment", nargs="*", default=[], help="augmentations to compare with none")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for augment in ["none", *args.augment]:
            for classes in args.classes:
                overrides = [*args.set, f"train.augment={augment}", f"run_dir={scratch}/{augment}-{classes}"]
                if classes:
                    overrides.append(f"data.train_classes={classes}")
                config = load_config(args.config, overrides)
                started = time.perf_counter()
                result = run(config, progress=False)
                rows.append(
                    {
                        "augment": augment,
                        "train_classes": TaskSource(config).num_classes(config.data.train_split),
                        "accuracy": result.mean,
                        "ci95": result.ci95,
                        "episodes": result.episodes,
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    report = {"config": args.config, "overrides": args.set, "rows": rows}
    (RESULTS / "scarce_tasks.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| augment | meta-train classes | accuracy (95% CI) | seconds |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {r['augment']} | {r['train_classes']} | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}% | "
        f"{r['seconds']} |"
        for r in rows
    ]
    (RESULTS / "scarce_tasks.md").write_text("\n".join(lines) + "\n")
    curves = {
        augment: [(r["train_classes"], r["accuracy"], r["ci95"]) for r in rows if r["augment"] == augment]
        for augment in ["none", *args.augment]
    }
    plot_accuracy_vs_shots(curves, RESULTS / "scarce_tasks", xlabel="meta-train classes")
    print(f"wrote {RESULTS / 'scarce_tasks.json'}, .md and .png")


if __name__ == "__main__":
    main()
