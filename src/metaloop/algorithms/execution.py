"""How a gradient-based learner executes a meta-batch: in chunks of tasks, each chunk's graph freed
by its own ``backward()``, and with which strategy (:mod:`metaloop.inner`).

Memory: the autograd graph of a second-order inner loop holds every activation of every inner
step of every task until ``backward()``. Going through the tasks a chunk at a time and calling
``backward()`` on each chunk's share of the mean loss keeps one chunk's graph alive instead of
the batch's; the gradients add up to the same meta-gradient (up to float rounding, in a fixed
order). The chunk size of ``"batched"`` and ``"vmap"`` comes from :func:`graph_bytes`: the bytes
of the tensors that one task's graph saves for backward, measured on the first task.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
DEFAULT_MEMORY_BUDGET_MB = 256.0


def graph_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and the bytes of the distinct storages its autograd graph saved for backward
    (activations, inputs and weights kept for the backward pass; not the transient tensors)."""
    storages: dict[tuple[int, str], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            storages[(storage.data_ptr(), str(tensor.device))] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # wrapped tensors inside torch.func transforms
            pass
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, sum(storages.values())


def chunk_size(
    strategy: str, tasks: int, max_task_chunk: int | None, task_bytes: int | None, budget_mb: float | None
) -> int:
    """Tasks per chunk: 1 for ``"loop"`` (it runs tasks one at a time anyway); for ``"batched"`` and
    ``"vmap"`` ``max_task_chunk`` if given, else as many tasks as fit ``budget_mb`` (default
    :data:`DEFAULT_MEMORY_BUDGET_MB`) at ``task_bytes`` each (all of them when unknown)."""
    if strategy == "loop":
        return 1
    if max_task_chunk is not None:
        if max_task_chunk < 1:
            raise ValueError(
                f"max_task_chunk must be a positive number of tasks or None, got {max_task_chunk}"
            )
        return min(tasks, max_task_chunk)
    if not task_bytes:
        return tasks
    budget = (DEFAULT_MEMORY_BUDGET_MB if budget_mb is None else budget_mb) * 2**20
    return max(1, min(tasks, int(budget // task_bytes)))


def device_key(device: torch.device) -> str:
    """What a speed measurement depends on besides the computation: the device and its threads."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}:{torch.get_num_threads()}threads"
