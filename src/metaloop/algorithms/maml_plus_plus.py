"""MAML++: Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, arXiv:1810.09502.

MAML with five changes, each a switch here so that its contribution can be measured (all off is
MAML exactly; the outer learning-rate schedule is the trainer's ``train.lr_schedule: cosine``):

- **multi-step loss** (MSL): the query loss after every inner step, weighted; the weights start
  equal and anneal toward the last step over ``msl_steps`` outer steps, after which only the last
  step's loss counts (the paper's code: over its first 10 epochs of 500 steps).
- **per-layer per-step inner learning rates** (LSLR): α_{l,k}, one learned scalar per parameter
  tensor l and inner step k, initialised to ``inner_lr``.
- **per-step batch norm** (BNWB): the batch norms' scale and shift are meta-learned separately for
  every inner step k (and not adapted in the inner loop, as in the paper's code). Statistics are
  the batch's own at every step, as in the paper's code (its ``F.batch_norm(..., training=True)``
  tracks per-step running statistics but never normalises with them), so per-step running
  statistics, which would change no output, are not kept.
- **derivative-order annealing** (DA): first-order inner gradients for the first
  ``second_order_after`` outer steps, second order afterwards.
- **cosine annealing** of the outer learning rate: ``train.lr_schedule: cosine``, ``train.min_lr``.

With θ the network's initial weights, γ_k the step-k batch-norm parameters, w_k the MSL weights:

    θ_i^0 = θ,   θ_i^{k+1} = θ_i^k − α_k ⊙ ∇ L_support_i(θ_i^k; γ_k)          (k = 0..K−1)
    ω = (θ, α, γ) ← ω − β ∇_ω (1/T) Σ_i Σ_k w_k L_query_i(θ_i^{k+1}; γ_k)
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.func import functional_call

from metaloop.algorithms.gradient_based import GradientLearner
from metaloop.algorithms.maml import MAML, _key
from metaloop.inner import Forward, InnerLoop, Params, PerStep, StepSize, current_inner_step
from metaloop.nn.task_norm import norm_parameter_names
from metaloop.tasks.episodes import TaskBatch

MSL_FLOOR = 0.03  # the paper's code: a non-final step's weight never falls below 0.03 / K


def multi_step_weights(steps: int, progress: float) -> torch.Tensor:
    """MAML++'s multi-step loss weights ``[K]`` at ``progress`` = outer step / msl_steps in [0, 1]:
    the first K − 1 fall from 1/K by progress/K to at least 0.03/K, the last rises from 1/K by
    progress (K − 1)/K to at most 1 − (K − 1) 0.03/K; they sum to 1."""
    floor = MSL_FLOOR / steps
    early = max(1 / steps - progress / steps, floor)
    last = min(1 / steps + progress * (steps - 1) / steps, 1 - (steps - 1) * floor)
    return torch.tensor([early] * (steps - 1) + [last], dtype=torch.float64)


class MAMLPlusPlus(MAML):
    """MAML++ (arXiv:1810.09502); see the module docstring for the update and each switch.

    Args:
        multi_step_loss: MSL on (default True).
        msl_steps: outer steps over which the MSL weights anneal (default 5,000: the paper's 10
            epochs of 500 steps); afterwards the last step's loss alone is used.
        per_step_lr: LSLR on (default True); off: the fixed ``inner_lr``.
        per_step_bn: per-step batch-norm scale and shift (default True); off: the network's batch
            norm, adapted in the inner loop like every other parameter (as MAML).
        second_order_after: outer steps of first-order inner gradients before second order (default
            0: second order throughout, as the paper's Omniglot configurations; ``first_order=True``
            keeps first order throughout).
        Other arguments as :class:`metaloop.algorithms.maml.MAML`; the defaults follow the paper's
        Omniglot settings: 5 inner steps in training and at test, α initialised to 0.1 (conv4);
        ``eval_inner_steps`` defaults to ``inner_steps``.

    With LSLR or per-step batch norm, parameters exist for the ``inner_steps`` training steps only:
    test-time adaptation takes at most that many (``eval_inner_steps <= inner_steps``).

    Example:
        >>> learner = MAMLPlusPlus(backbone="conv4", ways=5)
        >>> learner.begin_outer_step(step, total_steps)   # the trainer does this before every step
        >>> learner.meta_backward(batch); optimizer.step()
    """

    name = "mamlpp"
    # bf16 meta-gradients agree with float32 (least cosine 0.972 on tests/test_amp.py's batches, AVX2 and
    # SSE4.1 kernels alike): its inner steps (α_0 = 0.1) amplify rounding less than MAML's (α = 0.4)
    bf16_safe = True
    config_keys = (
        *MAML.config_keys,
        "multi_step_loss",
        "msl_steps",
        "per_step_lr",
        "per_step_bn",
        "second_order_after",
    )
    defaults = {
        # Antoniou et al.'s Omniglot configurations: 5 steps in training and evaluation, α_0 = 0.1
        "conv4": {
            **GradientLearner.defaults["conv4"],
            "inner_lr": 0.1,
            "inner_steps": 5,
            "eval_inner_steps": 5,
        },
        "mlp": {**GradientLearner.defaults["mlp"], "inner_steps": 5, "eval_inner_steps": 5},
        "resnet12": {**GradientLearner.defaults["resnet12"], "inner_steps": 5, "eval_inner_steps": 5},
        "module": {"inner_steps": 5, "eval_inner_steps": 5},
    }

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
        multi_step_loss: bool = True,
        msl_steps: int = 5000,
        per_step_lr: bool = True,
        per_step_bn: bool = True,
        second_order_after: int = 0,
    ) -> None:
        if eval_inner_steps is None and inner_steps is not None:
            eval_inner_steps = inner_steps  # as in the paper: test-time adaptation takes the trained steps
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
        if msl_steps < 0 or second_order_after < 0:
            raise ValueError(
                f"msl_steps and second_order_after count outer steps: both must be >= 0, got "
                f"{msl_steps} and {second_order_after}"
            )
        self.hparams.update(
            multi_step_loss=bool(multi_step_loss),
            msl_steps=int(msl_steps),
            per_step_lr=bool(per_step_lr),
            per_step_bn=bool(per_step_bn),
            second_order_after=int(second_order_after),
        )
        steps = int(self.hparams["inner_steps"])
        if (per_step_lr or per_step_bn) and int(self.hparams["eval_inner_steps"]) > steps:
            raise ValueError(
                f"mamlpp learns per-step parameters for its {steps} inner steps, so eval_inner_steps must be "
                f"at most {steps}, got {self.hparams['eval_inner_steps']} (or turn per_step_lr and "
                "per_step_bn off)"
            )
        self.outer_step = 0  # set by begin_outer_step; MSL and derivative-order annealing read it
        self.norm_names = norm_parameter_names(self.net) if per_step_bn else []
        if per_step_bn and not self.norm_names:
            raise ValueError(
                f"per_step_bn needs batch norm in the network, and this {type(self.net).__name__} has none; "
                "set per_step_bn to false"
            )
        named = dict(self.net.named_parameters())
        self.step_norm = nn.ParameterDict(
            {
                _key(name): nn.Parameter(named[name].detach().expand(steps, *named[name].shape).clone())
                for name in self.norm_names
            }
        )
        for name in self.norm_names:  # replaced by their per-step copies
            named[name].requires_grad_(False)
        initial = float(self.hparams["inner_lr"])
        self.step_lr = nn.ParameterDict(
            {_key(name): nn.Parameter(torch.full((steps,), initial)) for name in self.adapted_names()}
            if per_step_lr
            else {}
        )

    # ----- the switches -------------------------------------------------------------------------
    def begin_outer_step(self, step: int, total_steps: int) -> None:
        """Remember the outer step: the MSL weights and the derivative order depend on it."""
        self.outer_step = step

    def loss_weights(self) -> torch.Tensor | None:
        """The multi-step loss weights ``[K]`` at the current outer step, or None: the last step only."""
        steps, span = int(self.hparams["inner_steps"]), int(self.hparams["msl_steps"])
        if not self.hparams["multi_step_loss"] or steps < 2 or self.outer_step >= span:
            return None
        return multi_step_weights(steps, self.outer_step / span)

    def inner_loop(self, meta: bool, strategy: str) -> InnerLoop:
        """As MAML's, first order during the first ``second_order_after`` outer steps."""
        inner = super().inner_loop(meta, strategy)
        if meta and self.outer_step < int(self.hparams["second_order_after"]):
            return replace(inner, first_order=True)
        return inner

    # ----- the inner problem ----------------------------------------------------------------------
    def adapted_names(self) -> list[str]:
        """Every parameter but the per-step batch norm's (whose step-k copy is used at step k)."""
        fixed = set(getattr(self, "norm_names", ()))
        return [name for name, _ in self.net.named_parameters() if name not in fixed]

    def step_size(self) -> StepSize:
        """α_{l,k} (LSLR) or the fixed ``inner_lr``."""
        if not self.hparams["per_step_lr"]:
            return float(self.hparams["inner_lr"])
        steps = int(self.hparams["inner_steps"])
        lr = {name: self.step_lr[_key(name)] for name in self.adapted_names()}
        return PerStep([{name: rates[k] for name, rates in lr.items()} for k in range(steps)])

    def inner_problem(self, meta: bool) -> tuple[Forward, Params, StepSize]:
        forward, params, lr = super().inner_problem(meta)
        if not self.norm_names:
            return forward, params, lr
        norms = {name: self.step_norm[_key(name)] for name in self.norm_names}
        if not meta:
            norms = {name: value.detach() for name, value in norms.items()}

        def per_step_forward(p: Params, x: torch.Tensor) -> torch.Tensor:
            k = current_inner_step()
            return functional_call(self.net, {**p, **{name: value[k] for name, value in norms.items()}}, (x,))

        return per_step_forward, params, lr

    def run_inner(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        steps: int,
        meta: bool,
        every_step: bool = False,
    ) -> tuple[torch.Tensor, Params]:
        """As :meth:`GradientLearner.run_inner`, refusing more steps than per-step parameters exist for."""
        trained = int(self.hparams["inner_steps"])
        if (self.hparams["per_step_lr"] or self.hparams["per_step_bn"]) and steps > trained:
            raise ValueError(
                f"this mamlpp learner has per-step parameters for {trained} inner steps; "
                f"it cannot take {steps} (use at most {trained})"
            )
        return super().run_inner(support_x, support_y, query_x, steps, meta, every_step)

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """(1/T) Σ_i Σ_k w_k L_query_i after step k (MSL), or the last step's loss alone, and metrics
        (accuracy after the last step)."""
        self.check_batch(batch)
        steps = int(self.hparams["inner_steps"])
        weights = self.loss_weights()
        outputs, _ = self.run_inner(
            batch.support_x, batch.support_y, batch.query_x, steps, meta=True, every_step=weights is not None
        )
        if weights is None:
            loss = self.loss(outputs, batch.query_y).mean()
            return loss, self.metrics(outputs, batch, loss)
        per_step = torch.stack([self.loss(out, batch.query_y).mean() for out in outputs])  # [K]
        loss = (weights.to(per_step) * per_step).sum()
        return loss, self.metrics(outputs[-1], batch, loss)
