"""ResNet-12, the backbone of most few-shot results since 2018 (TADAM, Oreshkin et al. 2018;
MetaOptNet, Lee et al. 2019, arXiv:1904.03758; FEAT; Meta-Baseline).

Four residual blocks of widths 64-160-320-640. A block: three 3x3 convolutions (no bias), each
followed by batch norm, with LeakyReLU(0.1) after the first two; a shortcut of a 1x1 convolution
and batch norm; LeakyReLU(0.1) after the sum; 2x2 max-pooling. The embedding is the mean over the
remaining spatial positions, ``[B, 640]``. Optional DropBlock (Ghiasi, Lin & Le, NeurIPS 2018,
arXiv:1810.12890) in the last two blocks, as MetaOptNet.

Two versions: :class:`ResNet12`, an ordinary module for the embedding learners (batch norm
with running statistics), and :class:`MamlResNet12`, functional like
:class:`metaloop.nn.maml_conv.MamlConv4` for the optimisation-based learners (per-task
parameters, batch statistics of each task's batch, a linear head, optional FiLM context for CAVIA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.nn.functional import TaskLinear, affine, linear, task_batch_norm, task_conv2d

WIDTHS = (64, 160, 320, 640)
SLOPE = 0.1  # LeakyReLU's negative slope


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """``widths`` as a tuple of four positive ints, or ``ValueError``."""
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(
            f"resnet12 takes four positive block widths, e.g. {list(WIDTHS)}; got {list(widths)}"
        )
    return widths


def drop_block(h: torch.Tensor, drop_rate: float, block_size: int) -> torch.Tensor:
    """DropBlock: zero square ``block_size`` patches of ``h`` ``[n, C, H, W]`` (per example and
    channel) so that about ``drop_rate`` of the positions are dropped, and rescale the rest."""
    size = min(block_size, h.shape[-1], h.shape[-2])
    valid = (h.shape[-2] - size + 1) * (h.shape[-1] - size + 1)
    gamma = drop_rate / size**2 * h.shape[-2] * h.shape[-1] / valid
    centres = torch.zeros_like(h)
    inner = centres[..., : h.shape[-2] - size + 1, : h.shape[-1] - size + 1]
    inner.bernoulli_(gamma)
    dropped = F.max_pool2d(F.pad(centres, (size - 1, 0, size - 1, 0)), size, stride=1)
    keep = 1 - dropped
    return h * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResidualBlock(nn.Module):
    """One ResNet-12 block, ``[n, C_in, H, W]`` -> ``[n, C_out, H // 2, W // 2]``."""

    def __init__(
        self, in_channels: int, out_channels: int, drop_rate: float = 0.0, block_size: int = 5
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.drop_rate, self.block_size = drop_rate, block_size
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut[0]):
            nn.init.kaiming_normal_(conv.weight, a=SLOPE, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), SLOPE)
        h = F.leaky_relu(self.bn2(self.conv2(h)), SLOPE)
        h = self.bn3(self.conv3(h))
        h = F.max_pool2d(F.leaky_relu(h + self.shortcut(x), SLOPE), 2)
        if self.training and self.drop_rate > 0:
            h = drop_block(h, self.drop_rate, self.block_size)
        return h


class ResNet12(nn.Module):
    """ResNet-12 embedding: images ``[B, C, H, W]`` -> ``[B, widths[-1]]`` (640 by default).

    Args:
        in_channels: image channels.
        widths: the four blocks' widths (64, 160, 320, 640); narrower ones train faster.
        drop_rate: DropBlock's drop rate in blocks 3 and 4 while training (0: off; MetaOptNet 0.1).
        block_size: DropBlock's block size (5, clipped to the feature map).
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = WIDTHS,
        drop_rate: float = 0.0,
        block_size: int = 5,
    ) -> None:
        super().__init__()
        widths = check_widths(widths)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        ins = (in_channels, *widths[:-1])
        self.blocks = nn.Sequential(
            *(
                ResidualBlock(c_in, c_out, drop_rate if i >= 2 else 0.0, block_size)
                for i, (c_in, c_out) in enumerate(zip(ins, widths, strict=True))
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean((2, 3))


class FunctionalBlock(nn.Module):
    """Parameters of one block of :class:`MamlResNet12`: ``conv1..3``, ``shortcut`` (weights),
    and batch-norm ``scale1..3``, ``shortcut_scale`` (ones), ``shift1..3``, ``shortcut_shift`` (zeros)."""

    norm_parameter_names = tuple(
        f"{kind}{name}" for name in ("1", "2", "3", "_shortcut") for kind in ("scale", "shift")
    )

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()

        def conv(c_in: int, k: int) -> nn.Parameter:
            weight = torch.empty(out_channels, c_in, k, k)
            return nn.Parameter(
                nn.init.kaiming_normal_(weight, a=SLOPE, mode="fan_out", nonlinearity="leaky_relu")
            )

        self.conv1, self.conv2, self.conv3 = (
            conv(in_channels, 3),
            conv(out_channels, 3),
            conv(out_channels, 3),
        )
        self.shortcut = conv(in_channels, 1)
        for name in ("1", "2", "3", "_shortcut"):
            self.register_parameter(f"scale{name}", nn.Parameter(torch.ones(out_channels)))
            self.register_parameter(f"shift{name}", nn.Parameter(torch.zeros(out_channels)))


class MamlResNet12(nn.Module):
    """ResNet-12 for optimisation-based meta-learning; works with ``torch.func.functional_call``.

    Input ``[n, C, H, W]`` (one task) or ``[T, n, C, H, W]`` (T tasks; any parameter may then carry
    a leading ``T``, see :mod:`metaloop.nn.functional`); output ``[n, ways]`` or ``[T, n, ways]``.
    Batch norm takes the statistics of each task's batch (transductive, as MAML). With
    ``num_context_params > 0`` a context φ ``[P]`` or ``[T, P]`` modulates the output of block
    ``film_layer`` by FiLM, ``h <- h * (1 + γ) + β``, as :class:`metaloop.nn.maml_conv.MamlConv4`.

    Args:
        in_channels: image channels.
        ways: logits of the head.
        widths: the four blocks' widths (64, 160, 320, 640).
        num_context_params: CAVIA's context size (0: no FiLM layer).
        film_layer: the block (0..3) that the context modulates.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ways: int = 5,
        widths: Sequence[int] = WIDTHS,
        num_context_params: int = 0,
        film_layer: int = 2,
    ) -> None:
        super().__init__()
        widths = check_widths(widths)
        if not 0 <= film_layer < 4:
            raise ValueError(f"film_layer must be a block index in 0..3, got {film_layer}")
        self.widths, self.film_layer = widths, film_layer
        ins = (in_channels, *widths[:-1])
        self.blocks = nn.ModuleList(FunctionalBlock(a, b) for a, b in zip(ins, widths, strict=True))
        self.film = TaskLinear(num_context_params, 2 * widths[film_layer]) if num_context_params else None
        if self.film is not None:
            nn.init.zeros_(self.film.bias)
        self.head = TaskLinear(widths[-1], ways)

    def features(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings ``[(T,) n, widths[-1]]`` of images ``[n, C, H, W]`` or ``[T, n, C, H, W]``."""
        single = x.dim() == 4
        if single:
            x = x.unsqueeze(0)
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])  # [n, T*C, H, W]
        for index, b in enumerate(self.blocks):
            out = F.leaky_relu(
                task_batch_norm(task_conv2d(h, b.conv1, tasks, 1, 1), b.scale1, b.shift1, tasks), SLOPE
            )
            out = F.leaky_relu(
                task_batch_norm(task_conv2d(out, b.conv2, tasks, 1, 1), b.scale2, b.shift2, tasks), SLOPE
            )
            out = task_batch_norm(task_conv2d(out, b.conv3, tasks, 1, 1), b.scale3, b.shift3, tasks)
            skip = task_batch_norm(
                task_conv2d(h, b.shortcut, tasks, 1, 0), b.scale_shortcut, b.shift_shortcut, tasks
            )
            out = out + skip
            if index == self.film_layer and self.film is not None:
                if context is None:
                    raise ValueError("this network has a FiLM layer: pass context [P] or [T, P]")
                gamma, beta = linear(context, self.film.weight, self.film.bias).chunk(2, dim=-1)
                out = affine(out, 1 + gamma, beta, tasks)
            h = F.max_pool2d(F.leaky_relu(out, SLOPE), 2)
        h = h.mean((2, 3)).view(n, tasks, self.widths[-1]).transpose(0, 1)  # [T, n, D]
        return h[0] if single else h

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x, context))
