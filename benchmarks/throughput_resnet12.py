"""Meta-training throughput and peak memory over ResNet-12: MAML (second order, 1 inner step) under
each execution strategy, and ProtoNet.

Random images (no dataset needed): ``--tasks`` tasks of ``--ways``-way ``--shots``-shot with
``--queries`` queries per class, ``--channels`` x ``--image-size`` squared, ResNet-12 of ``--widths``
(default 64-160-320-640). Each measurement runs in a fresh subprocess, so its peak memory is its own
(resident set on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU). A step is
``meta_loss -> backward -> Adam step``; tasks/s is the median over ``--repeats`` timed steps after
``--warmup`` steps.

    python benchmarks/throughput_resnet12.py --note "what else ran"
    python benchmarks/throughput_resnet12.py --device cuda --image-size 84 --tasks 8 \
        --out benchmarks/results/throughput_resnet12_cuda

writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/throughput_resnet12``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from throughput import run_meta, write_report  # benchmarks/throughput.py, beside this script

from metaloop.algorithms import build_learner
from metaloop.allocator import keep_freed_memory
from metaloop.tasks.episodes import TaskBatch

SPECS = (
    {"algorithm": "maml", "strategy": "loop"},
    {"algorithm": "maml", "strategy": "vmap"},
    {"algorithm": "maml", "strategy": "batched"},
    {"algorithm": "protonet", "strategy": "-"},
)


def random_batch(args: argparse.Namespace, seed: int) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    t, w, c, s = args.tasks, args.ways, args.channels, args.image_size

    def images(n: int) -> torch.Tensor:
        return torch.rand(t, n, c, s, s, generator=g)

    support_y = torch.arange(w).repeat_interleave(args.shots).expand(t, -1).contiguous()
    query_y = torch.arange(w).repeat_interleave(args.queries).expand(t, -1).contiguous()
    return TaskBatch(images(w * args.shots), support_y, images(w * args.queries), query_y, w).to(args.device)


def child(args: argparse.Namespace) -> None:
    """One measurement; prints one JSON line."""
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    spec = json.loads(args.child)
    torch.manual_seed(0)
    widths = [int(w) for w in args.widths.split(",")]
    settings: dict = {
        "backbone": "resnet12",
        "backbone_args": {"widths": widths},
        "in_channels": args.channels,
    }
    if spec["algorithm"] == "maml":
        settings.update(ways=args.ways, inner_lr=0.01, inner_steps=1, strategy=spec["strategy"])
    learner = build_learner(spec["algorithm"], **settings).to(args.device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    batches = [random_batch(args, seed) for seed in range(args.warmup + args.repeats)]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss, _ = learner.meta_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {
        **spec,
        "tasks_per_s": round(args.tasks / statistics.median(times), 3),
        "step_seconds": [round(t, 4) for t in times],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))


OPTIONS = ("tasks", "ways", "shots", "queries", "channels", "image_size", "widths", "warmup", "repeats")


def run_child(args: argparse.Namespace, spec: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec), "--device", args.device]
    for key in (*OPTIONS, "threads"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"no result within {args.timeout} s"}
    if done.returncode != 0:
        return {**spec, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def markdown(report: dict) -> str:
    meta = report["meta"]
    memory = "peak GPU MB" if meta["device"] == "cuda" else "peak RSS MB"
    lines = [
        f"# ResNet-12 meta-training throughput ({meta['device']}, {meta['threads']} thread(s), "
        f"torch {meta['torch']})",
        "",
        f"{meta['tasks']} tasks of {meta['ways']}-way {meta['shots']}-shot {meta['queries']}-query, "
        f"{meta['channels']}x{meta['image_size']}x{meta['image_size']} images, "
        f"ResNet-12 widths {meta['widths']}; "
        f"MAML second order, 1 inner step. {meta['note']}".strip(),
        f"Load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']}.",
        "",
        f"| learner | strategy | tasks/s | {memory} |",
        "| --- | --- | ---: | ---: |",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['algorithm']} | {r['strategy']} | error: {r['error']} | |")
        else:
            mem = r.get("peak_gpu_mb", r["peak_rss_mb"])
            lines.append(f"| {r['algorithm']} | {r['strategy']} | {r['tasks_per_s']:.2f} | {mem:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--widths", default="64,160,320,640")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default="benchmarks/results/throughput_resnet12")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    loadavg_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()
    results = [run_child(args, spec) for spec in SPECS]
    meta = run_meta(args, (*OPTIONS, "threads", "device", "note"), loadavg_start, started)
    write_report({"meta": meta, "results": results}, args.out, markdown)


if __name__ == "__main__":
    main()
