"""Networks a user might bring, importable by path (``user_networks:residual_net``) once ``tests/`` is
on ``sys.path`` (pytest puts it there; subprocesses get it through PYTHONPATH)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualNet(nn.Module):
    """conv -> batch norm -> ReLU, a residual conv block, global mean, linear head: ``[n, C, H, W]`` ->
    ``[n, ways]``. Its batch norms are ordinary ``nn.BatchNorm2d`` layers."""

    def __init__(self, in_channels: int = 1, width: int = 4, ways: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.fc = nn.Linear(width, ways)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.block(h))
        return h.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class Encoder(nn.Module):
    """The body of :class:`ResidualNet` as an embedding, ``[n, C, H, W]`` -> ``[n, width]``."""

    def __init__(self, in_channels: int = 1, width: int = 4) -> None:
        super().__init__()
        self.body = ResidualNet(in_channels, width, ways=1)
        del self.body.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.features(x)


class TokenTransformer(nn.Module):
    """A small Transformer encoder over token sequences ``[n, L]`` (int64) -> ``[n, ways]`` logits."""

    def __init__(self, vocab: int = 7, d_model: int = 8, ways: int = 3, length: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(length, d_model) * 0.1)
        self.layer = nn.TransformerEncoderLayer(d_model, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, ways)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.embed(tokens) + self.position)
        return self.head(h.mean(1))


class ContextNet(nn.Module):
    """A network that takes CAVIA's context: ``forward(x, context)``, the context concatenated to the
    flattened image."""

    def __init__(self, in_features: int = 256, num_context_params: int = 2, ways: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features + num_context_params, 8)
        self.head = nn.Linear(8, ways)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        h = torch.cat([x, context.expand(x.shape[0], -1)], 1)
        return self.head(F.relu(self.hidden(h)))


def residual_net(in_channels: int = 1, width: int = 4, ways: int = 3) -> nn.Module:
    return ResidualNet(in_channels, width, ways)


def encoder(in_channels: int = 1, width: int = 4) -> nn.Module:
    return Encoder(in_channels, width)


def not_a_network() -> str:
    return "a string, not a module"
