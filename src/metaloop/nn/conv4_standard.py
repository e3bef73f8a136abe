"""The standard Conv-4 of few-shot learning, functional (Vinyals et al. 2016, arXiv:1606.04080;
the network of most MAML comparisons, e.g. ``higher``'s and learn2learn's examples).

Four blocks of [3x3 convolution with padding 1, batch norm with the current batch's statistics,
ReLU, 2x2 max-pooling], then the flattened features and a linear head: a 28x28 image shrinks
28 -> 14 -> 7 -> 3 -> 1, so the head sees ``hidden`` features. The convolutions have no bias
(batch norm removes it). Unlike :class:`metaloop.nn.maml_conv.MamlConv4` (Finn et al.'s strided
Omniglot network) it keeps full resolution in the first block, about 6x the compute per image.
Not a registered backbone: build it and assign it to a learner's ``net`` (see
``benchmarks/throughput.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.nn.functional import TaskLinear, task_batch_norm, task_conv2d
from metaloop.nn.maml_conv import ConvBlock


class StandardConv4(nn.Module):
    """Input ``[n, C, H, W]`` (one task) or ``[T, n, C, H, W]`` (T tasks, parameters shared or with a
    leading ``T``, see :mod:`metaloop.nn.functional`); output ``[n, ways]`` or ``[T, n, ways]``.

    Args:
        in_channels: image channels (1 for Omniglot).
        hidden: filters per block (64).
        ways: logits of the head.
        image_size: input height = width (28), which fixes the head's input size.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, ways: int = 5, image_size: int = 28) -> None:
        super().__init__()
        self.hidden = hidden
        self.blocks = nn.ModuleList(ConvBlock(c, hidden) for c in (in_channels, hidden, hidden, hidden))
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 poolings (at least 16)")
        self.head = TaskLinear(hidden * side * side, ways)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features ``[(T,) n, hidden*h*w]`` of images ``[n, C, H, W]`` or ``[T, n, C, H, W]``."""
        single = x.dim() == 4
        if single:
            x = x.unsqueeze(0)
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])  # [n, T*C, H, W]
        for block in self.blocks:
            h = task_conv2d(h, block.conv, tasks, stride=1, padding=1)
            h = F.max_pool2d(F.relu(task_batch_norm(h, block.scale, block.shift, tasks)), 2)
        h = h.reshape(n, tasks, -1).transpose(0, 1)  # [T, n, hidden*h*w], channel-major per task
        return h[0] if single else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
