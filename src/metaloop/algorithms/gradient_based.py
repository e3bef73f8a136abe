"""What the optimisation-based learners (MAML and its family, Reptile, CAVIA) share: the
network (built in, by import path, or any ``nn.Module``), the task type, the per-task loss and
metrics, and test-time adaptation (``predict`` / ``adapt``) through :class:`metaloop.inner.InnerLoop`.

Networks: the built-in ``"conv4"`` and ``"resnet12"`` classify images (cross-entropy; metrics
``loss`` and ``accuracy``; ``ways`` logits), ``"mlp"`` is regression such as sinusoid (mean squared
error; metrics ``loss`` and ``mse``; one output, ``ways`` = 0). They are functional over tasks
(per-task parameters, batch norm per task), so every strategy (``loop``, ``vmap``, ``batched``)
runs them. A user's network (a module, or ``package.module:factory``) classifies (``ways`` > 0, or
``None``: as many ways as it has outputs) or regresses (``ways = 0``); it runs one task at a time,
under ``loop`` or ``vmap``. Its batch-norm layers are replaced by per-task batch norm and its layer
norms by an exact one (:func:`metaloop.nn.task_norm.swap_norms`): ``torch.func.vmap`` over the
built-in batch and layer norms gives wrong second-order meta-gradients (torch 2.13), and running
statistics updated in place inside a differentiated inner loop would break its backward pass.
``vmap`` is refused for a network with other normalisation layers (group, instance norm).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaloop.algorithms.base import MetaLearner, Predictor, most_ways
from metaloop.algorithms.execution import chunk_size, device_key, graph_bytes
from metaloop.config import Config
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
    inner_step,
    mse_per_task,
    query_step,
    remembered_strategy,
)
from metaloop.nn.backbones import BUILTIN, adaptable_backbone, check_backbone_name, object_spec, probe
from metaloop.nn.task_norm import swap_norms, vmap_refusal
from metaloop.tasks.episodes import TaskBatch
from metaloop.tasks.source import TaskSource

# hyper-parameters without a default for some networks: the user must choose them
REQUIRED = ("inner_lr", "num_context_params")
# Tasks each strategy runs when "auto" measures them (one untimed run, then TRIAL_REPEATS timed
# runs, the candidates taking turns). "batched" gains by grouping tasks: on 2 tasks its lead over
# "loop" was within the noise and auto chose either (benchmarks/results/throughput_peers_notes.md).
TRIAL_TASKS = 8
TRIAL_REPEATS = 2


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
    step size, and build ``self.net`` with :meth:`build_network`. The default :meth:`meta_loss` is
    the mean query loss after the inner loop. ``None`` hyperparameters take the network's value in
    :attr:`defaults` (``"module"``: a user's network); the resolved values are stored in
    ``hparams`` (plain numbers, strings and booleans). A network passed in as a module is recorded
    by its class name only (:func:`metaloop.nn.backbones.object_spec`).
    """

    task_types = ("classification", "regression")
    adapts_by_gradient = True
    backbone_attribute = "net"
    config_keys = (
        "backbone",
        "backbone_args",
        "hidden",
        "inner_lr",
        "inner_steps",
        "eval_inner_steps",
        "first_order",
        "strategy",
    )
    unused_hparams: ClassVar[tuple[str, ...]] = ()  # constructor arguments a subclass does not use
    defaults: ClassVar[dict[str, dict[str, int | float | None]]] = {
        # Finn et al. 2017: Omniglot 5-way α = 0.4, 1 step, 3 at test; sinusoid α = 0.01, 1 step
        "conv4": {"hidden": 64, "ways": 5, "inner_lr": 0.4, "inner_steps": 1, "eval_inner_steps": 3},
        "mlp": {"hidden": 40, "ways": 0, "inner_lr": 0.01, "inner_steps": 1, "eval_inner_steps": 10},
        # no published α for these: inner_lr must be given
        "resnet12": {"ways": 5, "inner_steps": 1, "eval_inner_steps": 3},
        "module": {"inner_steps": 1, "eval_inner_steps": 3},
    }

    def __init__(self, **hparams: object) -> None:
        backbone = hparams["backbone"]
        if isinstance(backbone, nn.Module):
            hparams["backbone"] = object_spec(backbone)
        else:
            check_backbone_name(backbone)
        functional = hparams["backbone"] in BUILTIN
        strategy = hparams["strategy"]
        if strategy not in ("auto", *STRATEGIES):
            raise ValueError(f"unknown strategy {strategy!r}; use one of auto, {', '.join(STRATEGIES)}")
        if strategy == "batched" and not functional:
            raise ValueError(
                "strategy 'batched' runs the built-in networks (conv4, resnet12, mlp), which take per-task "
                "parameters; a user's network runs one task at a time: use strategy 'loop' (any network) "
                "or 'vmap'"
            )
        defaults = self.defaults[hparams["backbone"] if functional else "module"]
        hparams = {k: v for k, v in hparams.items() if k not in self.unused_hparams}
        resolved = {k: defaults[k] if v is None and k in defaults else v for k, v in hparams.items()}
        missing = [k for k in REQUIRED if k in resolved and resolved[k] is None]
        if missing:
            raise ValueError(
                f"{self.name} over backbone {hparams['backbone']} has no default {', '.join(missing)}: "
                f"give {' and '.join(f'{k}=...' for k in missing)} (in a recipe: algorithm.{missing[0]})"
            )
        if hparams["backbone"] == "mlp" and resolved.get("ways", 0) != 0:
            raise ValueError(
                f"backbone 'mlp' is for regression (one output): ways must be 0, got {resolved['ways']}"
            )
        super().__init__(**resolved)
        self._trial: str | None = None  # a strategy forced while measuring or running chunks
        # gradient checkpointing of the inner steps while meta-training (speed and memory, not results)
        self.checkpoint_inner_steps = False
        self._graph_bytes: dict[str, int] = {}
        self.loss = cross_entropy_per_task if self.task_type == "classification" else mse_per_task

    # ----- what the learner declares --------------------------------------------------------------
    @property
    def task_type(self) -> str:
        """Regression for ``ways = 0`` (the MLP), classification otherwise."""
        return "regression" if self.hparams["ways"] == 0 else "classification"

    @classmethod
    def output_ways(cls, hparams: dict[str, Any]) -> int | None:
        """The ways of the network's output layer (None: regression, or a user's network whose
        number of outputs was not given)."""
        ways = hparams.get("ways")
        return int(ways) if ways else None

    @classmethod
    def data_hparams(cls, config: Config, tasks: TaskSource) -> dict[str, Any]:
        """Image channels (1 for regression), ``ways`` = the most ways of a training task (0 for
        regression) and, when the recipe names none, the backbone: mlp (regression) or conv4."""
        out: dict[str, Any] = {"in_channels": tasks.input_channels()}
        out["ways"] = 0 if tasks.regression else most_ways(config, cls.name)
        if config.algorithm.backbone is None:
            out["backbone"] = "mlp" if tasks.regression else "conv4"
        return out

    # ----- the network ----------------------------------------------------------------------------
    @property
    def functional(self) -> bool:
        """Whether the network is a built-in one, functional over tasks (every strategy runs it)."""
        return self.hparams["backbone"] in BUILTIN

    def build_network(self, backbone: nn.Module | str, num_context_params: int = 0) -> nn.Module:
        """The network: ``backbone`` itself if a module, else built from ``hparams`` (see
        :func:`metaloop.nn.backbones.adaptable_backbone`). A user's network gets per-task batch norm
        (in place; see the module docstring)."""
        h = self.hparams
        if isinstance(backbone, nn.Module):
            network = backbone
        else:
            network = adaptable_backbone(
                backbone,
                int(h["in_channels"]),
                h["hidden"],
                h["ways"],
                num_context_params,
                h.get("backbone_args"),
            )
        if not self.functional:
            swap_norms(network)
            problem = vmap_refusal(network)
            if problem is not None and self.hparams["strategy"] == "vmap":
                raise ValueError(
                    f"strategy 'vmap' is refused for this network: {problem}; use strategy 'loop'"
                )
        return network

    def head_names(self) -> list[str]:
        """Names (in ``self.net``) of the parameters of the network's head, its ``head`` submodule."""
        head = getattr(self.net, "head", None)
        if not isinstance(head, nn.Module):
            raise ValueError(
                f"this {type(self.net).__name__} network has no submodule 'head': name the output layer "
                "'head' (or use anil with head=<submodule name>)"
            )
        return [f"head.{name}" for name, _ in head.named_parameters()]

    def freeze_backbone(self) -> None:
        """Keep every parameter outside the head (:meth:`head_names`) at its pretrained value: the outer
        loop does not change it (the inner loop still adapts what it adapts)."""
        head = set(self.head_names())
        for name, p in self.net.named_parameters():
            if name not in head:
                p.requires_grad_(False)

    def check_network(self, input_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` (expected and actual shapes) unless the network maps two inputs of
        ``input_shape`` to ``[2, ways]`` logits (classification) or ``[2, 1]`` (regression)."""
        _, params, _ = self.inner_problem(meta=False)
        out = probe(lambda x: self.forward(params, x), self.net, input_shape)
        ways = self.fixed_ways
        expected = [2, 1] if self.task_type == "regression" else [2, ways] if ways else None
        if (expected is not None and list(out.shape) != expected) or out.dim() != 2:
            shape = ", ".join(map(str, input_shape))
            want = f"[2, {ways}] (one logit per way)" if ways else "[2, K]" if expected is None else "[2, 1]"
            raise ValueError(
                f"backbone {self.hparams['backbone']} maps inputs [2, {shape}] to {list(out.shape)}, "
                f"but this {self.name} learner for {f'{ways}-way tasks' if ways else self.task_type} "
                f"needs {want}; "
                "change the network's output layer (e.g. through algorithm.backbone_args)"
            )

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
        inner steps exclude ``"vmap"``; a user's network runs ``"loop"`` (``"batched"`` needs the
        built-in functional backbones, and ``"vmap"`` is exact only for some layers)."""
        if not self.functional:
            return ("loop",)
        return tuple(s for s in STRATEGIES if not (self.checkpoint_inner_steps and s == "vmap"))

    # ----- shared machinery ---------------------------------------------------------------------
    def strategy(self, device: torch.device) -> str:
        """The execution strategy for tasks on ``device`` (``"auto"`` resolved): for the built-in
        networks the measured best (:func:`metaloop.inner.choose_strategy`); for a user's network
        ``loop``, the one strategy that is right for every network."""
        strategy = str(self.hparams["strategy"])
        if not self.functional:
            return "loop" if strategy == "auto" else strategy
        return choose_strategy(strategy, device, self.hparams["backbone"] != "mlp")

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

        return fastest_strategy(key, candidates, step, repeats=TRIAL_REPEATS)

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
        regression = self.task_type == "regression"
        ways = self.fixed_ways
        if (batch.ways == 0) != regression or (ways is not None and batch.ways > ways):
            kind = f"classification of up to {ways} ways" if ways else self.task_type
            network = "a network for regression (ways=0)" if batch.ways == 0 else f"ways={batch.ways}"
            raise ValueError(
                f"this {self.name} learner was built for {kind} but the batch has ways = {batch.ways}; "
                f"rebuild it with {network}"
            )

    @staticmethod
    def first_outputs(forward: Forward, ways: int) -> Forward:
        """``forward`` restricted to its first ``ways`` outputs (logits): a task of w < W ways uses
        logits 0..w-1 of the W-way head, and the other W - w never enter its loss."""
        return lambda p, x: forward(p, x)[..., :ways]

    def run_inner(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        steps: int,
        meta: bool,
        every_step: bool = False,
    ) -> tuple[torch.Tensor, Params]:
        """Adapted query outputs ``[T, M, K]`` (with ``every_step``: after each inner step,
        ``[steps, T, M, K]``) and adapted parameters ``{name: [T, ...]}``.

        Classification tasks with fewer ways than the head (labels ``0..w-1``, all present in the
        support set) use its first w logits, so ``K = w``.
        """
        forward, params, lr = self.inner_problem(meta)
        if self.task_type == "classification":
            ways = int(support_y.max()) + 1
            if ways < (self.fixed_ways or 0):
                forward = self.first_outputs(forward, ways)
        strategy = self.active_strategy(support_x, query_x, meta)
        inputs_s, inputs_q = self.inner_inputs(support_x, strategy), self.inner_inputs(query_x, strategy)
        inner = self.inner_loop(meta, strategy)
        # attention's fused kernels have no second derivative: differentiate through plain operations
        attention = nullcontext() if inner.first_order else sdpa_kernel(SDPBackend.MATH)
        try:
            with attention:
                return inner.run(forward, params, lr, inputs_s, support_y, inputs_q, steps, every_step)
        except RuntimeError as error:
            if inner.strategy != "vmap" or self.functional:
                raise
            raise ValueError(
                f"strategy 'vmap' cannot run this {type(self.net).__name__} network ({error}); "
                "use strategy 'loop', which runs any network"
            ) from error

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
            with inner_step(query_step(steps)):  # the queries' pass belongs to the last inner step
                return functional_call(self, frozen, (fast, query_x))[..., :ways]

        return predictor
