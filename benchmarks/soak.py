"""Memory soak: does resident memory stay flat over thousands of second-order MAML steps?

Second-order MAML (Conv-4 with 64 filters, 1 inner step, create_graph through the inner
gradient) on Omniglot-shaped synthetic data (``--classes`` random 28x28 uint8 classes of
``--per-class`` images each; no dataset needed), ``--tasks`` tasks of 5-way 1-shot with 15
queries per class per meta-batch, drawn by :class:`EpisodeSampler`, trained with Adam for
``--steps`` outer steps. A step is ``sample -> meta_loss -> backward -> Adam step``.

Every ``--every`` steps it records the current resident set (``/proc/self/statm``) and the
peak so far (``getrusage`` ``ru_maxrss``). The first ``--warmup`` steps are warm-up (allocator
pools, autograd caches and Adam state settle there). It reports the peak RSS at the end of
warm-up and at the end of the run, the growth between them in percent (pass: under
``--max-growth`` percent), min / max / slope of the current RSS after warm-up, steps/s and
tasks/s. ``keep_freed_memory()`` (glibc mallopt) is applied unless ``--no-allocator-tuning``,
so the two can be compared.

    OMP_NUM_THREADS=1 python benchmarks/soak.py --note "..."

writes benchmarks/results/soak.json and prints a one-paragraph summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from metaloop.algorithms import build_learner
from metaloop.allocator import keep_freed_memory
from metaloop.data.base import ClassImages
from metaloop.tasks.episodes import EpisodeSampler


def synthetic_classes(num_classes: int, per_class: int, seed: int) -> ClassImages:
    """Omniglot-shaped uint8 ``[K*N, 1, 28, 28]``: per class a random 7x7 blob pattern upsampled to
    28x28; its examples are copies with 10% of the pixels flipped (learnable, so the loss moves)."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(num_classes, 1, 7, 7, generator=g) > 0.5).float()
    patterns = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="nearest")  # [K, 1, 28, 28]
    examples = patterns[:, None].expand(-1, per_class, -1, -1, -1)  # [K, N, 1, 28, 28]
    flips = torch.rand(examples.shape, generator=g) < 0.1
    examples = torch.where(flips, 1 - examples, examples)
    images = (examples * 255).to(torch.uint8).flatten(0, 1)
    offsets = torch.arange(0, num_classes * per_class + 1, per_class)
    return ClassImages(images, offsets, [f"class{k:04d}" for k in range(num_classes)], "synthetic")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def slope_per_1000_steps(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``steps``, in units per 1000 steps."""
    n = len(steps)
    if n < 2:
        return 0.0
    mean_s, mean_v = sum(steps) / n, sum(values) / n
    var = sum((s - mean_s) ** 2 for s in steps)
    cov = sum((s - mean_s) * (v - mean_v) for s, v in zip(steps, values, strict=True))
    return 1000 * cov / var


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000, help="outer steps")
    parser.add_argument(
        "--tasks", type=int, default=6, help="tasks per meta-batch (6: ~5 steps/s, ~7 min on one CPU thread)"
    )
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--strategy", default="auto", choices=["auto", "loop", "vmap", "batched"])
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's outer learning rate")
    parser.add_argument("--classes", type=int, default=400, help="synthetic classes")
    parser.add_argument("--per-class", type=int, default=20, help="synthetic images per class")
    parser.add_argument("--warmup", type=int, default=100, help="steps before the memory baseline")
    parser.add_argument("--every", type=int, default=50, help="record memory every this many steps")
    parser.add_argument("--max-growth", type=float, default=5.0, help="pass: peak RSS growth under this %%")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-allocator-tuning", action="store_true", help="skip keep_freed_memory()")
    parser.add_argument("--note", default="", help="conditions to record, e.g. other load on the machine")
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    args = parser.parse_args()
    if args.warmup % args.every or args.warmup >= args.steps:
        parser.error("--warmup must be a multiple of --every and smaller than --steps")

    tuned = False if args.no_allocator_tuning else keep_freed_memory()
    torch.set_num_threads(args.threads)
    loadavg_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    torch.manual_seed(args.seed)
    dataset = synthetic_classes(args.classes, args.per_class, args.seed)
    sampler = EpisodeSampler(dataset, args.ways, args.shots, args.queries, seed=args.seed)
    learner = build_learner(
        "maml",
        backbone="conv4",
        in_channels=1,
        hidden=args.hidden,
        ways=args.ways,
        inner_lr=0.4,
        inner_steps=args.inner_steps,
        eval_inner_steps=3,
        strategy=args.strategy,
    )
    assert not learner.hparams["first_order"], "the soak is of second-order MAML"
    optimizer = torch.optim.Adam(learner.parameters(), lr=args.lr)

    samples = [
        {"step": 0, "current_rss_mb": round(current_rss_mb(), 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
    ]
    losses: list[float] = []
    accuracies: list[float] = []
    started = time.perf_counter()
    warm_time = None
    for step in range(1, args.steps + 1):
        batch = sampler.sample(args.tasks)
        loss, metrics = learner.meta_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(metrics["loss"])
        accuracies.append(metrics["accuracy"])
        if step == args.warmup:
            warm_time = time.perf_counter()
        if step % args.every == 0 or step == args.steps:
            window = slice(-args.every, None)
            sample = {
                "step": step,
                "current_rss_mb": round(current_rss_mb(), 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "elapsed_s": round(time.perf_counter() - started, 1),
                "mean_loss": round(sum(losses[window]) / len(losses[window]), 4),
                "mean_accuracy": round(sum(accuracies[window]) / len(accuracies[window]), 4),
            }
            samples.append(sample)
            print(json.dumps(sample), flush=True)
    finished = time.perf_counter()

    after = [s for s in samples if s["step"] >= args.warmup]
    peak_warm, peak_end = after[0]["peak_rss_mb"], after[-1]["peak_rss_mb"]
    growth = 100 * (peak_end - peak_warm) / peak_warm
    current = [s["current_rss_mb"] for s in after]
    steps_per_s = args.steps / (finished - started)
    steady_steps_per_s = (args.steps - args.warmup) / (finished - warm_time)
    result = {
        "benchmark": "memory soak: second-order MAML outer steps, resident memory over time",
        "config": {
            "algorithm": "maml (second order)",
            "backbone": f"conv4, {args.hidden} filters",
            "episode": {"ways": args.ways, "shots": args.shots, "queries": args.queries},
            "tasks_per_step": args.tasks,
            "inner_steps": args.inner_steps,
            "inner_lr": 0.4,
            "strategy": learner.strategy(torch.device("cpu")),
            "optimizer": f"Adam lr={args.lr}",
            "data": f"synthetic uint8 1x28x28, {args.classes} classes x {args.per_class} images",
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "record_every": args.every,
            "allocator_tuning": tuned,
        },
        "peak_rss_after_warmup_mb": peak_warm,
        "peak_rss_at_end_mb": peak_end,
        "peak_rss_growth_percent": round(growth, 2),
        "current_rss_after_warmup_min_mb": min(current),
        "current_rss_after_warmup_max_mb": max(current),
        "current_rss_slope_mb_per_1000_steps": round(
            slope_per_1000_steps([s["step"] for s in after], current), 2
        ),
        "rss_before_training_mb": samples[0]["current_rss_mb"],
        "pass": growth < args.max_growth,
        "pass_criterion": f"peak RSS growth after warm-up < {args.max_growth}%",
        "steps_per_s": round(steps_per_s, 3),
        "tasks_per_s": round(steps_per_s * args.tasks, 3),
        "steps_per_s_after_warmup": round(steady_steps_per_s, 3),
        "total_seconds": round(finished - started, 1),
        "final_mean_loss": samples[-1]["mean_loss"],
        "final_mean_accuracy": samples[-1]["mean_accuracy"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "note": args.note,
        "samples": samples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "PASS" if result["pass"] else "FAIL"
    print(
        f"{verdict}: {args.steps} outer steps of second-order MAML (conv4-{args.hidden}, "
        f"{args.tasks} tasks of {args.ways}-way {args.shots}-shot {args.queries}-query, allocator tuning "
        f"{'on' if tuned else 'off'}, {result['threads']} thread(s), torch {torch.__version__}): peak RSS "
        f"{peak_warm:.1f} MB after the {args.warmup}-step warm-up and {peak_end:.1f} MB at the end, growth "
        f"{growth:.2f}% (limit {args.max_growth}%); current RSS after warm-up stayed within "
        f"{min(current):.1f}-{max(current):.1f} MB (slope "
        f"{result['current_rss_slope_mb_per_1000_steps']:+.2f} MB per 1000 steps); "
        f"{steps_per_s:.2f} steps/s, {result['tasks_per_s']:.2f} tasks/s over {finished - started:.0f} s; "
        f"final query loss {result['final_mean_loss']:.3f}, accuracy {result['final_mean_accuracy']:.3f}. "
        f"Written to {out}."
    )


if __name__ == "__main__":
    main()
