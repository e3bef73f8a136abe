"""Is a CAVIA model held back by its features or by its head? One checkpoint, the same seeded episodes,
three classifiers of each query:

- ``head``: the network's own output after the inner loop (what ``metaloop eval`` measures);
- ``nearest_adapted``: the nearest class prototype (the support mean, ProtoNet's rule) in squared
  Euclidean distance between the network's features (``net.features``, the ``[hidden]`` mean over the
  last block's positions) with the adapted context;
- ``nearest_context0``: the same with the context at 0, the value every task starts from.

CAVIA (Zintgraf et al. 2019, arXiv:1810.03642) adapts only a context vector; its head is shared by every
task. When the features of the adapted network separate the classes much better than the head reads
them, the head (the mapping from features to a task's labels), not the representation, limits the model.
At 1 shot a class's prototype is its one support image.

Episodes come from a sampler seeded with ``--seed`` (default: the checkpoint's ``eval.seed``), as
``metaloop eval --split SPLIT --queries Q`` draws them, so the ``head`` cell equals
``metaloop eval --checkpoint CKPT --split SPLIT --ways W --shots S --queries Q --episodes N``.

Run: OMP_NUM_THREADS=1 python benchmarks/cavia_head_probe.py --checkpoint runs/cavia_omniglot_20w1s \
    --split val --queries 5 --episodes 300
(reads Omniglot from $METALOOP_DATA; writes benchmarks/results/cavia_head_probe_<run folder or file>.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from metaloop import zoo
from metaloop.algorithms.protonet import prototypes, squared_distances
from metaloop.checkpoint import load_checkpoint
from metaloop.config import config_from_dict
from metaloop.evaluate import confidence_interval, per_task_metric
from metaloop.learners import learner_from_checkpoint
from metaloop.tasks.source import TaskSource

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a CAVIA run folder (its best.pt), a .pt file or zoo:<name>"
    )
    parser.add_argument("--split", default="val", help="dataset split of the episodes")
    parser.add_argument("--ways", type=int, help="default: the checkpoint's eval.ways")
    parser.add_argument("--shots", type=int, help="default: the checkpoint's eval.shots")
    parser.add_argument("--queries", type=int, help="default: the checkpoint's eval.queries")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--seed", type=int, help="default: the checkpoint's eval.seed")
    parser.add_argument("--batch-size", type=int, default=16, help="episodes at once")
    args = parser.parse_args()
    path = zoo.resolve(args.checkpoint)
    file = path / "best.pt" if path.is_dir() else path
    state = load_checkpoint(file)
    if state["algorithm"] != "cavia":
        raise SystemExit(f"{file} holds a {state['algorithm']} model; this script probes CAVIA models")
    config = config_from_dict(state["config"])
    ev = config.eval
    ways, shots = args.ways or ev.ways, args.shots or ev.shots
    queries, seed = args.queries or ev.queries, ev.seed if args.seed is None else args.seed
    learner = learner_from_checkpoint(state).eval()
    steps = int(learner.hparams["eval_inner_steps"])
    sampler = TaskSource(config).sampler(args.split, ways, shots, queries, seed=seed)
    hits: dict[str, list[torch.Tensor]] = {"head": [], "nearest_adapted": [], "nearest_context0": []}
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, args.episodes, args.batch_size):
            batch = sampler.sample(min(args.batch_size, args.episodes - first))
            logits, adapted = learner.run_inner(
                batch.support_x, batch.support_y, batch.query_x, steps, meta=False
            )
            hits["head"].append(per_task_metric(logits, batch))
            context = adapted["context"]  # [T, P]
            for name, ctx in (("nearest_adapted", context), ("nearest_context0", torch.zeros_like(context))):
                support = learner.net.features(batch.support_x, ctx)  # [T, W*S, D]
                query = learner.net.features(batch.query_x, ctx)  # [T, W*Q, D]
                distances = squared_distances(query, prototypes(support, batch.support_y, ways))
                hits[name].append(per_task_metric(-distances, batch))
    cells = {}
    for name, values in hits.items():
        mean, ci95, std = confidence_interval(torch.cat(values))
        cells[name] = {"mean": mean, "ci95": ci95, "std": std}
        print(f"{name:>17}: {100 * mean:.2f} ± {100 * ci95:.2f}%")
    record = {
        "checkpoint": str(args.checkpoint),
        "step": state.get("step"),
        "split": args.split,
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "episodes": args.episodes,
        "seed": seed,
        "inner_steps": steps,
        "cells": cells,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
        },
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other processes sharing the machine
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cavia_head_probe_{file.parent.name if file.name == 'best.pt' else file.stem}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
