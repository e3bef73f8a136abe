"""Batch norm with the statistics of each task, for networks that are plain ``nn.Module`` s.

Two uses, two rules:

- Embedding learners (ProtoNet, Siamese, the transfer baseline, attention) keep ordinary
  ``nn.BatchNorm2d`` layers with running statistics for test time. While meta-training, the T tasks
  of a meta-batch pass through the encoder as one batch ``[T*n, ...]`` (task-major), and
  :func:`statistics_per_task` makes every batch-norm layer take its statistics per task
  (:func:`task_batch_norm`): a task's embedding then does not depend on which other tasks share
  its meta-batch, so a meta-batch split over processes computes what one process computes.
- Optimisation-based learners (MAML and its family) over a user's network replace its batch-norm
  layers by :class:`TaskBatchNorm` (:func:`swap_norms`): the statistics of the batch it is
  given, at training and test time alike (transductive, as MAML's Conv-4,
  :mod:`metaloop.nn.maml_conv`), written from basic operations inside ``torch.func`` transforms,
  where the built-in op's second-order gradient under ``vmap`` is wrong (torch 2.13).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from metaloop.nn.functional import under_functorch


def task_batch_norm(bn: _BatchNorm, h: torch.Tensor, tasks: int) -> torch.Tensor:
    """``bn`` applied to ``h`` ``[T*n, C, ...]`` (T tasks of n examples, task-major) with batch
    statistics per task while training; ``[T*n, C, ...]`` out.

    The T tasks become T groups of channels of one ``F.batch_norm`` call (``[n, T*C, ...]``),
    so the statistics of channel c of task t are over that task's n examples only. The running
    statistics move once, towards the mean over tasks of the per-task mean and (unbiased)
    variance; for T = 1 this is exactly ``bn(h)``. In eval mode it is ``bn(h)``.
    """
    if not bn.training:
        return type(bn).forward(bn, h)  # the class's forward: this function may be bn's own forward
    # T = 1 goes the same way rather than through bn(h): on the CPU, bn(h) saves the running-statistics
    # buffers for its backward, so a later in-place update of them (another forward before backward,
    # as for tasks of unequal shapes) would break that backward.
    n, c, rest = h.shape[0] // tasks, h.shape[1], h.shape[2:]
    x = h.view(tasks, n, c, *rest).transpose(0, 1).reshape(n, tasks * c, *rest)  # [n, T*C, ...]
    momentum = bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm does
            momentum = 1.0 / float(bn.num_batches_tracked)
    tracking = bn.track_running_stats and bn.running_mean is not None
    # [T*C] copies of the running statistics: F.batch_norm moves copy t towards task t's statistics
    running_mean = bn.running_mean.repeat(tasks) if tracking else None
    running_var = bn.running_var.repeat(tasks) if tracking else None
    weight = bn.weight.repeat(tasks) if bn.weight is not None else None
    bias = bn.bias.repeat(tasks) if bn.bias is not None else None
    out = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum or 0.0, bn.eps)
    if tracking:
        with torch.no_grad():
            bn.running_mean.copy_(running_mean.view(tasks, c).mean(0))
            bn.running_var.copy_(running_var.view(tasks, c).mean(0))
    return out.view(n, tasks, c, *rest).transpose(0, 1).reshape(tasks * n, c, *rest)


def _conv_with_fixed_bias(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """``conv(h)`` with its bias used but cut from the graph (see :func:`statistics_per_task`)."""
    return conv._conv_forward(h, conv.weight, conv.bias.detach())


@contextmanager
def statistics_per_task(encoder: nn.Module, tasks: int) -> Iterator[None]:
    """Within the block, ``encoder`` on ``[T*n, ...]`` takes batch-norm statistics per task.

    Every batch-norm layer runs :func:`task_batch_norm`. The bias of a convolution that feeds
    straight into a batch norm (the next layer of an ``nn.Sequential``) is used but not trained:
    batch norm subtracts the batch mean, so the loss does not depend on that bias and its true
    gradient is zero. The float32 gradient is rounding noise (~1e-9), which Adam would normalise
    into steps of about ``lr`` in random directions: a random walk that changes nothing while
    training, drags the running means along (so test-time outputs drift), and makes a run depend
    on how its sums were ordered (threads, processes).
    """
    patched: list[nn.Module] = []
    for module in encoder.modules():
        if isinstance(module, _BatchNorm):
            module.forward = partial(task_batch_norm, module, tasks=tasks)
            patched.append(module)
        elif isinstance(module, nn.Sequential):
            layers = list(module)
            for layer, following in zip(layers[:-1], layers[1:], strict=True):
                if (
                    isinstance(layer, nn.Conv2d)
                    and layer.bias is not None
                    and isinstance(following, _BatchNorm)
                ):
                    layer.forward = partial(_conv_with_fixed_bias, layer)
                    patched.append(layer)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def encode_tasks(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Embeddings ``[T, n, D]`` of images ``[T, n, C, H, W]``, batch norm per task while training
    (:func:`statistics_per_task`). ``encoder`` maps ``[B, C, H, W]`` to ``[B, D]``."""
    tasks, n = images.shape[:2]
    with statistics_per_task(encoder, tasks):
        z = encoder(images.flatten(0, 1))  # [T*n, D]
    return z.reshape(tasks, n, -1)


class TaskBatchNorm(nn.Module):
    """Batch norm over the batch it is given, always: no running statistics are used.

    Takes the place of a ``_BatchNorm`` layer ``bn`` of a user's network in the optimisation-based
    learners (see the module docstring): the same affine parameters ``weight`` and ``bias`` (the
    same tensors), and ``bn``'s running-statistics buffers kept unused, so the network's state dict
    keeps its keys and pretrained weights load either way. Input ``[n, C, ...]``, statistics per
    channel over every other dimension.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buffer = getattr(bn, name, None)
            if buffer is not None:
                self.register_buffer(name, buffer)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not under_functorch(h):
            return F.batch_norm(h, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dims = [0, *range(2, h.dim())]
        shape = [1, -1] + [1] * (h.dim() - 2)
        mean = h.mean(dims, keepdim=True)
        centred = h - mean
        out = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        return out + self.bias.view(shape) if self.bias is not None else out


class ExactLayerNorm(nn.Module):
    """Layer norm that is exact to second order under ``torch.func.vmap``.

    Takes the place of an ``nn.LayerNorm`` ``ln`` of a user's network in the optimisation-based
    learners, over the same ``weight`` and ``bias`` (same tensors, same state-dict keys). Outside
    ``torch.func`` transforms it is ``F.layer_norm``; inside, written from basic operations: the
    built-in op's second-order meta-gradient under ``vmap`` was wrong by about 2e-4 in float64
    (torch 2.13, an embedding + layer norm MAML network; the per-task loop agreed with an
    independent reference to 1e-17).
    """

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape, self.eps = tuple(ln.normalized_shape), ln.eps
        self.weight, self.bias = ln.weight, ln.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not under_functorch(h):
            return F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps)
        dims = tuple(range(-len(self.normalized_shape), 0))
        centred = h - h.mean(dims, keepdim=True)
        out = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight
        return out + self.bias if self.bias is not None else out


# Normalisation layers whose second derivative under torch.func.vmap is not checked here: a network
# holding one is refused the vmap strategy.
UNCHECKED_UNDER_VMAP = (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def swap_norms(network: nn.Module) -> int:
    """Replace (in place) every ``_BatchNorm`` of ``network`` by a :class:`TaskBatchNorm` and every
    ``nn.LayerNorm`` by an :class:`ExactLayerNorm`, over the same parameters; returns how many."""
    swapped = 0
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(module, name, TaskBatchNorm(child))
            elif isinstance(child, nn.LayerNorm):
                setattr(module, name, ExactLayerNorm(child))
            else:
                continue
            swapped += 1
    return swapped


def vmap_refusal(network: nn.Module) -> str | None:
    """Why ``torch.func.vmap`` over tasks may give this network wrong meta-gradients, or None."""
    for name, module in network.named_modules():
        if isinstance(module, UNCHECKED_UNDER_VMAP):
            return (
                f"its {type(module).__name__} layer {name!r} may have a wrong second derivative under "
                "torch.func.vmap (the built-in batch and layer norms do, in torch 2.13)"
            )
    return None


def norm_parameter_names(network: nn.Module) -> list[str]:
    """Names (in ``network``) of its batch norms' affine parameters: those a built-in block declares in
    ``norm_parameter_names`` (conv4, resnet12) and the weight and bias of each :class:`TaskBatchNorm`
    (a user's network after :func:`swap_norms`), in the order of ``named_parameters``."""
    found = set()
    for prefix, module in network.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, TaskBatchNorm):
            local = [name for name in ("weight", "bias") if getattr(module, name) is not None]
        else:
            local = list(getattr(module, "norm_parameter_names", ()))
        found.update(dot + name for name in local)
    return [name for name, _ in network.named_parameters() if name in found]
