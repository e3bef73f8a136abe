"""Does keeping freed memory (glibc) speed up metaloop, and does it work when applied from Python?

Three allocator settings, each measured in fresh subprocesses, interleaved over ``--rounds`` rounds
so that a busy machine slows all of them alike:

- ``default``: glibc as it starts;
- ``mallopt``: :func:`metaloop.allocator.keep_freed_memory` called first thing in the process, as the
  CLI does (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, -1)``, never trim): what a Python
  script can do for itself;
- ``env``: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` in the environment, set before
  the process starts.

Three workloads on random Omniglot-shaped images (no dataset needed), Conv-4 with 64 filters:

- ``train``: ProtoNet meta-training steps (``meta_loss -> backward -> Adam step``) on one task of
  ``--ways``-way 5-shot with 15 queries per class (Snell et al. train 60-way);
- ``predict``: what :class:`metaloop.FewShotPredictor` does per call: ``adapt`` to a 20-way 5-shot
  support set, then logits of 100 queries;
- ``evaluate``: what ``metaloop eval`` does per batch of the recipes' ``eval.batch_size``: logits of
  16 tasks of 20-way 1-shot with 15 queries per class at once (ProtoNet, eval mode, per-task batch
  norm), 5,120 images, about 1 GB of activations a layer.

Each reports the median seconds over ``--repeats`` timed calls after ``--warmup``; the JSON holds the
median over rounds and the speed-up ``default / setting``, taken within this one run::

    python benchmarks/allocator.py        # writes benchmarks/results/allocator.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "mallopt", "env")
ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
WORKLOADS = ("train", "predict", "evaluate")


def child(args: argparse.Namespace) -> dict[str, float]:
    """Run both workloads in this process; median seconds per call of each."""
    if args.setting == "mallopt":
        from metaloop.allocator import keep_freed_memory

        if not keep_freed_memory():
            raise RuntimeError("mallopt was not accepted (not glibc?)")
    import torch

    from metaloop.algorithms import ProtoNet
    from metaloop.tasks.episodes import TaskBatch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:  # [n, 1, 28, 28] in [0, 1]
        return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8).float().div_(255)

    def timed(call, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            call()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    learner = ProtoNet(hidden=64)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    w = args.ways
    batch = TaskBatch(
        images(w * 5)[None],
        torch.arange(w).repeat_interleave(5)[None],
        images(w * 15)[None],
        torch.arange(w).repeat_interleave(15)[None],
        w,
    )

    def train_step() -> None:
        loss, _ = learner.meta_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    support_x, support_y, query_x = images(100), torch.arange(20).repeat_interleave(5), images(100)

    def predict() -> None:
        with torch.no_grad():
            learner.adapt(support_x, support_y)(query_x)

    tasks = 16  # the recipes' eval.batch_size
    eval_batch = TaskBatch(
        images(tasks * 20).view(tasks, 20, 1, 28, 28),
        torch.arange(20).repeat(tasks, 1),
        images(tasks * 300).view(tasks, 300, 1, 28, 28),
        torch.arange(20).repeat_interleave(15).repeat(tasks, 1),
        20,
    )

    def evaluate() -> None:
        with torch.no_grad():
            learner.predict(eval_batch)

    result = {"train": timed(train_step, args.warmup, args.repeats)}
    learner.eval()
    result["predict"] = timed(predict, args.warmup, args.repeats * 3)
    result["evaluate"] = timed(evaluate, args.warmup, args.repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ways", type=int, default=60, help="ways of the training task (default 60)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. what else was running)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "allocator.json"))
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(child(args)))
        return

    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
    flags = [f"--{k}={getattr(args, k)}" for k in ("ways", "warmup", "repeats", "threads")]
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for setting in SETTINGS:
            env = {**os.environ, **(ENV if setting == "env" else {})}
            if setting != "env":
                for key in ENV:
                    env.pop(key, None)
            out = subprocess.run(
                [sys.executable, __file__, "--setting", setting, *flags],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}, {setting}: {runs[setting][-1]}", file=sys.stderr)
    median = {s: {w: statistics.median(run[w] for run in runs[s]) for w in WORKLOADS} for s in SETTINGS}
    speedup = {
        s: {w: median["default"][w] / median[s][w] for w in WORKLOADS} for s in SETTINGS if s != "default"
    }
    import torch

    record = {
        "command": "python benchmarks/allocator.py " + " ".join(sys.argv[1:]),
        "seconds_per_call": median,
        "speedup_over_default": speedup,
        "runs": runs,
        "settings": {k: getattr(args, k) for k in ("ways", "rounds", "warmup", "repeats")},
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "note": args.note,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for s, by_workload in speedup.items():
        print(f"{s}: " + ", ".join(f"{w} {v:.2f}x" for w, v in by_workload.items()))


if __name__ == "__main__":
    main()
