"""CAVIA (Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson, "Fast Context Adaptation via
Meta-Learning", ICML 2019, arXiv:1810.03642)."""

from __future__ import annotations

import torch

from metaloop.algorithms.gradient_based import GradientLearner, build_backbone
from metaloop.inner import Forward, Params, StepSize, detach_step_size


class CAVIA(GradientLearner):
    """Fast context adaptation: only a small context vector φ adapts in the inner loop.

    The network f(x; φ, θ) takes task-specific context parameters φ ∈ R^P besides its shared
    weights θ (ω = θ). For each task i, φ starts at 0 and takes K inner steps:

        φ_i = φ_0 − α ∇_φ L_support_i(φ_0, θ),    φ_0 = 0   (repeated K = ``inner_steps`` times)
        θ ← θ − β ∇_θ (1/T) Σ_i L_query_i(φ_i, θ)

    Second order by default (∇_θ goes through the inner gradients); ``first_order`` cuts them.
    The context enters the MLP by concatenation to the input (regression) and the Conv-4 by
    FiLM on its third block (images), see :mod:`metaloop.nn.mlp` and :mod:`metaloop.nn.maml_conv`.

    Args:
        backbone, in_channels, hidden, ways, inner_steps, eval_inner_steps, first_order, strategy:
            as for :class:`metaloop.algorithms.maml.MAML`.
        num_context_params: P (default 4 for mlp, 100 for conv4, as in the paper).
        inner_lr: α for φ (default 1.0, the paper's value for regression).
    """

    name = "cavia"
    bf16_safe = True
    defaults = {
        "conv4": {**GradientLearner.defaults["conv4"], "inner_lr": 1.0, "num_context_params": 100},
        "mlp": {**GradientLearner.defaults["mlp"], "inner_lr": 1.0, "num_context_params": 4},
    }

    def __init__(
        self,
        backbone: str = "conv4",
        in_channels: int = 1,
        hidden: int | None = None,
        ways: int | None = None,
        num_context_params: int | None = None,
        inner_lr: float | None = None,
        inner_steps: int | None = None,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        strategy: str = "auto",
    ) -> None:
        super().__init__(
            backbone=backbone,
            in_channels=in_channels,
            hidden=hidden,
            ways=ways,
            num_context_params=num_context_params,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            first_order=first_order,
            strategy=strategy,
        )
        h = self.hparams
        self.net = build_backbone(backbone, in_channels, h["hidden"], h["ways"], h["num_context_params"])

    def inner_problem(self, meta: bool) -> tuple[Forward, Params, StepSize]:
        """θ = {"context": φ_0 = zeros(P)}, fresh for every call (every task starts at 0)."""
        weight = next(self.net.parameters())
        context = torch.zeros(
            int(self.hparams["num_context_params"]), dtype=weight.dtype, device=weight.device
        )
        lr = float(self.hparams["inner_lr"])

        def forward(p: Params, x: torch.Tensor) -> torch.Tensor:
            return self.net(x, context=p["context"])

        return forward, {"context": context}, lr if meta else detach_step_size(lr)
