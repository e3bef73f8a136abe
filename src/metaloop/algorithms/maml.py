"""MAML and its first-order, learned-step-size and head-only variants.

MAML: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017, arXiv:1703.03400. FOMAML is its first-order approximation (same paper).
Meta-SGD: Li, Zhou, Chen & Li, arXiv:1707.09835. ANIL: Raghu, Raghu, Bengio & Vinyals,
"Rapid Learning or Feature Reuse?", ICLR 2020, arXiv:1909.09157.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from metaloop.algorithms.gradient_based import GradientLearner, map_tasks, network_problem
from metaloop.inner import Forward, Params, StepSize


class MAML(GradientLearner):
    """Model-Agnostic Meta-Learning, true second order.

    The meta-parameters ω are the network's initial weights θ. For each task i, K inner
    steps on the support loss, then the outer step on the query losses at the adapted weights:

        θ_i = θ − α ∇_θ L_support_i(θ)          (repeated K = ``inner_steps`` times)
        θ ← θ − β ∇_θ (1/T) Σ_i L_query_i(θ_i)

    The outer gradient differentiates through the inner gradients (Hessian-vector products);
    β and the outer optimiser are the trainer's. With ``first_order=True`` (FOMAML) ∇L_support
    is treated as a constant, so ∂θ_i/∂θ = I.

    Args:
        backbone: the network: any ``nn.Module`` (``[n, ...]`` -> ``[n, ways]`` logits, or ``[n, 1]``
            with ``ways=0`` for regression), ``"conv4"`` or ``"resnet12"`` (classification of images),
            ``"mlp"`` (regression), or an import path ``package.module:factory``.
        in_channels: image channels, or input features of the MLP (built-in networks).
        hidden: filters (conv4, default 64) or units per hidden layer (mlp, default 40).
        ways: logits of the head (conv4 and resnet12, default 5); 0 for regression; for a user's
            network its number of outputs (None: not checked).
        inner_lr: α (default 0.4 for conv4, 0.01 for mlp, as in the paper; must be given for
            resnet12 and user networks).
        inner_steps: K during meta-training (default 1).
        eval_inner_steps: K at test time, in ``predict`` and ``adapt`` (default 3 conv4, 10 mlp).
        first_order: FOMAML.
        strategy: how the tasks of a batch execute: ``"loop"``, ``"vmap"``, ``"batched"`` (the
            same numbers up to float rounding; see :mod:`metaloop.inner`) or ``"auto"``, the fastest
            as timed on the first batch of each shape (:meth:`GradientLearner.measure_strategy`);
            ``loop`` for a user's network, which ``batched`` cannot run.
        backbone_args: keyword arguments of the backbone's factory (or of ``"resnet12"``: widths).

    Example:
        >>> learner = MAML(my_network, inner_lr=0.4, ways=5)        # or MAML(backbone="conv4", ...)
        >>> metrics = learner.meta_backward(batch)    # batch: a TaskBatch of 5-way tasks; fills .grad
        >>> optimizer.step()
        >>> logits = learner.adapt(support_x, support_y)(query_x)   # [N, 5]
    """

    name = "maml"
    first_order_default = False

    def __init__(
        self,
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        hidden: int | None = None,
        ways: int | None = None,
        inner_lr: float | None = None,
        inner_steps: int | None = None,
        eval_inner_steps: int | None = None,
        first_order: bool | None = None,
        strategy: str = "auto",
        backbone_args: dict | None = None,
    ) -> None:
        super().__init__(
            backbone=backbone,
            in_channels=in_channels,
            hidden=hidden,
            ways=ways,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            first_order=self.first_order_default if first_order is None else first_order,
            strategy=strategy,
            backbone_args=backbone_args,
        )
        self.net = self.build_network(backbone)

    def adapted_names(self) -> list[str]:
        """The parameters adapted in the inner loop: all of them."""
        return [name for name, _ in self.net.named_parameters()]

    def step_size(self) -> StepSize:
        """α: the fixed ``inner_lr``."""
        return float(self.hparams["inner_lr"])

    def inner_problem(self, meta: bool) -> tuple[Forward, Params, StepSize]:
        return network_problem(self.net, self.adapted_names(), self.step_size(), meta)


class FOMAML(MAML):
    """First-order MAML: MAML with the inner gradient treated as a constant,

        θ_i = θ − α stop_gradient(∇_θ L_support_i(θ)),    θ ← θ − β (1/T) Σ_i ∇_{θ_i} L_query_i(θ_i).

    Same arguments as :class:`MAML`; ``first_order`` defaults to True (arXiv:1703.03400, section 5.2).
    """

    name = "fomaml"
    first_order_default = True


class MetaSGD(MAML):
    """Meta-SGD: MAML whose inner step size is a learned tensor α the shape of θ (arXiv:1707.09835).

        θ_i = θ − α ⊙ ∇_θ L_support_i(θ)
        (θ, α) ← (θ, α) − β ∇_(θ,α) (1/T) Σ_i L_query_i(θ_i)

    ω = (θ, α). Every element of α starts uniform in [``alpha_low``, ``alpha_high``]
    (default [0.005, 0.1], the paper's range) and is updated by the outer optimiser.
    Same other arguments as :class:`MAML` (``inner_lr`` is not used).
    """

    name = "metasgd"
    unused_hparams = ("inner_lr",)
    config_keys = (
        *GradientLearner.config_keys[:3],
        *GradientLearner.config_keys[4:],
        "alpha_low",
        "alpha_high",
    )

    def __init__(
        self,
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        hidden: int | None = None,
        ways: int | None = None,
        inner_steps: int | None = None,
        eval_inner_steps: int | None = None,
        first_order: bool | None = None,
        strategy: str = "auto",
        alpha_low: float = 0.005,
        alpha_high: float = 0.1,
        backbone_args: dict | None = None,
    ) -> None:
        super().__init__(
            backbone,
            in_channels,
            hidden,
            ways,
            None,
            inner_steps,
            eval_inner_steps,
            first_order,
            strategy,
            backbone_args,
        )
        self.hparams.update(alpha_low=alpha_low, alpha_high=alpha_high)
        self.alpha = nn.ParameterDict(
            {
                _key(name): nn.Parameter(torch.empty_like(p).uniform_(alpha_low, alpha_high))
                for name, p in self.net.named_parameters()
            }
        )

    def step_size(self) -> StepSize:
        """α: one learned step size per element of θ."""
        return {name: self.alpha[_key(name)] for name in self.adapted_names()}


def _key(name: str) -> str:
    """A parameter name usable as a key of ``nn.ParameterDict`` (no dots)."""
    return name.replace(".", "-")


class ANIL(MAML):
    """Almost No Inner Loop: only the head adapts in the inner loop (arXiv:1909.09157).

    With θ = (θ_body, θ_head) and features z = f_body(x; θ_body):

        θ_head,i = θ_head − α ∇_θ_head L_support_i(θ_body, θ_head)
        θ ← θ − β ∇_θ (1/T) Σ_i L_query_i(θ_body, θ_head,i)

    The body gets no inner update; it is learned in the outer loop only, through both the
    query features and the support features that the head adapted to. With a built-in network
    the features are computed once per task (they do not change during adaptation); a user's
    network runs whole at every inner step (the same numbers, slower).

    Args:
        head: which parameters form the head: the name of a submodule of the network (default
            ``"head"``, the built-in networks' output layer) or, in Python, a predicate on parameter
            names (``lambda name: name.startswith("fc.")``; such a learner cannot be rebuilt from a
            checkpoint). Other arguments as :class:`MAML`.
    """

    name = "anil"
    bf16_safe = True
    config_keys = (*MAML.config_keys, "head")

    def __init__(
        self,
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        hidden: int | None = None,
        ways: int | None = None,
        inner_lr: float | None = None,
        inner_steps: int | None = None,
        eval_inner_steps: int | None = None,
        first_order: bool | None = None,
        strategy: str = "auto",
        backbone_args: dict | None = None,
        head: str | Callable[[str], bool] = "head",
    ) -> None:
        predicate = head if callable(head) else None
        if isinstance(head, str) and head.startswith("<"):
            raise ValueError(
                f"this anil learner's head was a Python predicate ({head[1:-1]}); a checkpoint cannot "
                "rebuild it: build the learner again with it and load_state_dict(state['model'])"
            )
        super().__init__(
            backbone,
            in_channels,
            hidden,
            ways,
            inner_lr,
            inner_steps,
            eval_inner_steps,
            first_order,
            strategy,
            backbone_args,
        )
        self.head_predicate = predicate
        self.hparams["head"] = (
            f"<{getattr(head, '__qualname__', type(head).__name__)} predicate>" if predicate else head
        )
        if self.functional and head != "head":
            raise ValueError(
                f"the built-in {self.hparams['backbone']} network's head is 'head', got {head!r}"
            )
        if not self.head_names():
            raise ValueError(f"anil's head selects no parameter of the {type(self.net).__name__} network")

    def head_names(self) -> list[str]:
        """The head's parameters: those of the submodule ``head`` names, or those the predicate picks."""
        if self.head_predicate is not None:
            return [name for name, _ in self.net.named_parameters() if self.head_predicate(name)]
        head = str(self.hparams["head"])
        try:
            module = self.net.get_submodule(head)
        except AttributeError as error:
            raise ValueError(
                f"anil's head {head!r} is not a submodule of the {type(self.net).__name__} network; "
                f"its submodules: {', '.join(name for name, _ in self.net.named_children())}"
            ) from error
        return [f"{head}.{name}" for name, _ in module.named_parameters()]

    def adapted_names(self) -> list[str]:
        """The head's parameters (:meth:`head_names`)."""
        return self.head_names()

    def inner_problem(self, meta: bool) -> tuple[Forward, Params, StepSize]:
        if not self.functional:
            return super().inner_problem(meta)
        _, params, lr = super().inner_problem(meta)
        params = {name.removeprefix("head."): p for name, p in params.items()}

        def forward(p: Params, features: torch.Tensor) -> torch.Tensor:
            return functional_call(self.net.head, p, (features,))

        return forward, params, lr

    def inner_inputs(self, x: torch.Tensor, strategy: str = "loop") -> torch.Tensor:
        """Body features ``[T, n, hidden]`` of inputs ``[T, n, ...]`` (built-in networks), else ``x``."""
        if not self.functional:
            return x
        return map_tasks(self.net.features, x, strategy)
