"""iMAML: Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019,
arXiv:1909.04630."""

from __future__ import annotations

import torch
from torch import nn

from metaloop.algorithms.gradient_based import GradientLearner, network_problem
from metaloop.algorithms.implicit import implicit_gradients
from metaloop.inner import Forward, InnerLoop, Params, StepSize
from metaloop.tasks.episodes import TaskBatch


class IMAML(GradientLearner):
    """Implicit MAML: the inner problem is proximal, the meta-gradient comes from the implicit
    function theorem, solved by conjugate gradient on Hessian-vector products.

    The meta-parameters are the network's weights θ. Each task i adapts φ_i to its support set by
    K = ``inner_steps`` steps of SGD (step α = ``inner_lr``) on the proximal objective, with no graph
    (:class:`metaloop.inner.InnerLoop` with ``proximal = λ``):

        φ_i ≈ argmin_φ  L_support_i(φ) + (λ/2) ||φ − θ||²
        g_i = (I + H_i/λ)^{-1} ∇_φ L_query_i(φ_i),     H_i = ∇²_φ L_support_i(φ_i)
        θ ← θ − β (1/T) Σ_i g_i

    g_i is the exact derivative of L_query_i(φ_i*(θ)) when φ_i is the inner problem's exact
    minimiser; it is found with ``cg_steps`` steps of conjugate gradient
    (:mod:`metaloop.algorithms.implicit`). Memory holds one support-gradient graph per task, never
    the inner steps: it does not grow with K. Like :class:`metaloop.algorithms.reptile.Reptile`,
    :meth:`meta_loss` returns a tensor whose ``backward()`` puts exactly (1/T) Σ_i g_i into ``.grad``
    and whose value is the mean query loss at the φ_i (what gets logged). Test-time adaptation is
    the same proximal inner loop (``eval_inner_steps`` steps).

    Switches (each changes the meta-gradient; ``tests/algorithms/test_imaml.py``):
        ``lam``: λ, the proximal strength (> 0): larger keeps φ_i closer to θ (and shrinks the
            Hessian's share in the solve).
        ``cg_steps``: CG iterations; 0 is the first-order shortcut g_i = ∇_φ L_query_i(φ_i).
        ``inner_steps``: how well φ_i solves the inner problem.
        ``cg_damping`` μ and ``lam_damping`` ν: solve ((1 + μ) I + H_i/(λ + ν)) g_i = ∇L_query_i(φ_i)
            instead, as the paper's code does (μ = 1, ν = 10 there); 0 and 0 (the default) is the
            equation above. The equation's matrix is indefinite wherever H_i has an eigenvalue below
            −λ, and then CG does not converge (:mod:`metaloop.algorithms.implicit`; the Omniglot
            recipes use the code's damping).

    Args:
        backbone, in_channels, hidden, ways, backbone_args: the network, as for
            :class:`metaloop.algorithms.maml.MAML` (any ``nn.Module``, built-in name or import path).
        inner_lr: α (default 0.1 for conv4, the paper's code; must be given for resnet12 and user
            networks).
        inner_steps: K while meta-training (default 16 for conv4: the paper's 5-way Omniglot setting).
        eval_inner_steps: K at test time (default 16 for conv4).
        strategy: ``"loop"`` (any network), ``"batched"`` (built-in networks: all tasks' inner steps
            and CG solves at once) or ``"auto"``. ``"vmap"`` is not offered.
        lam: λ (default 2.0, the paper's).
        cg_steps: CG iterations (default 5, the paper's).
        cg_damping: μ (default 0: the paper's equation).
        lam_damping: ν (default 0: the paper's equation).

    Example:
        >>> learner = IMAML(backbone="conv4", ways=5)           # λ = 2, 16 inner steps, 5 CG steps
        >>> metrics = learner.meta_backward(batch)               # fills .grad with (1/T) Σ_i g_i
        >>> optimizer.step()
        >>> logits = learner.adapt(support_x, support_y)(query_x)   # [N, 5]
    """

    name = "imaml"
    config_keys = (
        *(k for k in GradientLearner.config_keys if k != "first_order"),
        "lam",
        "cg_steps",
        "cg_damping",
        "lam_damping",
    )
    defaults = {
        **GradientLearner.defaults,
        # Rajeswaran et al. 2019, Omniglot with the gradient-descent inner solver: 16 steps (5-way),
        # α = 0.1 (their code's example); 25 steps for 20-way are set in the 20-way recipe
        "conv4": {
            **GradientLearner.defaults["conv4"],
            "inner_lr": 0.1,
            "inner_steps": 16,
            "eval_inner_steps": 16,
        },
        # no published setting for the sinusoid MLP (ours)
        "mlp": {**GradientLearner.defaults["mlp"], "inner_steps": 5, "eval_inner_steps": 10},
        "resnet12": {**GradientLearner.defaults["resnet12"], "inner_steps": 16, "eval_inner_steps": 16},
        "module": {"inner_steps": 16, "eval_inner_steps": 16},
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
        strategy: str = "auto",
        lam: float = 2.0,
        cg_steps: int = 5,
        cg_damping: float = 0.0,
        lam_damping: float = 0.0,
        backbone_args: dict | None = None,
    ) -> None:
        if strategy == "vmap":
            raise ValueError(
                "imaml runs strategy 'loop' (any network) or 'batched' (built-in networks), not 'vmap': "
                "its inner loop keeps no graph, so vmap would save nothing; choose loop, batched or auto"
            )
        if not lam > 0:
            raise ValueError(
                f"imaml's lam (λ of the proximal term) must be > 0, got {lam!r}: the implicit gradient "
                "(I + H/λ)^{-1} needs it (the paper uses 2.0)"
            )
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 0:
            raise ValueError(
                f"imaml's cg_steps must be an int >= 0 (0: first-order shortcut), got {cg_steps!r}"
            )
        for key, value in (("cg_damping", cg_damping), ("lam_damping", lam_damping)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(
                    f"imaml's {key} must be a number >= 0 (0: the paper's equation; its code uses "
                    f"cg_damping 1 and lam_damping 10), got {value!r}"
                )
        super().__init__(
            backbone=backbone,
            in_channels=in_channels,
            hidden=hidden,
            ways=ways,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            strategy=strategy,
            lam=float(lam),
            cg_steps=cg_steps,
            cg_damping=float(cg_damping),
            lam_damping=float(lam_damping),
            backbone_args=backbone_args,
        )
        self.net = self.build_network(backbone)

    def candidate_strategies(self) -> tuple[str, ...]:
        """``loop`` and, for the built-in networks, ``batched``."""
        return tuple(s for s in super().candidate_strategies() if s != "vmap")

    def inner_problem(self, meta: bool) -> tuple[Forward, Params, StepSize]:
        """All weights, fixed α, cut from the graph (the meta-gradient is implicit, never unrolled)."""
        names = [name for name, _ in self.net.named_parameters()]
        return network_problem(self.net, names, float(self.hparams["inner_lr"]), meta=False)

    def inner_loop(self, meta: bool, strategy: str) -> InnerLoop:
        """First-order SGD on the proximal objective, while meta-training and at test time."""
        return InnerLoop(self.loss, first_order=True, strategy=strategy, proximal=float(self.hparams["lam"]))

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """A tensor with value (1/T) Σ_i L_query_i(φ_i) and gradient (1/T) Σ_i g_i (class docstring)."""
        self.check_batch(batch)
        steps = int(self.hparams["inner_steps"])
        strategy = self.active_strategy(batch.support_x, batch.query_x, meta=True)
        with torch.no_grad():
            outputs, adapted = self.run_inner(
                batch.support_x, batch.support_y, batch.query_x, steps, meta=True
            )
        forward, _, _ = self.inner_problem(meta=False)
        if self.task_type == "classification" and outputs.shape[-1] < (self.fixed_ways or 0):
            forward = self.first_outputs(forward, outputs.shape[-1])
        grads, query_losses = implicit_gradients(
            forward,
            self.loss,
            adapted,
            self.inner_inputs(batch.support_x, strategy),
            batch.support_y,
            self.inner_inputs(batch.query_x, strategy),
            batch.query_y,
            float(self.hparams["lam"]),
            int(self.hparams["cg_steps"]),
            batched=strategy == "batched",
            damping=float(self.hparams["cg_damping"]),
            lam_damping=float(self.hparams["lam_damping"]),
        )
        query_loss = query_losses.mean()
        surrogate = sum((theta * grads[name].mean(0)).sum() for name, theta in self.net.named_parameters())
        # d(surrogate)/dθ = (1/T) Σ_i g_i exactly; the value is replaced by the query loss
        loss = surrogate - surrogate.detach() + query_loss
        return loss, self.metrics(outputs, batch, query_loss)
