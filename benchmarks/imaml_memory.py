"""Peak memory of one meta-gradient: iMAML against second-order MAML at 1, 5, 10 and 20 inner steps.

Each configuration runs in a fresh Python process: it builds the learner (Conv-4, 64 filters) and a
synthetic meta-batch in the standard setting (5-way 1-shot, 15 queries per class, 28x28 one-channel
inputs, 8 tasks), records the process's peak resident memory (``ru_maxrss``) so far as its baseline,
then runs ``meta_backward`` (strategy ``loop``: one task's graph at a time, as the trainer does on the
CPU) twice and records the peak again. The increment over the baseline is the memory the meta-gradient
needs; MAML's grows with the inner steps (it keeps every step's graph), iMAML's does not (it keeps one
support-gradient graph for its conjugate-gradient solve).

Run: OMP_NUM_THREADS=1 python benchmarks/imaml_memory.py   (writes benchmarks/results/imaml_memory.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

STEPS = (1, 5, 10, 20)
LEARNERS = ("imaml", "maml")
TASKS, WAYS, SHOTS, QUERIES, SIZE = 8, 5, 1, 15, 28
RESULTS = Path(__file__).resolve().parent / "results"


def peak_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, steps: int) -> dict[str, float]:
    """One configuration, in this process: baseline and peak memory, MiB."""
    import torch

    from metaloop.algorithms import build_learner
    from metaloop.tasks.episodes import TaskBatch

    torch.manual_seed(0)
    learner = build_learner(
        name, backbone="conv4", hidden=64, ways=WAYS, inner_lr=0.1, inner_steps=steps, strategy="loop"
    )
    g = torch.Generator().manual_seed(0)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1).contiguous()
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES).expand(TASKS, -1).contiguous()
    batch = TaskBatch(
        torch.rand(TASKS, WAYS * SHOTS, 1, SIZE, SIZE, generator=g),
        support_y,
        torch.rand(TASKS, WAYS * QUERIES, 1, SIZE, SIZE, generator=g),
        query_y,
        WAYS,
    )
    baseline = peak_mb()
    for _ in range(2):
        learner.zero_grad(set_to_none=True)
        learner.meta_backward(batch)
    return {"baseline_mb": round(baseline, 1), "peak_mb": round(peak_mb(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("LEARNER", "STEPS"), help="(internal) one configuration")
    parser.add_argument("--out", type=Path, default=RESULTS / "imaml_memory.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    import torch

    rows = []
    for name in LEARNERS:
        for steps in STEPS:
            command = [sys.executable, __file__, "--one", name, str(steps)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            row = {"learner": name, "inner_steps": steps, **json.loads(done.stdout.strip().splitlines()[-1])}
            row["increment_mb"] = round(row["peak_mb"] - row["baseline_mb"], 1)
            print(row, flush=True)
            rows.append(row)
    peaks = {(r["learner"], r["inner_steps"]): r["peak_mb"] for r in rows}
    report = {
        "setting": {
            "backbone": "conv4, 64 filters",
            "tasks": TASKS,
            "ways": WAYS,
            "shots": SHOTS,
            "queries": QUERIES,
            "image_size": SIZE,
            "strategy": "loop",
            "imaml": "lam 2, cg_steps 5",
            "maml": "second order",
            "measure": "ru_maxrss of a fresh process, after two meta_backward calls",
        },
        "rows": rows,
        "imaml_peak_ratio_20_to_1": round(peaks["imaml", 20] / peaks["imaml", 1], 3),
        "maml_peak_ratio_20_to_1": round(peaks["maml", 20] / peaks["maml", 1], 3),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"iMAML peak at 20 / 1 inner steps: {report['imaml_peak_ratio_20_to_1']}; "
        f"MAML: {report['maml_peak_ratio_20_to_1']}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
