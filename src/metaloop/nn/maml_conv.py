"""The Conv-4 of MAML's Omniglot experiments (Finn et al. 2017, arXiv:1703.03400), functional.

Four blocks of [3x3 convolution with stride 2 and padding 1, batch norm, ReLU], then the
mean over the remaining spatial positions and a linear head to ``ways`` logits. This follows
Finn's Omniglot model (strided convolutions, no max-pooling, spatial mean at the end): a
28x28 image shrinks 28 -> 14 -> 7 -> 4 -> 2. The convolutions have no bias (batch norm
removes it). Batch norm uses the current batch's statistics at train and test time
(transductive, as in MAML) with a learnable scale and shift; see
:func:`metaloop.nn.functional.task_batch_norm`.

With ``num_context_params > 0`` (CAVIA, Zintgraf et al. 2019, arXiv:1810.03642) a context
vector φ modulates block ``film_layer`` by FiLM after its batch norm:
``h <- h * (1 + γ) + β`` with ``[γ, β] = W_film φ + b_film``. ``b_film`` starts at 0, so
φ = 0 is the identity (CAVIA's code multiplies by γ directly; the ``1 +`` keeps φ = 0 neutral).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.nn.functional import TaskLinear, affine, linear, task_batch_norm, task_conv2d


class ConvBlock(nn.Module):
    """Parameters of one block: ``conv`` ``[C_out, C_in, 3, 3]`` (Xavier-uniform, as in Finn's
    code), batch-norm ``scale`` ``[C_out]`` (ones) and ``shift`` ``[C_out]`` (zeros)."""

    norm_parameter_names = ("scale", "shift")  # the batch norm's affine parameters (see task_norm)

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Parameter(nn.init.xavier_uniform_(torch.empty(out_channels, in_channels, 3, 3)))
        self.scale = nn.Parameter(torch.ones(out_channels))
        self.shift = nn.Parameter(torch.zeros(out_channels))


class MamlConv4(nn.Module):
    """Conv-4 for optimisation-based meta-learning; works with ``torch.func.functional_call``.

    Args:
        in_channels: image channels (1 for Omniglot).
        hidden: filters per block (64 for Omniglot).
        ways: logits of the head.
        num_context_params: size of CAVIA's context vector (0: no FiLM layer).
        film_layer: the block (0..3) that the context modulates.

    Input ``[n, C, H, W]`` (one task, every parameter shared) or ``[T, n, C, H, W]`` (T tasks;
    any parameter may then carry a leading ``T``, see :mod:`metaloop.nn.functional`);
    output ``[n, ways]`` or ``[T, n, ways]``. ``context`` is ``[P]`` or ``[T, P]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        ways: int = 5,
        num_context_params: int = 0,
        film_layer: int = 2,
    ) -> None:
        super().__init__()
        if not 0 <= film_layer < 4:
            raise ValueError(f"film_layer must be a block index in 0..3, got {film_layer}")
        self.hidden, self.film_layer = hidden, film_layer
        self.blocks = nn.ModuleList(ConvBlock(c, hidden) for c in (in_channels, hidden, hidden, hidden))
        self.film = TaskLinear(num_context_params, 2 * hidden) if num_context_params else None
        if self.film is not None:
            nn.init.zeros_(self.film.bias)
        self.head = TaskLinear(hidden, ways)

    def features(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings ``[(T,) n, hidden]`` of images ``[n, C, H, W]`` or ``[T, n, C, H, W]``."""
        single = x.dim() == 4
        if single:
            x = x.unsqueeze(0)
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])  # [n, T*C, H, W]
        for index, block in enumerate(self.blocks):
            h = task_conv2d(h, block.conv, tasks, stride=2, padding=1)
            h = task_batch_norm(h, block.scale, block.shift, tasks)
            if index == self.film_layer and self.film is not None:
                if context is None:
                    raise ValueError("this network has a FiLM layer: pass context [P] or [T, P]")
                gamma, beta = linear(context, self.film.weight, self.film.bias).chunk(2, dim=-1)
                h = affine(h, 1 + gamma, beta, tasks)
            h = F.relu(h)
        h = h.mean((2, 3)).view(n, tasks, self.hidden).transpose(0, 1)  # [T, n, hidden]
        return h[0] if single else h

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x, context))
