"""Meta-training throughput on 1 and on N processes (torchrun, gloo): tasks/s and scaling efficiency.

Runs the real command line, as a user would, on an Omniglot-shaped synthetic image folder (random
28x28 grayscale images, written to a temporary folder; no dataset needed):

    python -m metaloop train ...                                               # 1 process
    python -m torch.distributed.run --standalone --nproc-per-node N -m metaloop train ...   # N

with second-order MAML on the Conv-4 (64 filters), ``--tasks`` tasks of 5-way 1-shot with 15
queries per class per outer step, one torch thread per process. Step times come from the run's
own metrics log (``seconds``: rank 0's cumulative time in ``train_step``, which includes drawing
the tasks, the meta-gradient, the all-reduce and the Adam step; logged every step). The first
``--warmup`` steps of each run are dropped; tasks/s = tasks / median step time. The 1- and
N-process runs alternate ``--repeats`` times, so a change in background load hits both.

    efficiency = tasks/s(N) / (N * tasks/s(1))

    python benchmarks/scaling.py --note "another training run was using one of the two cores"

writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: random 28x28 grayscale images (the folder split keeps 70% for training)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (classes, per_class, 28, 28), generator=g, dtype=torch.uint8)
    for k in range(classes):
        folder = root / f"class{k:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(images[k, i].numpy(), mode="L").save(folder / f"{i:02d}.png")
    return root


def train_command(processes: int, sets: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "metaloop"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += [f"--nproc-per-node={processes}", "-m", "metaloop"]
    return [*launcher, "train", "--no-progress", *[a for s in sets for a in ("--set", s)]]


def measure(args: argparse.Namespace, processes: int, folder: Path, run_dir: Path) -> dict:
    """One run on ``processes`` ranks; step times from its metrics log."""
    steps = args.warmup + args.steps
    sets = [
        "data.name=folder",
        f"data.root={folder}",
        "algorithm.name=maml",
        "algorithm.strategy=loop",
        f"algorithm.hidden={args.hidden}",
        "train.ways=5",
        "train.shots=1",
        "train.queries=15",
        f"train.meta_batch_size={args.tasks}",
        f"train.steps={steps}",
        "train.log_every=1",
        f"train.val_every={steps}",
        "train.val_episodes=4",
        f"train.checkpoint_every={steps}",
        "eval.episodes=4",
        f"run_dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(train_command(processes, sets), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{processes}-process run failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cumulative = [r["seconds"] for r in records if "train_loss" in r]  # one per step
    step_seconds = [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)][args.warmup :]
    median = statistics.median(step_seconds)
    return {
        "processes": processes,
        "tasks_per_s": round(args.tasks / median, 3),
        "median_step_seconds": round(median, 4),
        "step_seconds": [round(s, 4) for s in step_seconds],
        "wall_seconds_with_start_up": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2, help="N, compared with 1 process")
    parser.add_argument("--tasks", type=int, default=32, help="tasks per outer step (all ranks together)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each run")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating 1- and N-process runs")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = parser.parse_args()
    if args.tasks % args.processes:
        parser.error(f"--tasks {args.tasks} must be a multiple of --processes {args.processes}")

    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "images", classes=60, per_class=20)
        for repeat in range(args.repeats):
            for processes in (1, args.processes):
                result = measure(args, processes, folder, Path(tmp) / f"run-{processes}-{repeat}")
                print(json.dumps(result), flush=True)
                runs.append(result)

    def best(processes: int) -> float:
        return max(r["tasks_per_s"] for r in runs if r["processes"] == processes)

    def median(processes: int) -> float:
        return round(statistics.median(r["tasks_per_s"] for r in runs if r["processes"] == processes), 3)

    summary = {
        "tasks_per_s_1": median(1),
        f"tasks_per_s_{args.processes}": median(args.processes),
        "speedup": round(median(args.processes) / median(1), 3),
        "efficiency": round(median(args.processes) / (args.processes * median(1)), 3),
        "efficiency_of_best_runs": round(best(args.processes) / (args.processes * best(1)), 3),
        "definition": f"efficiency = tasks/s({args.processes}) / ({args.processes} * tasks/s(1)), "
        "medians over the repeats",
    }
    report = {
        "meta": {
            "algorithm": "maml (second order, strategy loop)",
            "backbone": f"conv4, {args.hidden} filters",
            "tasks_per_step": args.tasks,
            "ways": 5,
            "shots": 1,
            "queries": 15,
            "threads_per_process": 1,
            "backend": "gloo",
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "repeats": args.repeats,
            "note": args.note,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "loadavg_start": load_start,
            "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
