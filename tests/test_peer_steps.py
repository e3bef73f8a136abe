"""The benchmark's task-parallel plain loop (``plain-threads``) takes the same MAML step as the
sequential plain loop it is compared with (``benchmarks/peer_steps.py``)."""

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from gradient_helpers import image_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peer_steps  # noqa: E402


def meta_gradient(maker: Callable) -> list[torch.Tensor]:
    """The meta-gradient one outer step (2 inner steps, 5 tasks of 16x16 images, float64) left."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        step = maker(8, 3, 0.4, 2)
        step(image_batch(tasks=5))
    finally:
        torch.set_default_dtype(default)
    return [p.grad for p in step.model.parameters()]


def test_task_parallel_loop_computes_the_sequential_loops_meta_gradient():
    threads, sequential = meta_gradient(peer_steps.plain_threads_step), meta_gradient(peer_steps.plain_step)
    assert all(g.abs().max() > 1e-4 for g in sequential)
    for a, b in zip(threads, sequential, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
