"""Operations on task-batched parameters, the building blocks of the functional backbones.

Each backbone here runs one task or T tasks at once. A parameter is either *shared* (its
ordinary shape, the same for every task) or *per task* (the ordinary shape with a leading
task dimension ``T``), so the inner loop can hold one set of adapted weights per task and
still run every task in a single call. Under ``torch.func.vmap`` the task dimension is
hidden and everything looks like one task.

Convolutional activations use the *grouped layout* ``[n, T*C, H, W]``: the tasks are folded
into the channels, so a convolution with per-task weights is one grouped convolution
(``groups=T``) and per-channel batch statistics are per task and per channel at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5


def per_task(param: torch.Tensor, tasks: int, dims: int) -> torch.Tensor:
    """``param`` as ``[T, *shape]``: per-task parameters (``dims + 1`` dims) pass through,
    shared ones (``dims`` dims) are expanded (a view, no copy)."""
    if param.dim() == dims + 1:
        return param
    return param.unsqueeze(0) if tasks == 1 else param.expand(tasks, *param.shape)


def channels(param: torch.Tensor, tasks: int) -> torch.Tensor:
    """A per-channel ``[C]`` or ``[T, C]`` parameter as ``[T*C]``, matching the grouped layout."""
    return param if param.dim() == 1 and tasks == 1 else per_task(param, tasks, 1).reshape(-1)


def task_conv2d(h: torch.Tensor, weight: torch.Tensor, tasks: int, stride: int, padding: int) -> torch.Tensor:
    """Convolution in the grouped layout.

    Args:
        h: ``[n, T*C_in, H, W]``.
        weight: ``[C_out, C_in, k, k]`` (shared) or ``[T, C_out, C_in, k, k]`` (per task).

    Returns:
        ``[n, T*C_out, H', W']``.
    """
    if weight.dim() == 4 and tasks == 1:
        return F.conv2d(h, weight, stride=stride, padding=padding)
    w = per_task(weight, tasks, 4).flatten(0, 1)  # [T*C_out, C_in, k, k]
    return F.conv2d(h, w, stride=stride, padding=padding, groups=tasks)


_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def under_functorch(h: torch.Tensor) -> bool:
    """True inside a ``torch.func`` transform (vmap, grad), where ``F.batch_norm`` is unsafe;
    also True if this torch cannot tell (then the safe path is always taken)."""
    return _is_wrapped is None or _is_wrapped(h)


def task_batch_norm(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, tasks: int) -> torch.Tensor:
    """Batch norm with the current batch's statistics.

    Statistics are taken per channel over the batch and the spatial positions of
    ``h`` ``[n, T*C, H, W]``, hence per task. There are no running statistics: train and
    test behave the same (transductive, as in MAML). ``scale``/``shift`` are ``[C]`` or
    ``[T, C]``. Inside ``torch.func`` transforms it is written from basic ops (two passes:
    mean, then mean squared deviation), because second-order gradients of the built-in op
    under ``torch.func.vmap`` are wrong in torch 2.13. Elsewhere the built-in op computes the
    same function 2-3x faster (its double backward in plain autograd is exact; the tests
    check both against an independent reference).
    """
    scale, shift = channels(scale, tasks), channels(shift, tasks)
    if not under_functorch(h):
        return F.batch_norm(h, None, None, scale, shift, training=True, eps=BN_EPS)
    mean = h.mean((0, 2, 3), keepdim=True)
    centred = h - mean
    var = centred.square().mean((0, 2, 3), keepdim=True)
    return centred * (torch.rsqrt(var + BN_EPS) * scale.view(1, -1, 1, 1)) + shift.view(1, -1, 1, 1)


def affine(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, tasks: int) -> torch.Tensor:
    """``h * scale + shift`` per channel of ``h`` ``[n, T*C, H, W]``; scale/shift ``[C]`` or ``[T, C]``."""
    return h * channels(scale, tasks).view(1, -1, 1, 1) + channels(shift, tasks).view(1, -1, 1, 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` where any of the three may carry a leading task dimension.

    Args:
        x: ``[n, in]`` or ``[T, n, in]``.
        weight: ``[out, in]`` or ``[T, out, in]``.
        bias: ``[out]`` or ``[T, out]``.

    Returns:
        ``[n, out]`` or ``[T, n, out]``.
    """
    if weight.dim() == 2 and bias.dim() == 1:
        return F.linear(x, weight, bias)
    return torch.matmul(x, weight.transpose(-1, -2)) + bias.unsqueeze(-2)


class TaskLinear(nn.Module):
    """A linear layer whose (functionally substituted) weights may be per task; see :func:`linear`.

    Initialised like ``nn.Linear``: weight and bias uniform in ``±1/sqrt(in_features)``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def head_names(model: nn.Module) -> list[str]:
    """Names of the parameters that form the model's ``head`` (the final classifier or
    regressor, the only part ANIL adapts): those of its ``head`` submodule."""
    return [f"head.{name}" for name, _ in model.head.named_parameters()]
