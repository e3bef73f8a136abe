"""CAVIA (Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson, "Fast Context Adaptation via
Meta-Learning", ICML 2019, arXiv:1810.03642)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from metaloop.algorithms.gradient_based import GradientLearner
from metaloop.inner import Forward, Params, StepSize, detach_step_size


class CAVIA(GradientLearner):
    """Fast context adaptation: only a small context vector φ adapts in the inner loop.

    The network f(x; φ, θ) takes task-specific context parameters φ ∈ R^P besides its shared
    weights θ (ω = θ). For each task i, φ starts at 0 and takes K inner steps:

        φ_i = φ_0 − α ∇_φ L_support_i(φ_0, θ),    φ_0 = 0   (repeated K = ``inner_steps`` times)
        θ ← θ − β ∇_θ (1/T) Σ_i L_query_i(φ_i, θ)

    Second order by default (∇_θ goes through the inner gradients); ``first_order`` cuts them.
    The context enters the MLP by concatenation to the input (regression) and the Conv-4 and
    ResNet-12 by FiLM on their third block (images), see :mod:`metaloop.nn.mlp`,
    :mod:`metaloop.nn.maml_conv` and :mod:`metaloop.nn.resnet12`. A user's network must take the
    context itself: its forward is called as ``forward(x, context)`` with φ ``[P]``.

    Args:
        backbone, in_channels, hidden, ways, inner_steps, eval_inner_steps, first_order, strategy,
            backbone_args: as for :class:`metaloop.algorithms.maml.MAML`.
        num_context_params: P (default 4 for mlp, 100 for conv4, as in the paper; must be given
            for resnet12 and user networks).
        inner_lr: α for φ (default 1.0, the paper's value for regression).
    """

    name = "cavia"
    bf16_safe = True
    config_keys = (*GradientLearner.config_keys, "num_context_params")
    defaults = {
        **GradientLearner.defaults,
        "conv4": {**GradientLearner.defaults["conv4"], "inner_lr": 1.0, "num_context_params": 100},
        "mlp": {**GradientLearner.defaults["mlp"], "inner_lr": 1.0, "num_context_params": 4},
    }

    def __init__(
        self,
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        hidden: int | None = None,
        ways: int | None = None,
        num_context_params: int | None = None,
        inner_lr: float | None = None,
        inner_steps: int | None = None,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        strategy: str = "auto",
        backbone_args: dict | None = None,
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
            backbone_args=backbone_args,
        )
        self.net = self.build_network(backbone, int(self.hparams["num_context_params"]))
        if not self.functional:
            check_takes_context(self.net)

    def inner_problem(self, meta: bool) -> tuple[Forward, Params, StepSize]:
        """θ = {"context": φ_0 = zeros(P)}, fresh for every call (every task starts at 0)."""
        weight = next(self.net.parameters())
        context = torch.zeros(
            int(self.hparams["num_context_params"]), dtype=weight.dtype, device=weight.device
        )
        lr = float(self.hparams["inner_lr"])

        def forward(p: Params, x: torch.Tensor) -> torch.Tensor:
            return self.net(x, p["context"])

        return forward, {"context": context}, lr if meta else detach_step_size(lr)


def check_takes_context(network: nn.Module) -> None:
    """Raise ``ValueError`` unless ``network``'s forward can be called as ``forward(x, context)``."""
    try:
        inspect.signature(network.forward).bind(None, None)
    except TypeError as error:
        raise ValueError(
            f"cavia adapts a context vector that the network must take: {type(network).__name__}.forward"
            f"{inspect.signature(network.forward)} cannot be called as forward(x, context) ({error}); "
            "give the network a second argument, the context [P], and use it (e.g. FiLM or concatenation)"
        ) from error
