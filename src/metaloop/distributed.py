"""Multi-process meta-training with ``torch.distributed``, as launched by ``torchrun``.

``torchrun --nproc-per-node N -m metaloop train ...`` starts N processes (ranks) and describes
the group in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`process_group` joins it: backend ``nccl`` when the run's device is
CUDA (rank r then uses ``cuda:LOCAL_RANK``), ``gloo`` on the CPU. Without ``torchrun``, or with
``WORLD_SIZE=1``, every helper here is the identity of a one-process run, so callers need no
branches.

How the trainer uses it (data parallel over the tasks of a meta-batch):

- every rank draws the same T tasks (same seeded stream) and keeps its :func:`shard` of them;
- each rank's meta-loss is the mean over its T/W tasks, so the mean of the ranks' gradients
  (:func:`average_`) is the gradient of the mean over all T tasks, as one process computes it;
- floating-point buffers (batch-norm running statistics) are averaged the same way, so every
  rank holds the same state;
- evaluation episodes are sharded too and the per-episode values gathered
  (:func:`gather_chunks`), so mean ± CI are computed over the same episodes as one process;
- only rank 0 (:func:`is_main`) writes files.

A collective that fails (a peer died, or did not answer within ``timeout_s``) raises
:class:`DistributedError` naming the rank and the timeout, instead of hanging.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from metaloop.device import check_device

DEFAULT_TIMEOUT_S = 120.0
T = TypeVar("T")

_timeout_s = DEFAULT_TIMEOUT_S  # of the group joined by process_group(), for error messages


class DistributedError(RuntimeError):
    """The ranks of a run could not work together: a peer died or hung, or they disagree."""


# ----- who am I ------------------------------------------------------------------------------
def launched() -> bool:
    """True when a launcher (``torchrun``) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when this process is in an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: from the process group, else ``$RANK`` (set by torchrun), else 0."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of ranks: from the process group, else ``$WORLD_SIZE``, else 1."""
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on rank 0, the only rank that writes files and shows progress."""
    return rank() == 0


def local_device(device: str | torch.device) -> torch.device:
    """The device this rank computes on: ``"auto"`` is ``cuda`` when a GPU is visible, else
    ``cpu``; a CUDA run under torchrun uses ``cuda:$LOCAL_RANK`` (one GPU per rank). A name this
    machine cannot use raises :class:`metaloop.device.DeviceError`."""
    device = check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def backend_for(device: torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def shard(total: int) -> range:
    """Positions ``[r*total//W, (r+1)*total//W)`` of ``total`` items that rank r handles.

    Contiguous and in order; the ranks' shards partition ``range(total)`` (sizes differ by at
    most one; a shard is empty when ``total < W``).
    """
    r, w = rank(), world_size()
    return range(r * total // w, (r + 1) * total // w)


# ----- joining and leaving ---------------------------------------------------------------------
@contextmanager
def process_group(device: str | torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Join the process group that torchrun described in the environment, for the ``with`` block.

    Does nothing for a single process, or when a group is already initialised (then its owner
    leaves it). ``timeout_s`` bounds every collective: a rank that waits longer for a peer
    (dead, hung, or never started) raises :class:`DistributedError`.
    """
    if not launched() or active():
        yield
        return
    global _timeout_s
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        dist.init_process_group(
            backend_for(device),
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    except Exception as error:
        raise DistributedError(
            f"rank {rank()} of {world_size()} could not join the process group at {where} "
            f"within {timeout_s:g} s: {error}. Start every rank with the same torchrun command "
            "(same --nnodes, --nproc-per-node and rendezvous endpoint)."
        ) from error
    _timeout_s = timeout_s
    failed = True
    try:
        yield
        failed = False
    finally:
        try:
            if not failed:  # leave together: a rank tearing gloo down while a peer still talks aborts
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # after a failed collective the group may be unusable; keep that error
            if not failed:
                raise


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed collective into a :class:`DistributedError` a user can act on."""
    try:
        yield
    except DistributedError:
        raise
    except Exception as error:
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed: {error}. Another rank of this run "
            f"probably died (see its output above) or did not answer within the timeout of "
            f"{_timeout_s:g} s (config key dist_timeout_s); this rank stops too."
        ) from error


# ----- collectives (identities for one process) ---------------------------------------------
def barrier() -> None:
    """Wait until every rank gets here."""
    if active():
        with _collective("barrier"):
            dist.barrier()


def average_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in place.

    The tensors are flattened into one buffer per (dtype, device), so a step costs one
    all-reduce per kind of tensor rather than one per tensor.
    """
    if not active() or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    with _collective("averaging across ranks (all-reduce)"), torch.no_grad():
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world_size())
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def average_gradients_(module: torch.nn.Module, metrics: dict[str, float]) -> dict[str, float]:
    """Average ``.grad`` of every parameter, every floating-point buffer and ``metrics`` over ranks.

    Each rank's gradient is that of the mean loss over its shard of equal size, so the average
    is the gradient of the mean over the whole meta-batch. A parameter without a gradient on a
    rank counts as a zero gradient there; one without a gradient on every rank keeps ``None``.
    Returns the averaged metrics (same keys, same order on every rank).
    """
    if not active():
        return metrics
    params = [p for p in module.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    # [P + M]: 1.0 where a parameter has a gradient on this rank, then the metric values
    stats = torch.tensor(
        [float(p.grad is not None) for p in params] + list(metrics.values()),
        dtype=torch.float64,
        device=device,
    )
    average_([*grads, *buffers, stats])
    for p, grad, present in zip(params, grads, stats[: len(params)].tolist(), strict=True):
        if present > 0:
            p.grad = grad
    return dict(zip(metrics, stats[len(params) :].tolist(), strict=True))


def max_over_ranks(value: float, device: torch.device | str = "cpu") -> float:
    """The largest ``value`` any rank passes (``value`` itself in one process); ``device`` is
    the rank's device (CUDA under nccl)."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    with _collective("agreeing on a value across ranks (all-reduce max)"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def broadcast_module_(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (in place)."""
    if not active():
        return
    with _collective("broadcasting the model from rank 0"), torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def gather_objects(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    if not active():
        return [obj]
    everyone: list[Any] = [None] * world_size()
    with _collective("gathering from all ranks (all_gather_object)"):
        dist.all_gather_object(everyone, obj)
    return everyone


def gather_chunks(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Reassemble values computed chunk by chunk, each chunk sharded over ranks by :func:`shard`.

    ``chunks[c]`` holds this rank's values for its shard of chunk c (1-D). Returns, on every
    rank, the concatenation over chunks of the concatenation over ranks: the values in the
    order one process would have computed them, as one 1-D CPU tensor.
    """
    local = [c.detach().cpu() for c in chunks]
    everyone = gather_objects(local)
    return torch.cat([everyone[r][c] for c in range(len(local)) for r in range(len(everyone))])


def check_same(value: object, what: str) -> None:
    """Raise :class:`DistributedError` unless every rank passes an equal ``value``."""
    everyone = gather_objects(value)
    differing = [r for r, v in enumerate(everyone) if v != everyone[0]]
    if differing:
        raise DistributedError(
            f"ranks {differing} have a different {what} than rank 0; start every rank with the "
            "same command line, config and code"
        )


def on_main(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 only (others get ``None``); if it raises, every rank raises it.

    For work that only rank 0 may do (writing the run folder) but whose failure must stop all
    ranks together rather than leave them waiting for rank 0.
    """
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as caught:
            error = caught
    box: list[Any] = [_picklable(error)]
    with _collective("sharing rank 0's outcome (broadcast)"):
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise box[0]
    return result


def _picklable(error: Exception | None) -> Exception | None:
    """``error`` itself if it survives pickling, else a :class:`DistributedError` with its text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return DistributedError(f"rank 0 failed: {type(error).__name__}: {error}")
