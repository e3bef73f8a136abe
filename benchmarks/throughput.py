"""Meta-training throughput and peak memory: metaloop side by side with the libraries people use.

``--suite peers`` (default): second-order MAML on the standard Conv-4 (64 filters, 3x3 conv with
padding 1, batch norm on each task's batch, ReLU, 2x2 max-pool, 4 blocks, linear head), 28x28
Omniglot-shaped random images, ``--tasks`` tasks of 5-way 1-shot 15-query, inner SGD α = 0.4, for
each of ``--inner-steps``. Implementations (``benchmarks/peer_steps.py``): ``higher`` (install with
``pip install --no-deps higher``, the ``bench`` extra), a plain per-task
``autograd.grad(create_graph=True)`` loop with ``backward()`` per task, and metaloop under each
strategy and ``auto`` (which measures the strategies in its first, warm-up step, with an empty
strategy cache). Every measurement runs in its own process (peak RSS is that process's); the
implementations alternate within each of ``--rounds`` rounds (reversed order every other round);
tasks/s is the median over rounds of each process's median timed step; peak RSS the largest.

    python benchmarks/throughput.py --threads 2 --note "machine shared with other jobs"

writes benchmarks/results/throughput_peers.json and .md.

``--suite algorithms``: every optimisation-based learner on metaloop's own (strided) Conv-4, 1 inner
step, under every strategy, against the same algorithm as a plain per-task loop with batch norm
written from its definition (``tests/reference.py``) and against ordinary supervised training of
the same network (the floor), writing benchmarks/results/throughput.json and .md. On a GPU (peak
memory then is ``torch.cuda.max_memory_allocated``):

    python benchmarks/throughput.py --suite algorithms --device cuda --threads 4 --warmup 3 \
        --repeats 5 --supervised-batches 80,640,2560 --out benchmarks/results/throughput_cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from metaloop.algorithms import build_learner
from metaloop.allocator import keep_freed_memory
from metaloop.nn.functional import head_names
from metaloop.tasks.episodes import TaskBatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
PEERS = (
    "higher",
    "plain",
    "plain-threads",
    "metaloop-loop",
    "metaloop-batched",
    "metaloop-vmap",
    "metaloop-auto",
)
ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "reptile", "cavia")
STRATEGIES = ("loop", "vmap", "batched")


def random_batch(args: argparse.Namespace, seed: int, device: str) -> TaskBatch:
    """Random uint8 images scaled to [0, 1], labels class-major."""
    g = torch.Generator().manual_seed(seed)
    t, w = args.tasks, args.ways

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (t, n, 1, 28, 28), generator=g, dtype=torch.uint8).float().div_(255)

    support_y = torch.arange(w).repeat_interleave(args.shots).expand(t, -1).contiguous()
    query_y = torch.arange(w).repeat_interleave(args.queries).expand(t, -1).contiguous()
    batch = TaskBatch(images(w * args.shots), support_y, images(w * args.queries), query_y, w)
    return batch.to(device)


def build(args: argparse.Namespace, algorithm: str, strategy: str, device: str):
    torch.manual_seed(0)
    return build_learner(algorithm, hidden=args.hidden, ways=args.ways, inner_steps=1, strategy=strategy).to(
        device
    )


def learner_step(args: argparse.Namespace, spec: dict, device: str):
    learner = build(args, spec["algorithm"], spec["strategy"], device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step(batch: TaskBatch) -> None:
        optimizer.zero_grad(set_to_none=True)
        learner.meta_backward(batch)  # as the trainer does: meta_loss and backward, task by task
        optimizer.step()

    return step


def reference_step(args: argparse.Namespace, spec: dict, device: str):
    """The algorithm as ``tests/reference.py`` computes it, on leaf copies of the learner's weights."""
    sys.path.insert(0, str(ROOT / "tests"))
    import reference

    algorithm = spec["algorithm"]
    learner = build(args, algorithm, "loop", device)
    params = {k: p.detach().clone().requires_grad_() for k, p in learner.net.named_parameters()}
    h = learner.hparams
    leaves = list(params.values())
    lr = h.get("inner_lr")
    if algorithm == "metasgd":
        lr = {k: learner.alpha[k.replace(".", "-")].detach().clone().requires_grad_() for k in params}
        leaves += list(lr.values())
    optimizer = torch.optim.Adam(leaves, lr=1e-3)

    def step(batch: TaskBatch) -> None:
        optimizer.zero_grad(set_to_none=True)
        if algorithm == "reptile":
            g, _ = reference.reptile_gradient(reference.conv_net, params, batch, lr, 1)
            for name, p in params.items():
                p.grad = g[name]
        elif algorithm == "cavia":
            n = h["num_context_params"]
            reference.cavia_loss(reference.conv_net, params, batch, lr, 1, n).backward()
        else:
            names = head_names(learner.net) if algorithm == "anil" else None
            reference.maml_loss(reference.conv_net, params, batch, lr, 1, h["first_order"], names).backward()
        optimizer.step()

    return step


def supervised_step(args: argparse.Namespace, spec: dict, device: str):
    """Ordinary training of the same Conv-4; the step consumes ``spec["batch_size"]`` images."""
    learner = build(args, "maml", "loop", device)
    net = learner.net
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    size = spec["batch_size"]

    def step(batch: TaskBatch) -> None:
        images = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)[:size]
        labels = torch.cat([batch.support_y, batch.query_y], 1).flatten()[:size]
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def peer_step(args: argparse.Namespace, spec: dict, device: str):
    """One implementation of ``benchmarks/peer_steps.py`` at ``spec["inner_steps"]`` inner steps."""
    import peer_steps

    torch.manual_seed(0)
    impl, sizes = spec["impl"], (args.hidden, args.ways, args.inner_lr, spec["inner_steps"])
    if impl.startswith("metaloop-"):
        step = peer_steps.metaloop_step(*sizes, strategy=impl.removeprefix("metaloop-"))
    else:
        makers = {
            "higher": peer_steps.higher_step,
            "plain": peer_steps.plain_step,
            "plain-threads": peer_steps.plain_threads_step,
        }
        step = makers[impl](*sizes)
    if hasattr(step, "learner"):
        step.learner.to(device)
    return step


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> None:
    """One measurement; prints one JSON line."""
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    spec = json.loads(args.child)
    device = args.device
    make = {
        "learner": learner_step,
        "reference": reference_step,
        "supervised": supervised_step,
        "peer": peer_step,
    }[spec["kind"]]
    step = make(args, spec, device)
    batches = [random_batch(args, seed, device) for seed in range(args.warmup + args.repeats)]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, rss = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            rss.append(current_rss_mb())
    seconds = statistics.median(times)
    if spec["kind"] == "supervised":
        images_per_task = args.ways * (args.shots + args.queries)
        tasks_per_s = spec["batch_size"] / images_per_task / seconds
    else:
        tasks_per_s = args.tasks / seconds
    result = {
        **spec,
        "tasks_per_s": round(tasks_per_s, 3),
        "step_seconds": [round(t, 4) for t in times],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "baseline_rss_mb": round(baseline, 1),
        "rss_after_first_timed_step_mb": round(rss[0], 1),
        "rss_after_last_timed_step_mb": round(rss[-1], 1),
    }
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    learner = getattr(step, "learner", None)
    if learner is not None:  # which strategy metaloop ran (auto: what it measured as fastest)
        result["ran"] = learner.active_strategy(batches[0].support_x, batches[0].query_x, True)
    print(json.dumps(result))


def run_child(args: argparse.Namespace, spec: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    for key in ("tasks", "ways", "shots", "queries", "hidden", "warmup", "repeats", "threads", "device"):
        command += [f"--{key}", str(getattr(args, key))]
    command += ["--inner-lr", str(args.inner_lr)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as cache:  # auto measures afresh: no earlier choice is read
        env["METALOOP_CACHE"] = cache
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        return {**spec, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def markdown(report: dict) -> str:
    meta, results = report["meta"], report["results"]
    floor = max(
        (r["tasks_per_s"] for r in results if r["kind"] == "supervised" and "error" not in r), default=None
    )
    refs = {r["algorithm"]: r for r in results if r["kind"] == "reference" and "error" not in r}
    memory = "peak GPU MB" if meta["device"] == "cuda" else "peak RSS MB"
    lines = [
        f"# Meta-training throughput ({meta['device']}, {meta['threads']} thread(s), torch {meta['torch']})",
        "",
        f"{meta['tasks']} tasks of {meta['ways']}-way {meta['shots']}-shot {meta['queries']}-query, "
        f"Conv-4 with {meta['hidden']} filters, 1 inner step. {meta['note']}".strip(),
        f"Load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']}.",
        "",
        "tasks/s: median of the timed steps (meta_loss, backward, Adam). × reference: against the same",
        "algorithm as a plain per-task autograd loop (tests/reference.py). × supervised: against ordinary",
        "training of the same Conv-4 at its best batch size, in task-equivalents (W*S + W*Q images).",
        "RSS first → last: resident memory after the first and last timed step (after the warm-up steps).",
        "",
        f"| algorithm | how | tasks/s | × reference | × supervised | {memory} | RSS first → last step MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        how = {"learner": r.get("strategy"), "reference": "reference loop"}.get(r["kind"])
        how = how or f"supervised, batch {r.get('batch_size')}"
        name = r.get("algorithm", "(floor)")
        if "error" in r:
            lines.append(f"| {name} | {how} | error: {r['error']} | | | | |")
            continue
        ref = refs.get(r.get("algorithm"))
        x_ref = f"{r['tasks_per_s'] / ref['tasks_per_s']:.2f}" if ref and r["kind"] == "learner" else ""
        x_floor = f"{r['tasks_per_s'] / floor:.2f}" if floor else ""
        mem = r.get("peak_gpu_mb", r["peak_rss_mb"])
        growth = f"{r['rss_after_first_timed_step_mb']:.0f} → {r['rss_after_last_timed_step_mb']:.0f}"
        lines.append(
            f"| {name} | {how} | {r['tasks_per_s']:.2f} | {x_ref} | {x_floor} | {mem:.0f} | {growth} |"
        )
    return "\n".join(lines) + "\n"


def run_peers(args: argparse.Namespace) -> list[dict]:
    """Every implementation at every number of inner steps, alternating, ``--rounds`` times."""
    impls = args.impls.split(",")
    runs: dict[tuple[int, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for steps in (int(k) for k in args.inner_steps.split(",")):
            for impl in impls if round_index % 2 == 0 else impls[::-1]:
                result = run_child(args, {"kind": "peer", "impl": impl, "inner_steps": steps})
                runs.setdefault((steps, impl), []).append(result)
    rows = []
    for (steps, impl), results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            rows.append(results[0])
            continue
        rows.append(
            {
                "impl": impl,
                "inner_steps": steps,
                "tasks_per_s": round(statistics.median(r["tasks_per_s"] for r in good), 3),
                "tasks_per_s_per_round": [r["tasks_per_s"] for r in good],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
                **({"peak_gpu_mb": max(r["peak_gpu_mb"] for r in good)} if "peak_gpu_mb" in good[0] else {}),
                **({"ran": sorted({r["ran"] for r in good})} if "ran" in good[0] else {}),
            }
        )
    return rows


def peers_markdown(report: dict) -> str:
    meta, rows = report["meta"], report["results"]
    memory = "peak GPU MB" if meta["device"] == "cuda" else "peak RSS MB"
    lines = [
        f"# Second-order MAML, standard Conv-4, side by side ({meta['device']}, {meta['threads']} threads,"
        f" torch {meta['torch']})",
        "",
        f"{meta['tasks']} tasks of {meta['ways']}-way {meta['shots']}-shot {meta['queries']}-query per "
        f"meta-batch, 28x28 inputs, inner SGD α = {meta['inner_lr']}, {meta['hidden']} filters. "
        f"{meta['note']}".strip(),
        f"Load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']}. "
        f"{meta['rounds']} rounds, each process {meta['warmup']} warm-up + {meta['repeats']} timed steps.",
        "",
        "tasks/s: median over rounds of each process's median step (meta-gradient + Adam). × higher: "
        "ratio within this run. metaloop-auto: the strategy it measured as fastest in brackets.",
        "",
        f"| implementation | inner steps | tasks/s | × higher | {memory} | memory ÷ higher's |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    higher = {r["inner_steps"]: r for r in rows if r.get("impl") == "higher" and "error" not in r}
    for r in sorted(rows, key=lambda r: (r["inner_steps"], PEERS.index(r["impl"]))):
        name = r["impl"] + (
            f" ({', '.join(r['ran'])})" if r["impl"] == "metaloop-auto" and "ran" in r else ""
        )
        if "error" in r:
            lines.append(f"| {name} | {r['inner_steps']} | error: {r['error']} | | | |")
            continue
        ref = higher.get(r["inner_steps"])
        mem = r.get("peak_gpu_mb", r["peak_rss_mb"])
        ref_mem = ref.get("peak_gpu_mb", ref["peak_rss_mb"]) if ref else None
        speed = f"{r['tasks_per_s'] / ref['tasks_per_s']:.2f}" if ref else ""
        mem_ratio = f"{mem / ref_mem:.2f}" if ref_mem else ""
        lines.append(
            f"| {name} | {r['inner_steps']} | {r['tasks_per_s']:.2f} | {speed} | {mem:.0f} | {mem_ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per measurement")
    parser.add_argument("--suite", default="peers", choices=["peers", "algorithms"])
    parser.add_argument("--impls", default=",".join(PEERS), help="peers suite: implementations")
    parser.add_argument("--inner-steps", default="1,5", help="peers suite: inner steps, comma-separated")
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--rounds", type=int, default=2, help="peers suite: alternating rounds")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--supervised-batches", default="80,640")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    parser.add_argument("--note", default="", help="conditions to record, e.g. other load on the machine")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/throughput[_peers]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    keep_freed_memory()
    loadavg_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()
    if args.suite == "peers":
        results = run_peers(args)
        keys = ("tasks", "ways", "shots", "queries", "hidden", "threads", "device")
        keys += ("inner_lr", "warmup", "repeats", "rounds", "note")
        meta = run_meta(args, keys, loadavg_start, started)
        write_report(
            {"meta": meta, "results": results},
            args.out or "benchmarks/results/throughput_peers",
            peers_markdown,
        )
        return
    specs = [{"kind": "supervised", "batch_size": int(b)} for b in args.supervised_batches.split(",")]
    for algorithm in args.algorithms.split(","):
        specs.append({"kind": "reference", "algorithm": algorithm})
        specs += [
            {"kind": "learner", "algorithm": algorithm, "strategy": s} for s in args.strategies.split(",")
        ]
    results = [run_child(args, spec) for spec in specs]
    keys = ("tasks", "ways", "shots", "queries", "hidden", "threads", "device", "warmup", "repeats", "note")
    meta = run_meta(args, keys, loadavg_start, started)
    write_report({"meta": meta, "results": results}, args.out or "benchmarks/results/throughput", markdown)


def run_meta(args: argparse.Namespace, keys: tuple[str, ...], loadavg_start: str, started: float) -> dict:
    """What a report records about its run: the options ``keys``, the versions, the machine and its
    load at start and end, and the seconds the whole run took."""
    meta = {k: getattr(args, k) for k in keys}
    meta.update(
        torch=torch.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        loadavg_start=loadavg_start,
        loadavg_end=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        total_seconds=round(time.perf_counter() - started, 1),
    )
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def write_report(report: dict, out: str, render) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
