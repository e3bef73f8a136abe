"""The one differentiable inner loop: K steps of SGD on a parameter dict, for every task of a batch.

For each task i with support set (x_i, y_i), starting from the shared θ:

    θ_i^0 = θ,    θ_i^{k+1} = θ_i^k − α ⊙ ∇_θ L(f(θ_i^k, x_i), y_i)      (k = 0..K−1)

α is a float, a dict of tensors per parameter tensor (per layer) or a dict of tensors the
shape of each parameter (per element, Meta-SGD); tensors that require grad are meta-learned. A
:class:`PerStep` holds one such α per step k (α_k; MAML++'s per-layer per-step rates).
Second order by default: the inner gradients are part of the graph, so the outer gradient
of a query loss at θ_i^K flows through them (MAML). ``first_order=True`` treats them as
constants (FOMAML, Reptile); the path θ -> θ_i^K (and α -> θ_i^K) stays differentiable.

Proximal term (iMAML, Rajeswaran et al. 2019, arXiv:1909.04630): with ``proximal = λ > 0`` each
task's support objective gains (λ/2) ||θ_i^k − θ̄||², θ̄ = the parameters the adaptation started
from, detached (a constant of the inner problem), summed over every adapted tensor of the task:

    θ_i^{k+1} = θ_i^k − α ⊙ (∇_θ L(f(θ_i^k, x_i), y_i) + λ (θ_i^k − θ̄))

Nothing is stored between calls: every graph lives only as long as the tensors returned.

What a network may know of the loop: :func:`current_inner_step` is k while step k computes its
support loss and while the queries are evaluated at θ_i^{k+1} (so a network may keep per-step
parameters, e.g. MAML++'s per-step batch norm), and ``every_step=True`` returns the query outputs
after every step, not only the last (MAML++'s multi-step loss).

Execution strategies (the same numbers, different speed and memory):

- ``"loop"``: a Python loop over tasks with ``torch.autograd.grad``.
- ``"vmap"``: ``torch.func.vmap`` over tasks with ``torch.func.grad`` inside.
- ``"batched"``: every task in one call. The adapted parameters carry a leading task
  dimension (the shared θ expanded, then per task), convolutions become grouped
  convolutions and batch-norm statistics are per task (:mod:`metaloop.nn.functional`).
  Gradients of the sum of the per-task losses with respect to the ``[T, ...]`` parameters
  are exactly the per-task gradients, because task i's loss depends only on slice i.

Which is fastest depends on the device, the network and the task shape, so ``"auto"`` measures it:
:func:`fastest_strategy` times a few steps of each candidate on the batch at hand and remembers the
winner per key (device, network, shapes) in the process and in ``strategies.json`` under
``$METALOOP_CACHE`` (default ``~/.cache/metaloop``), so later runs on the same machine choose the same.
:func:`choose_strategy` is the rule used where nothing was measured for a key (e.g. ``meta_loss`` or
``adapt`` called directly; ``"loop"`` on the CPU for convolutional networks, ``"batched"`` otherwise).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Params = dict[str, torch.Tensor]
Forward = Callable[[Params, torch.Tensor], torch.Tensor]
"""``forward(params, x)``: outputs ``[n, K]`` for ``x`` ``[n, ...]`` (one task), or ``[T, n, K]`` for
``x`` ``[T, n, ...]`` with parameters carrying a leading ``T`` (strategy ``"batched"``)."""
TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(outputs, targets)``: the mean loss of each task, ``[]`` for one task or ``[T]``."""


@dataclass(frozen=True)
class PerStep:
    """One step size per inner step: ``sizes[k]`` (a float, a tensor or a dict of tensors per
    parameter name) is α_k, used by step k = 0..K−1."""

    sizes: Sequence[float | torch.Tensor | Mapping[str, torch.Tensor]]


StepSize = float | torch.Tensor | Mapping[str, torch.Tensor] | PerStep
Gradients = Callable[[Callable[[Params], torch.Tensor], Params, bool], Params]
"""``grads(objective, params, create_graph)``: gradients of ``objective(params).sum()``."""

STRATEGIES = ("loop", "vmap", "batched")


def choose_strategy(strategy: str, device: torch.device, convolutional: bool = True) -> str:
    """``strategy``, or for ``"auto"`` the measured best: ``"loop"`` for convolutional networks on
    the CPU (see the module docstring), ``"batched"`` otherwise (on CUDA; and for the sinusoid MLP
    on the CPU, where 300 MAML steps of 25 tasks took 6.3 s as a loop, 0.87 s with vmap and
    0.67 s batched)."""
    if strategy == "auto":
        return "loop" if device.type == "cpu" and convolutional else "batched"
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of auto, {', '.join(STRATEGIES)}")
    return strategy


_MEASURED: dict[str, str] = {}  # key -> fastest strategy, this process


def strategy_cache_path() -> Path:
    """``strategies.json`` in ``$METALOOP_CACHE`` (default ``~/.cache/metaloop``)."""
    root = os.environ.get("METALOOP_CACHE") or Path.home() / ".cache" / "metaloop"
    return Path(root) / "strategies.json"


def _read_cache(path: Path) -> dict[str, str]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _write_cache(path: Path, key: str, strategy: str) -> None:
    """Add ``key -> strategy`` to the file atomically (temp file + rename); an unwritable cache is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {**_read_cache(path), key: strategy}
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        temp.replace(path)
    except OSError:
        pass


def remembered_strategy(key: str) -> str | None:
    """The strategy measured for ``key`` in this process or an earlier one on this machine, if any."""
    if key not in _MEASURED:
        stored = _read_cache(strategy_cache_path()).get(key)
        if stored not in STRATEGIES:
            return None
        _MEASURED[key] = stored
    return _MEASURED[key]


def fastest_strategy(
    key: str, candidates: tuple[str, ...], step: Callable[[str], None], repeats: int = 2
) -> str:
    """The candidate whose ``step(strategy)`` ran fastest (best of ``repeats`` timed runs after one
    untimed; the candidates take turns in each repeat), cached per ``key`` in this process and in
    :func:`strategy_cache_path`.

    ``step`` must not change anything a later computation reads (gradients, RNG, buffers): the
    choice changes speed and memory only, never which function is computed. Ties within 5% go to
    the candidate listed first (deterministic preference order).
    """
    if len(candidates) == 1:
        return candidates[0]
    remembered = remembered_strategy(key)
    if remembered in candidates:
        return remembered
    for strategy in candidates:
        step(strategy)  # warm-up: first-call costs (allocations, vmap set-up) are not the steady state
    seconds = {strategy: float("inf") for strategy in candidates}
    for _ in range(repeats):  # interleaved, so a change in the machine's load hits every candidate
        for strategy in candidates:
            start = time.perf_counter()
            step(strategy)
            seconds[strategy] = min(seconds[strategy], time.perf_counter() - start)
    best = min(seconds.values())
    choice = next(s for s in candidates if seconds[s] <= 1.05 * best)
    _MEASURED[key] = choice
    _write_cache(strategy_cache_path(), key, choice)
    return choice


def cross_entropy_per_task(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each task: logits ``[..., n, W]``, int64 labels ``[..., n]`` -> ``[...]``."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return losses.view(labels.shape).mean(-1)


def mse_per_task(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each task: ``[..., n, D]`` and ``[..., n, D]`` -> ``[...]``."""
    return (predictions - targets).pow(2).flatten(-2).mean(-1)


def step_size_for(lr: StepSize, name: str, step: int = 0) -> float | torch.Tensor:
    """α for the parameter ``name`` at inner step ``step``: the float or tensor itself, or the dict's
    entry (of ``lr.sizes[step]`` for a :class:`PerStep`)."""
    if isinstance(lr, PerStep):
        if step >= len(lr.sizes):
            raise ValueError(
                f"inner step {step} has no step size: these per-step step sizes were learned for "
                f"{len(lr.sizes)} steps; run at most that many inner steps"
            )
        lr = lr.sizes[step]
    return lr[name] if isinstance(lr, Mapping) else lr


def detach_step_size(lr: StepSize) -> StepSize:
    """α cut from the graph, for adaptation at test time."""
    if isinstance(lr, PerStep):
        return PerStep([detach_step_size(size) for size in lr.sizes])
    if isinstance(lr, Mapping):
        return {name: value.detach() for name, value in lr.items()}
    return lr.detach() if isinstance(lr, torch.Tensor) else lr


_INNER_STEP: ContextVar[int] = ContextVar("metaloop_inner_step", default=0)


def current_inner_step() -> int:
    """The inner step k that the forward pass running now belongs to: the support pass of step k
    (k = 0..K−1) or the query pass at the parameters step k produced; 0 outside an inner loop."""
    return _INNER_STEP.get()


@contextmanager
def inner_step(step: int) -> Iterator[None]:
    """Forward passes inside belong to inner step ``step`` (see :func:`current_inner_step`)."""
    token = _INNER_STEP.set(step)
    try:
        yield
    finally:
        _INNER_STEP.reset(token)


def query_step(steps: int) -> int:
    """The inner step a query pass after ``steps`` steps belongs to: the last one taken (0 if none)."""
    return max(steps - 1, 0)


def _autograd_gradients(
    objective: Callable[[Params], torch.Tensor], params: Params, create_graph: bool
) -> Params:
    params = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
    value = objective(params).sum()  # per-task losses depend on disjoint slices: the sum separates
    grads = torch.autograd.grad(
        value, list(params.values()), create_graph=create_graph, materialize_grads=True
    )
    return dict(zip(params, grads, strict=True))


def _func_gradients(
    objective: Callable[[Params], torch.Tensor], params: Params, create_graph: bool
) -> Params:
    grads = torch.func.grad(objective)(params)
    return grads if create_graph else {k: g.detach() for k, g in grads.items()}


@dataclass(frozen=True)
class InnerLoop:
    """SGD adaptation of a parameter dict on each task's support set.

    Args:
        loss: per-task loss, e.g. :func:`cross_entropy_per_task` or :func:`mse_per_task`.
        first_order: treat the inner gradients as constants (no second derivatives).
        strategy: ``"loop"``, ``"vmap"`` or ``"batched"`` (see the module docstring).
        checkpoint_steps: gradient checkpointing of the inner steps (second order, ``"loop"`` and
            ``"batched"``): each step keeps only its input parameters and is recomputed during the
            backward pass, so the graph held no longer grows with the number of steps, for about
            one more forward and inner-gradient computation per step.
        proximal: λ of the proximal term (λ/2) ||θ_i − θ̄||² added to each task's support
            objective (see the module docstring); 0 (the default) adds nothing.
    """

    loss: TaskLoss
    first_order: bool = False
    strategy: str = "loop"
    checkpoint_steps: bool = False
    proximal: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.checkpoint_steps and self.strategy == "vmap":
            raise ValueError(
                "checkpoint_steps works with strategy 'loop' or 'batched' (torch.func.grad under vmap "
                "does not allow checkpointing); choose one of those or turn checkpointing off"
            )

    def _adapt_one(
        self,
        forward: Forward,
        params: Params,
        lr: StepSize,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        grads: Gradients,
        every_step: bool = False,
    ) -> list[Params]:
        """``steps`` SGD steps from ``params`` on one task (or on all tasks, batched): the parameters
        after each step ``[θ^1, ..., θ^K]`` with ``every_step``, else ``[θ^K]`` (``[θ^0]`` for no step)."""
        create_graph = not self.first_order
        names = list(params)
        start = {name: p.detach() for name, p in params.items()}  # θ̄ of the proximal term

        def objective(p: Params) -> torch.Tensor:
            losses = self.loss(forward(p, x), y)  # [] for one task, [T] batched
            if not self.proximal:
                return losses
            # (λ/2) ||p − θ̄||² per task: the parameters' leading dimensions are the losses' (tasks)
            squares = sum((p[n] - start[n]).pow(2).flatten(losses.dim()).sum(-1) for n in names)
            return losses + 0.5 * self.proximal * squares

        def step(k: int, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            current = dict(zip(names, values, strict=True))
            with inner_step(k):  # inside, so that a checkpoint's recomputation sees the same k
                g = grads(objective, current, create_graph)
            return tuple(current[name] - step_size_for(lr, name, k) * g[name] for name in names)

        values = tuple(params.values())
        trajectory = [] if steps else [params]
        for k in range(steps):
            if self.checkpoint_steps and create_graph and torch.is_grad_enabled():
                values = checkpoint(step, k, *values, use_reentrant=False)
            else:
                values = step(k, *values)
            if every_step or k == steps - 1:
                trajectory.append(dict(zip(names, values, strict=True)))
        return trajectory

    def run(
        self,
        forward: Forward,
        params: Params,
        lr: StepSize,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        steps: int,
        every_step: bool = False,
    ) -> tuple[torch.Tensor, Params]:
        """Adapt ``params`` to each task, then apply the adapted parameters to its queries.

        Args:
            forward: see :data:`Forward`; parameters not in ``params`` are its business
                (shared, fixed during adaptation).
            params: θ, the parameters to adapt, shared by all tasks.
            lr: α, see the module docstring.
            support_x: ``[T, N, ...]``; support_y: ``[T, N, ...]``; query_x: ``[T, M, ...]``.
            steps: K.
            every_step: also evaluate the queries after every step, not only the last.

        Returns:
            ``forward(θ_i^K, query_x[i])`` stacked to ``[T, M, ...]`` (with ``every_step``: after
            each step k = 1..K, ``[K, T, M, ...]``), differentiable with respect to θ, α and whatever
            ``forward`` closes over; and the adapted parameters ``{name: [T, *shape]}`` after the last
            step. Adaptation runs with gradients enabled even under ``torch.no_grad()``; the query
            passes follow the caller's grad mode. The query pass after step k runs as inner step k
            (:func:`current_inner_step`).
        """
        if every_step and steps < 1:
            raise ValueError("every_step needs at least one inner step (steps >= 1)")
        first = 0 if every_step else query_step(steps)  # the inner step of trajectory[0]

        def queries(trajectory: list[Params], qx: torch.Tensor) -> torch.Tensor:
            outputs = []
            for index, fast in enumerate(trajectory):
                with inner_step(first + index):
                    outputs.append(forward(fast, qx))
            return torch.stack(outputs) if every_step else outputs[0]

        tasks = support_x.shape[0]
        if self.strategy == "loop":
            outputs, adapted = [], []
            for t in range(tasks):
                with torch.enable_grad():
                    trajectory = self._adapt_one(
                        forward,
                        params,
                        lr,
                        support_x[t],
                        support_y[t],
                        steps,
                        _autograd_gradients,
                        every_step,
                    )
                outputs.append(queries(trajectory, query_x[t]))
                adapted.append(trajectory[-1])
            stacked = {name: torch.stack([fast[name] for fast in adapted]) for name in params}
            return torch.stack(outputs, dim=1 if every_step else 0), stacked
        if self.strategy == "vmap":

            def one_task(x: torch.Tensor, y: torch.Tensor, qx: torch.Tensor) -> tuple[torch.Tensor, Params]:
                with torch.enable_grad():
                    trajectory = self._adapt_one(
                        forward, params, lr, x, y, steps, _func_gradients, every_step
                    )
                return queries(trajectory, qx), trajectory[-1]

            outputs, adapted = torch.func.vmap(one_task)(support_x, support_y, query_x)
            return (outputs.transpose(0, 1) if every_step else outputs), adapted
        expanded = {name: p.expand(tasks, *p.shape) for name, p in params.items()}
        with torch.enable_grad():
            trajectory = self._adapt_one(
                forward, expanded, lr, support_x, support_y, steps, _autograd_gradients, every_step
            )
        return queries(trajectory, query_x), trajectory[-1]
