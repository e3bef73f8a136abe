"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018, arXiv:1803.02999)."""

from __future__ import annotations

import torch
from torch import nn

from metaloop.algorithms.gradient_based import GradientLearner, network_problem
from metaloop.inner import Forward, Params, StepSize
from metaloop.tasks.episodes import TaskBatch

INNER_OPTIMIZERS = ("sgd", "adam")
ADAM_BETA2, ADAM_EPS = 0.999, 1e-8  # Nichol et al.'s inner Adam: betas (0, 0.999), TF's default ε


def minibatch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """int64 ``[steps, b]`` rows of ``steps`` minibatches of ``b = min(batch_size, n)`` examples:
    shuffled passes over the ``n`` examples cut into consecutive batches (a batch may straddle
    two passes), as Nichol et al.'s ``_mini_batches`` without replacement."""
    b = min(batch_size, n)
    passes = -(-steps * b // n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])
    return order[: steps * b].view(steps, b)


class Reptile(GradientLearner):
    """Reptile: move the initialisation towards the weights each task's SGD ends at.

    For each task i, n = ``inner_steps`` steps of plain SGD on its support set, with no graph:

        θ_i = SGD_n(θ, α, support_i)
        θ ← θ + ε ((1/T) Σ_i θ_i − θ)

    The update is expressed as a meta-gradient g = θ − (1/T) Σ_i θ_i for any outer optimiser:
    :meth:`meta_loss` returns a tensor whose ``backward()`` puts exactly g into ``.grad``, so
    ``torch.optim.SGD(lr=ε)`` performs the update above (β = ε), and Adam the paper's variant.
    The tensor's *value* is the mean query loss after adaptation (what gets logged).

    Inner optimiser: ``"sgd"`` (default) is full-batch SGD on the support set, the algorithm as
    stated in the paper's Algorithm 1 (defaults, ours: α = 0.1 for conv4, 0.02 for mlp, 5 inner
    steps, 10 at test). ``"adam"`` is what the paper's code ran for its Omniglot and
    miniImageNet results: Adam with β1 = 0, β2 = 0.999 and step size α on minibatches of
    ``inner_batch_size`` support examples, whose second-moment estimate v is *not* reset
    between tasks: it is carried from task to task through meta-training and kept in the
    learner (buffers ``inner_adam.*``, saved with it). At test time every task starts from the
    trained v and leaves it unchanged. A task's step, with g its minibatch gradient and k the
    number of Adam steps taken so far (k counted across tasks too):

        v ← β2 v + (1 − β2) g²,   θ_i ← θ_i − α g / (sqrt(v / (1 − β2^k)) + 1e-8)

    Because v is carried, the tasks of a meta-batch run one after another whatever the
    strategy; under torchrun each rank carries its own v and the ranks' estimates are averaged
    after every outer step (as all floating-point buffers are), so a distributed run is not
    bit-identical to one process there.

    Args:
        backbone, in_channels, hidden, ways, strategy, backbone_args: as for
            :class:`metaloop.algorithms.maml.MAML` (any ``nn.Module``, built-in name or import path).
        inner_lr: α of the inner SGD.
        inner_steps: n during meta-training.
        eval_inner_steps: n at test time.
        inner_optimizer: ``"sgd"`` or ``"adam"`` (see above).
        inner_batch_size: support examples per inner step (``None``: the whole support set);
            minibatches are drawn without replacement from a generator seeded with 0 at every
            call, so the same batch gives the same numbers.
        eval_inner_batch_size: support examples per inner step at test time (``None``: the same as
            ``inner_batch_size``); the paper's code took 5 for 5-way and 10 for 20-way Omniglot.
    """

    name = "reptile"
    bf16_safe = True
    config_keys = (
        *(k for k in GradientLearner.config_keys if k != "first_order"),
        "inner_optimizer",
        "inner_batch_size",
        "eval_inner_batch_size",
    )
    defaults = {
        **GradientLearner.defaults,
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
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        hidden: int | None = None,
        ways: int | None = None,
        inner_lr: float | None = None,
        inner_steps: int | None = None,
        eval_inner_steps: int | None = None,
        strategy: str = "auto",
        inner_optimizer: str = "sgd",
        inner_batch_size: int | None = None,
        eval_inner_batch_size: int | None = None,
        backbone_args: dict | None = None,
    ) -> None:
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"unknown inner_optimizer {inner_optimizer!r}; use one of {', '.join(INNER_OPTIMIZERS)}"
            )
        sizes = {"inner_batch_size": inner_batch_size, "eval_inner_batch_size": eval_inner_batch_size}
        for key, size in sizes.items():
            if size is not None and size < 1:
                raise ValueError(f"{key} must be a positive int or None, got {size!r}")
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
            inner_optimizer=inner_optimizer,
            inner_batch_size=inner_batch_size,
            eval_inner_batch_size=eval_inner_batch_size,
            backbone_args=backbone_args,
        )
        del self.hparams["first_order"]
        self.net = self.build_network(backbone)
        self.inner_adam: nn.Module | None = None
        if inner_optimizer == "adam":
            self.inner_adam = nn.Module()  # v of every weight, and k
            for name, p in self.net.named_parameters():
                self.inner_adam.register_buffer(self.moment_key(name), torch.zeros_like(p))
            self.inner_adam.register_buffer("steps", torch.zeros(()))

    @staticmethod
    def moment_key(name: str) -> str:
        """The ``inner_adam`` buffer holding v of the network weight ``name`` (no dots allowed)."""
        return name.replace(".", "__")

    def full_batch_sgd(self, batch_size: int | None) -> bool:
        """Whether steps of ``batch_size`` are full-batch SGD, which the shared inner loop
        (:class:`metaloop.inner.InnerLoop`) runs."""
        return self.hparams["inner_optimizer"] == "sgd" and batch_size is None

    @property
    def plain_sgd(self) -> bool:
        """Meta-training takes full-batch SGD steps."""
        return self.full_batch_sgd(self.hparams["inner_batch_size"])

    @property
    def eval_batch_size(self) -> int | None:
        """Support examples per test-time inner step (``None``: the whole support set)."""
        size = self.hparams.get("eval_inner_batch_size")  # absent from checkpoints before it existed
        return self.hparams["inner_batch_size"] if size is None else size

    def splits_by_task(self) -> bool:
        """No: the inner loop keeps no graph (nothing to save by chunking), and minibatches and
        Adam's moments run through the whole batch in one sequence."""
        return False

    def candidate_strategies(self) -> tuple[str, ...]:
        """Minibatch and Adam inner loops run task after task whatever the strategy."""
        return super().candidate_strategies() if self.plain_sgd else ("loop",)

    def inner_problem(self, meta: bool) -> tuple[Forward, Params, StepSize]:
        """All weights, fixed α, no graph (Reptile never differentiates through the inner loop)."""
        names = [name for name, _ in self.net.named_parameters()]
        return network_problem(self.net, names, float(self.hparams["inner_lr"]), meta=False)

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """A tensor with value (1/T) Σ_i L_query_i(θ_i) and gradient g = θ − (1/T) Σ_i θ_i."""
        self.check_batch(batch)
        steps = int(self.hparams["inner_steps"])
        with torch.no_grad():
            if self.plain_sgd:  # meta=False: first order, θ cut from the graph
                outputs, adapted = super().run_inner(
                    batch.support_x, batch.support_y, batch.query_x, steps, meta=False
                )
            else:
                outputs, adapted = self.minibatch_inner(
                    batch.support_x,
                    batch.support_y,
                    batch.query_x,
                    steps,
                    carry_moments=True,
                    batch_size=self.hparams["inner_batch_size"],
                )
            query_loss = self.loss(outputs, batch.query_y).mean()
        surrogate = sum(
            (theta * (theta.detach() - adapted[name].mean(0))).sum()
            for name, theta in self.net.named_parameters()
        )
        # d(surrogate)/dθ = g exactly; the value is replaced by the query loss
        loss = surrogate - surrogate.detach() + query_loss
        return loss, self.metrics(outputs, batch, query_loss)

    def run_inner(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, steps: int, meta: bool
    ) -> tuple[torch.Tensor, Params]:
        """Test-time adaptation (and full-batch SGD): see :meth:`GradientLearner.run_inner`."""
        if self.full_batch_sgd(self.eval_batch_size):
            return super().run_inner(support_x, support_y, query_x, steps, meta)
        return self.minibatch_inner(
            support_x, support_y, query_x, steps, carry_moments=False, batch_size=self.eval_batch_size
        )

    def minibatch_inner(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        steps: int,
        carry_moments: bool,
        batch_size: int | None,
    ) -> tuple[torch.Tensor, Params]:
        """``steps`` minibatch SGD or Adam steps (``batch_size`` support examples each, ``None``:
        all) on each task's support set ``[T, N, ...]``, one task after another, with no graph.
        Returns the query outputs ``[T, M, K]`` and the adapted weights ``{name: [T, ...]}``. With
        ``carry_moments`` (meta-training) Adam's v and k pass from each task to the next and are
        stored back in the learner."""
        forward, params, lr = self.inner_problem(meta=False)
        ways = int(support_y.max()) + 1 if self.task_type == "classification" else 0
        if 0 < ways < (self.fixed_ways or 0):
            forward = self.first_outputs(forward, ways)
        adam = self.inner_adam
        moments = {name: getattr(adam, self.moment_key(name)) for name in params} if adam else {}
        k = float(adam.steps) if adam else 0.0
        size = batch_size or support_x.shape[1]
        generator = torch.Generator().manual_seed(0)
        outputs, adapted = [], []
        for x, y, qx in zip(support_x, support_y, query_x, strict=True):
            fast, v, task_k = dict(params), dict(moments), k
            for rows in minibatch_indices(x.shape[0], size, steps, generator):
                with torch.enable_grad():
                    leaves = {name: p.detach().requires_grad_() for name, p in fast.items()}
                    loss = self.loss(forward(leaves, x[rows]), y[rows])
                    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
                if adam is None:
                    fast = {name: p - lr * grads[name] for name, p in fast.items()}
                    continue
                task_k += 1
                correction = (1 - ADAM_BETA2**task_k) ** 0.5
                for name, p in fast.items():
                    v[name] = ADAM_BETA2 * v[name] + (1 - ADAM_BETA2) * grads[name].square()
                    fast[name] = p - lr * grads[name] / (v[name].sqrt() / correction + ADAM_EPS)
            if carry_moments:
                moments, k = v, task_k
            outputs.append(forward(fast, qx))
            adapted.append(fast)
        if adam is not None and carry_moments:
            for name, value in moments.items():
                getattr(adam, self.moment_key(name)).copy_(value)
            adam.steps.fill_(k)
        return torch.stack(outputs), {name: torch.stack([f[name] for f in adapted]) for name in params}
