"""The standard few-shot Conv-4 backbone (Vinyals et al. 2016; Snell et al. 2017; Finn et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 -> batch norm -> ReLU -> max-pool 2: halves height and width."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


NORM_SCALE_INITS = ("ones", "uniform")


class Conv4(nn.Module):
    """Four conv blocks of ``hidden`` filters, flattened into an embedding.

    Input ``[B, C, H, W]``; output ``[B, hidden * (H // 16) * (W // 16)]`` (64 for 28x28
    Omniglot with 64 filters). ``embedding_dim(image_shape)`` computes that size.

    Args:
        in_channels: image channels (1 for Omniglot).
        hidden: filters per block (64).
        norm_scale_init: the batch-norm scales γ at the start: ``"ones"`` (PyTorch since 1.0) or
            ``"uniform"``, drawn from U(0, 1) as PyTorch did before 1.0 (pytorch/pytorch#12325), so in
            the 2017 papers' own code (Snell et al.'s ProtoNet among them).
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, norm_scale_init: str = "ones") -> None:
        super().__init__()
        if norm_scale_init not in NORM_SCALE_INITS:
            raise ValueError(
                f"norm_scale_init must be one of {', '.join(NORM_SCALE_INITS)}; got {norm_scale_init!r}"
            )
        self.hidden = hidden
        self.blocks = nn.Sequential(
            conv_block(in_channels, hidden),
            conv_block(hidden, hidden),
            conv_block(hidden, hidden),
            conv_block(hidden, hidden),
        )
        if norm_scale_init == "uniform":
            for block in self.blocks:
                nn.init.uniform_(block[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).flatten(1)

    def embedding_dim(self, image_shape: tuple[int, int, int]) -> int:
        _, h, w = image_shape
        for _ in range(4):
            h, w = h // 2, w // 2
        return self.hidden * h * w
