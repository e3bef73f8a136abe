"""Is episode sampling a bottleneck? Episodes/s of sampling alone vs full ProtoNet training steps.

Both are measured in the same process, interleaved, so the ratio holds on a noisy shared machine.

    python benchmarks/sampling.py --dataset omniglot --ways 60 --shots 1 --queries 5
writes benchmarks/results/sampling.json (and prints it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from metaloop.algorithms import ProtoNet
from metaloop.allocator import keep_freed_memory
from metaloop.data import load_dataset
from metaloop.tasks import EpisodeSampler


def time_sampling(sampler: EpisodeSampler, episodes: int) -> float:
    start = time.perf_counter()
    for _ in range(episodes):
        sampler.sample(1)
    return time.perf_counter() - start


def time_training(
    sampler: EpisodeSampler, learner: ProtoNet, optimizer: torch.optim.Optimizer, steps: int
) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = learner.meta_loss(sampler.sample(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="omniglot")
    parser.add_argument("--split", default="train")
    parser.add_argument("--ways", type=int, default=60)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (sampling, training)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--out", default="benchmarks/results/sampling.json")
    args = parser.parse_args()

    keep_freed_memory()
    dataset = load_dataset(args.dataset, args.split)
    sampler = EpisodeSampler(dataset, args.ways, args.shots, args.queries, seed=0)
    torch.manual_seed(0)
    learner = ProtoNet(in_channels=dataset.image_shape[0])
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    time_training(sampler, learner, optimizer, 3)  # warm-up
    sample_seconds = train_seconds = 0.0
    sample_episodes = 10 * args.steps
    for _ in range(args.rounds):
        sample_seconds += time_sampling(sampler, sample_episodes)
        train_seconds += time_training(sampler, learner, optimizer, args.steps)
    sampling_rate = args.rounds * sample_episodes / sample_seconds
    training_rate = args.rounds * args.steps / train_seconds
    result = {
        "benchmark": "episode sampling vs ProtoNet training step",
        "dataset": f"{args.dataset}/{args.split}",
        "classes": dataset.num_classes,
        "episode": {"ways": args.ways, "shots": args.shots, "queries": args.queries},
        "sampling_episodes_per_s": round(sampling_rate, 1),
        "training_steps_per_s": round(training_rate, 2),
        "sampling_share_of_a_training_step": round(training_rate / sampling_rate, 4),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
