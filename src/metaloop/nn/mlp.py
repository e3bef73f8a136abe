"""The MLP of MAML's sinusoid experiments (Finn et al. 2017, arXiv:1703.03400, section 5.1), functional.

1 -> 40 -> 40 -> 1 with ReLU. Initialised like ``nn.Linear`` (uniform ``±1/sqrt(fan_in)``),
not with Finn's truncated normal of std 0.01, which learns more slowly in PyTorch ports.

With ``num_context_params > 0`` (CAVIA, Zintgraf et al. 2019, arXiv:1810.03642) the context
vector φ is concatenated to the input, as in CAVIA's regression experiments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.nn.functional import TaskLinear


class MLP(nn.Module):
    """A ReLU MLP that works with ``torch.func.functional_call``.

    Args:
        in_features: input size (1 for sinusoid), not counting the context.
        hidden: width of each hidden layer (40 in MAML).
        out_features: outputs of the head.
        layers: hidden layers (2 in MAML).
        num_context_params: size of CAVIA's context vector, concatenated to the input.

    Input ``[n, in]`` (one task) or ``[T, n, in]`` (T tasks; any parameter may then carry a
    leading ``T``); output ``[n, out]`` or ``[T, n, out]``. ``context`` is ``[P]`` or ``[T, P]``.
    """

    def __init__(
        self,
        in_features: int = 1,
        hidden: int = 40,
        out_features: int = 1,
        layers: int = 2,
        num_context_params: int = 0,
    ) -> None:
        super().__init__()
        self.num_context_params = num_context_params
        sizes = [in_features + num_context_params] + [hidden] * layers
        self.layers = nn.ModuleList(TaskLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.head = TaskLinear(hidden, out_features)

    def features(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden activations ``[..., n, hidden]`` of inputs ``[..., n, in]``."""
        if self.num_context_params:
            if context is None:
                raise ValueError("this network takes a context: pass context [P] or [T, P]")
            context = context.unsqueeze(-2).expand(*x.shape[:-1], self.num_context_params)
            x = torch.cat([x, context], dim=-1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return x

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x, context))
