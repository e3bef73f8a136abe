"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018, arXiv:1803.02999)."""

from __future__ import annotations

import torch

from metaloop.algorithms.gradient_based import GradientLearner, build_backbone, network_problem
from metaloop.inner import Forward, Params, StepSize
from metaloop.tasks.episodes import TaskBatch


class Reptile(GradientLearner):
    """Reptile: move the initialisation towards the weights each task's SGD ends at.

    For each task i, n = ``inner_steps`` steps of plain SGD on its support set, with no graph:

        θ_i = SGD_n(θ, α, support_i)
        θ ← θ + ε ((1/T) Σ_i θ_i − θ)

    The update is expressed as a meta-gradient g = θ − (1/T) Σ_i θ_i for any outer optimiser:
    :meth:`meta_loss` returns a tensor whose ``backward()`` puts exactly g into ``.grad``, so
    ``torch.optim.SGD(lr=ε)`` performs the update above (β = ε), and Adam the paper's variant.
    The tensor's *value* is the mean query loss after adaptation (what gets logged).

    The paper's inner loop used Adam on minibatches; this one uses full-batch SGD on the
    support set, the algorithm as stated in its Algorithm 1. Defaults (ours, not the paper's):
    α = 0.1 (conv4) or 0.02 (mlp), 5 inner steps, 10 at test.

    Args:
        backbone, in_channels, hidden, ways, strategy: as for :class:`metaloop.algorithms.maml.MAML`.
        inner_lr: α of the inner SGD.
        inner_steps: n during meta-training.
        eval_inner_steps: n at test time.
    """

    name = "reptile"
    bf16_safe = True
    defaults = {
        "conv4": {
            **GradientLearner.defaults["conv4"],
            "inner_lr": 0.1,
            "inner_steps": 5,
            "eval_inner_steps": 10,
        },
        "mlp": {
            **GradientLearner.defaults["mlp"],
            "inner_lr": 0.02,
            "inner_steps": 5,
            "eval_inner_steps": 10,
        },
    }

    def __init__(
        self,
        backbone: str = "conv4",
        in_channels: int = 1,
        hidden: int | None = None,
        ways: int | None = None,
        inner_lr: float | None = None,
        inner_steps: int | None = None,
        eval_inner_steps: int | None = None,
        strategy: str = "auto",
    ) -> None:
        super().__init__(
            backbone=backbone,
            in_channels=in_channels,
            hidden=hidden,
            ways=ways,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            first_order=True,
            strategy=strategy,
        )
        del self.hparams["first_order"]
        h = self.hparams
        self.net = build_backbone(backbone, in_channels, h["hidden"], h["ways"])

    def inner_problem(self, meta: bool) -> tuple[Forward, Params, StepSize]:
        """All weights, fixed α, no graph (Reptile never differentiates through the inner loop)."""
        names = [name for name, _ in self.net.named_parameters()]
        return network_problem(self.net, names, float(self.hparams["inner_lr"]), meta=False)

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """A tensor with value (1/T) Σ_i L_query_i(θ_i) and gradient g = θ − (1/T) Σ_i θ_i."""
        self.check_batch(batch)
        steps = int(self.hparams["inner_steps"])
        with torch.no_grad():
            # meta=False: first order, θ cut from the graph
            outputs, adapted = self.run_inner(
                batch.support_x, batch.support_y, batch.query_x, steps, meta=False
            )
            query_loss = self.loss(outputs, batch.query_y).mean()
        surrogate = sum(
            (theta * (theta.detach() - adapted[name].mean(0))).sum()
            for name, theta in self.net.named_parameters()
        )
        # d(surrogate)/dθ = g exactly; the value is replaced by the query loss
        loss = surrogate - surrogate.detach() + query_loss
        return loss, self.metrics(outputs, batch, query_loss)
