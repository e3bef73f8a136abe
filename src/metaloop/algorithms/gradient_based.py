"""What the optimisation-based learners (MAML and its family, Reptile, CAVIA) share: the
backbone chosen by name, the task type it implies, the per-task loss and metrics, and
test-time adaptation (``predict`` / ``adapt``) through :class:`metaloop.inner.InnerLoop`.

Backbones: ``"conv4"`` is few-shot classification of images (cross-entropy; metrics ``loss``
and ``accuracy``; ``ways`` logits), ``"mlp"`` is regression such as sinusoid (mean squared
error; metrics ``loss`` and ``mse``; one output, ``ways`` = 0).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from metaloop.algorithms.base import MetaLearner, Predictor
from metaloop.algorithms.execution import chunk_size, device_key, graph_bytes
from metaloop.inner import (
    STRATEGIES,
    Forward,
    InnerLoop,
    Params,
    StepSize,
    choose_strategy,
    cross_entropy_per_task,
    detach_step_size,
    fastest_strategy,
    mse_per_task,
    remembered_strategy,
)
from metaloop.nn.maml_conv import MamlConv4
from metaloop.nn.mlp import MLP
from metaloop.tasks.episodes import TaskBatch

BACKBONES = ("conv4", "mlp")
TRIAL_TASKS = 2  # tasks each strategy runs when "auto" measures them (one untimed run, one timed)


def build_backbone(
    backbone: str, in_channels: int, hidden: int, ways: int, num_context_params: int = 0
) -> nn.Module:
    """``"conv4"``: :class:`MamlConv4` with ``ways`` logits; ``"mlp"``: :class:`MLP` with
    ``in_channels`` inputs and one output."""
    if backbone == "conv4":
        return MamlConv4(in_channels, hidden, ways, num_context_params)
    return MLP(in_channels, hidden, 1, num_context_params=num_context_params)


def network_problem(
    net: nn.Module, names: list[str], lr: StepSize, meta: bool
) -> tuple[Forward, Params, StepSize]:
    """The inner problem "adapt the parameters ``names`` of ``net`` with step size ``lr``":
    ``(forward, θ, α)`` with ``forward(p, x) = net(x)`` evaluated at ``p`` (other parameters:
    the network's own). With ``meta=False`` θ and α are cut from the graph."""
    named = dict(net.named_parameters())
    params = {name: named[name] for name in names}
    if not meta:
        params, lr = {k: v.detach() for k, v in params.items()}, detach_step_size(lr)

    def forward(p: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (x,))

    return forward, params, lr


def map_tasks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, strategy: str) -> torch.Tensor:
    """``fn`` applied to each task of ``x`` ``[T, n, ...]``, stacked, executed as ``strategy`` says."""
    if strategy == "loop":
        return torch.stack([fn(x_t) for x_t in x])
    if strategy == "vmap":
        return torch.func.vmap(fn)(x)
    return fn(x)


class GradientLearner(MetaLearner):
    """Base of learners that adapt by SGD in an inner loop.

    Subclasses define :meth:`inner_problem`: what is adapted, how it is applied, with which
    step size. The default :meth:`meta_loss` is the mean query loss after the inner loop.
    ``None`` hyperparameters take the backbone's value in :attr:`defaults`; the resolved
    values are stored in ``hparams`` (plain numbers, strings and booleans).
    """

    defaults: ClassVar[dict[str, dict[str, int | float]]] = {
        # Finn et al. 2017: Omniglot 5-way α = 0.4, 1 step, 3 at test; sinusoid α = 0.01, 1 step
        "conv4": {"hidden": 64, "ways": 5, "inner_lr": 0.4, "inner_steps": 1, "eval_inner_steps": 3},
        "mlp": {"hidden": 40, "ways": 0, "inner_lr": 0.01, "inner_steps": 1, "eval_inner_steps": 10},
    }

    def __init__(self, **hparams: object) -> None:
        backbone = hparams["backbone"]
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; use one of {', '.join(BACKBONES)}")
        if hparams["strategy"] not in ("auto", *STRATEGIES):
            raise ValueError(
                f"unknown strategy {hparams['strategy']!r}; use one of auto, {', '.join(STRATEGIES)}"
            )
        defaults = self.defaults[backbone]
        resolved = {k: defaults[k] if v is None and k in defaults else v for k, v in hparams.items()}
        if backbone == "mlp" and resolved.get("ways", 0) != 0:
            raise ValueError(
                f"backbone 'mlp' is for regression (one output): ways must be 0, got {resolved['ways']}"
            )
        super().__init__(**resolved)
        self._trial: str | None = None  # a strategy forced while measuring or running chunks
        # gradient checkpointing of the inner steps while meta-training (speed and memory, not results)
        self.checkpoint_inner_steps = False
        self._graph_bytes: dict[str, int] = {}
        self.task_type = "classification" if backbone == "conv4" else "regression"
        self.loss = cross_entropy_per_task if self.task_type == "classification" else mse_per_task

    # ----- what subclasses define -------------------------------------------------------------
    @abstractmethod
    def inner_problem(self, meta: bool) -> tuple[Forward, Params, StepSize]:
        """``(forward, θ, α)`` for :meth:`InnerLoop.run`. With ``meta=False`` (test time) θ and
        α must be cut from the graph."""

    def inner_inputs(self, x: torch.Tensor, strategy: str = "loop") -> torch.Tensor:
        """What the inner loop's ``forward`` takes, from the batch's inputs ``[T, n, ...]``
        (computed as ``strategy`` says, where that matters)."""
        return x

    def splits_by_task(self) -> bool:
        """Whether :meth:`meta_loss` is a mean of independent per-task terms, so a batch may be
        split into chunks with the same result. Learners whose tasks interact override it."""
        return True

    def candidate_strategies(self) -> tuple[str, ...]:
        """The strategies that compute this learner's function exactly, in order of preference
        (``"auto"`` measures them). Every built-in backbone runs under all three; checkpointed
        inner steps exclude ``"vmap"``."""
        return tuple(s for s in STRATEGIES if not (self.checkpoint_inner_steps and s == "vmap"))

    # ----- shared machinery ---------------------------------------------------------------------
    def strategy(self, device: torch.device) -> str:
        """The execution strategy by rule (``"auto"``: :func:`metaloop.inner.choose_strategy`)."""
        return choose_strategy(str(self.hparams["strategy"]), device, self.hparams["backbone"] == "conv4")

    def strategy_key(self, support_x: torch.Tensor, query_x: torch.Tensor, meta: bool) -> str:
        """What the fastest strategy depends on: device, learner and network, task shapes, steps."""
        network = ",".join(f"{n}{tuple(p.shape)}" for n, p in self.named_parameters())
        steps = self.hparams["inner_steps" if meta else "eval_inner_steps"]
        shapes = f"{tuple(support_x.shape[1:])}/{tuple(query_x.shape[1:])}/{support_x.dtype}"
        return (
            f"{device_key(support_x.device)}|torch {torch.__version__}|{self.name}|{type(self.net).__name__}"
            f"|{network}|{shapes}|steps {steps}|first_order {self.hparams.get('first_order')}|meta {meta}"
            f"|checkpoint {self.checkpoint_inner_steps}"
        )

    def active_strategy(self, support_x: torch.Tensor, query_x: torch.Tensor, meta: bool) -> str:
        """The strategy to run now: configured, forced by a measurement in progress, measured
        earlier for this key (``"auto"``), or by rule."""
        if self._trial is not None:
            return self._trial
        if self.hparams["strategy"] != "auto":
            return str(self.hparams["strategy"])
        measured = remembered_strategy(self.strategy_key(support_x, query_x, meta))
        return measured or self.strategy(support_x.device)

    @contextmanager
    def _forced(self, strategy: str) -> Iterator[None]:
        self._trial = strategy
        try:
            yield
        finally:
            self._trial = None

    def measure_strategy(self, batch: TaskBatch, meta: bool, max_task_chunk: int | None = None) -> str:
        """For ``strategy="auto"``: time each candidate on (a chunk of) ``batch`` and remember the
        fastest for this key (:func:`metaloop.inner.fastest_strategy`). Training (``meta``) times the
        meta-loss and its gradient with ``torch.autograd.grad`` (no ``.grad`` is touched); test time
        times :meth:`run_inner`. The global RNG and every buffer are restored afterwards."""
        candidates = self.candidate_strategies()
        if self.hparams["strategy"] != "auto" or len(candidates) == 1:
            return self.active_strategy(batch.support_x, batch.query_x, meta)
        key = self.strategy_key(batch.support_x, batch.query_x, meta)
        remembered = remembered_strategy(key)
        if remembered in candidates:
            return remembered
        task_bytes = self.task_graph_bytes(batch) if meta else None
        # the same few tasks for every candidate: at most one chunk, and at most TRIAL_TASKS
        size = max(chunk_size(s, batch.num_tasks, max_task_chunk, task_bytes, None) for s in candidates)
        size = min(size, TRIAL_TASKS)
        part = batch.slice(0, size)
        weights = [p for p in self.parameters() if p.requires_grad]
        buffers = {name: b.clone() for name, b in self.named_buffers()}
        devices = [part.support_x.device] if part.support_x.device.type == "cuda" else []

        def step(strategy: str) -> None:
            with self._forced(strategy), torch.random.fork_rng(devices=devices):
                if not meta:
                    with torch.no_grad():
                        steps = int(self.hparams["eval_inner_steps"])
                        self.run_inner(part.support_x, part.support_y, part.query_x, steps, meta=False)
                    return
                chunk = chunk_size(strategy, size, max_task_chunk, task_bytes, None)
                for start in range(0, size, chunk):
                    loss, _ = self.meta_loss(part.slice(start, start + chunk))
                    if loss.requires_grad:
                        torch.autograd.grad(loss, weights, allow_unused=True)
            with torch.no_grad():
                for name, b in self.named_buffers():
                    b.copy_(buffers[name])

        return fastest_strategy(key, candidates, step, repeats=1)

    def task_graph_bytes(self, batch: TaskBatch) -> int:
        """Bytes one task's meta-loss graph saves for backward (the first task, strategy ``loop``)."""
        key = "bytes|" + self.strategy_key(batch.support_x, batch.query_x, True)
        if key not in self._graph_bytes:
            devices = [batch.support_x.device] if batch.support_x.device.type == "cuda" else []
            buffers = {name: b.clone() for name, b in self.named_buffers()}
            with self._forced("loop"), torch.random.fork_rng(devices=devices):
                _, self._graph_bytes[key] = graph_bytes(lambda: self.meta_loss(batch.task(0)))
            with torch.no_grad():
                for name, b in self.named_buffers():
                    b.copy_(buffers[name])
        return self._graph_bytes[key]

    def meta_backward(
        self,
        batch: TaskBatch,
        scale: float = 1.0,
        max_task_chunk: int | None = None,
        memory_budget_mb: float | None = None,
    ) -> dict[str, float]:
        """Add ``scale`` × ∇ :meth:`meta_loss` to ``.grad``, a chunk of tasks at a time: ``"loop"``
        one task at a time, ``"batched"``/``"vmap"`` ``max_task_chunk`` tasks, or as many as fit
        ``memory_budget_mb`` of graph (see :mod:`metaloop.algorithms.execution`). Each chunk's
        loss is scaled by its share of the batch and back-propagated before the next chunk runs,
        so the gradients add up, in task order, to that of the mean over all tasks. ``"auto"``
        measures the strategies first (:meth:`measure_strategy`). Returns the batch's metrics
        (each chunk's weighted by its share)."""
        self.check_batch(batch)
        strategy = self.measure_strategy(batch, meta=True, max_task_chunk=max_task_chunk)
        if not self.splits_by_task():
            with self._forced(strategy):
                return super().meta_backward(batch, scale)
        needs_bytes = strategy != "loop" and max_task_chunk is None
        task_bytes = self.task_graph_bytes(batch) if needs_bytes else None
        size = chunk_size(strategy, batch.num_tasks, max_task_chunk, task_bytes, memory_budget_mb)
        metrics: dict[str, float] = {}
        with self._forced(strategy):
            for start in range(0, batch.num_tasks, size):
                part = batch.slice(start, start + size)
                share = part.num_tasks / batch.num_tasks
                for key, value in super().meta_backward(part, scale * share).items():
                    metrics[key] = metrics.get(key, 0.0) + share * value
        return metrics

    def inner_loop(self, meta: bool, strategy: str) -> InnerLoop:
        """Training: as configured. Test time: first order (no outer gradient is needed)."""
        first_order = not meta or bool(self.hparams["first_order"])
        return InnerLoop(self.loss, first_order, strategy, meta and self.checkpoint_inner_steps)

    def check_batch(self, batch: TaskBatch) -> None:
        """Classification heads of W outputs take tasks of 2..W ways; regression takes ways = 0."""
        ways = int(self.hparams["ways"])
        if (batch.ways == 0) != (ways == 0) or batch.ways > ways:
            kind = f"classification of up to {ways} ways" if ways else "regression (ways = 0)"
            raise ValueError(
                f"this {self.name} learner was built for {kind} but the batch has ways = {batch.ways}; "
                f"rebuild it with ways={batch.ways} and backbone={'conv4' if batch.ways else 'mlp'!r}"
            )

    @staticmethod
    def first_outputs(forward: Forward, ways: int) -> Forward:
        """``forward`` restricted to its first ``ways`` outputs (logits): a task of w < W ways uses
        logits 0..w-1 of the W-way head, and the other W - w never enter its loss."""
        return lambda p, x: forward(p, x)[..., :ways]

    def run_inner(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, steps: int, meta: bool
    ) -> tuple[torch.Tensor, Params]:
        """Adapted query outputs ``[T, M, K]`` and adapted parameters ``{name: [T, ...]}``.

        Classification tasks with fewer ways than the head (labels ``0..w-1``, all present in the
        support set) use its first w logits, so ``K = w``.
        """
        forward, params, lr = self.inner_problem(meta)
        if self.task_type == "classification":
            ways = int(support_y.max()) + 1
            if ways < int(self.hparams["ways"]):
                forward = self.first_outputs(forward, ways)
        strategy = self.active_strategy(support_x, query_x, meta)
        inputs_s, inputs_q = self.inner_inputs(support_x, strategy), self.inner_inputs(query_x, strategy)
        inner = self.inner_loop(meta, strategy)
        return inner.run(forward, params, lr, inputs_s, support_y, inputs_q, steps)

    def metrics(self, outputs: torch.Tensor, batch: TaskBatch, loss: torch.Tensor) -> dict[str, float]:
        """``loss`` and ``accuracy`` (classification) or ``mse`` (regression) of query outputs."""
        outputs = outputs.detach()
        if self.task_type == "classification":
            accuracy = (outputs.argmax(-1) == batch.query_y).float().mean()
            return {"loss": loss.item(), "accuracy": accuracy.item()}
        return {"loss": loss.item(), "mse": mse_per_task(outputs, batch.query_y).mean().item()}

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """(1/T) Σ_i L_query_i after ``inner_steps`` inner steps on each task, and its metrics."""
        self.check_batch(batch)
        steps = int(self.hparams["inner_steps"])
        outputs, _ = self.run_inner(batch.support_x, batch.support_y, batch.query_x, steps, meta=True)
        loss = self.loss(outputs, batch.query_y).mean()
        return loss, self.metrics(outputs, batch, loss)

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """Detached query outputs after ``eval_inner_steps`` steps: logits ``[T, W*Q, W]`` or
        predictions ``[T, Q, 1]``."""
        self.check_batch(batch)
        self.measure_strategy(batch, meta=False)
        with torch.no_grad():
            steps = int(self.hparams["eval_inner_steps"])
            outputs, _ = self.run_inner(batch.support_x, batch.support_y, batch.query_x, steps, meta=False)
        return outputs.detach()

    def forward(self, adapted: Params, query_x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[M, K]`` of one task's queries ``[M, ...]`` at the parameters ``adapted`` that
        :meth:`adapt` found (the parameters the inner loop does not adapt: the learner's own)."""
        forward, _, _ = self.inner_problem(meta=False)
        return forward(adapted, self.inner_inputs(query_x[None])[0])

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Adapt to one task (``eval_inner_steps`` steps); works in eval mode and under no_grad.

        Args:
            support_x: ``[N, C, H, W]`` images (or ``[N, 1]`` regression inputs).
            support_y: int64 ``[N]`` labels (or ``[N, 1]`` targets).

        Returns:
            A function from queries ``[M, ...]`` to logits ``[M, W]`` (or predictions ``[M, 1]``).
            It runs on detached copies of every parameter, adapted or not: its output is
            differentiable with respect to the queries (when they require grad, for attacks such
            as :mod:`metaloop.attacks`) and never with respect to the learner's parameters.
        """
        steps = int(self.hparams["eval_inner_steps"])
        with torch.no_grad():
            _, adapted = self.run_inner(support_x[None], support_y[None], support_x[None], steps, meta=False)
        fast = {name: value[0].detach() for name, value in adapted.items()}
        frozen = {name: p.detach() for name, p in self.named_parameters()}
        ways = int(support_y.max()) + 1 if self.task_type == "classification" else None

        def predictor(query_x: torch.Tensor) -> torch.Tensor:
            return functional_call(self, frozen, (fast, query_x))[..., :ways]

        return predictor
