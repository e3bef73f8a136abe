"""One outer step of second-order MAML on the standard Conv-4, as each implementation compared in
``benchmarks/throughput.py`` writes it. Each maker returns ``step(batch)``: meta-gradient of the
mean query loss over the batch's tasks into ``.grad``, then an Adam step.

- ``higher``: the library's MAML example (``higher.innerloop_ctx`` with a differentiable SGD,
  ``copy_initial_weights=False``), ``backward()`` per task.
- ``plain``: a per-task loop over ``torch.func.functional_call`` with
  ``torch.autograd.grad(create_graph=True)`` and ``backward()`` per task.
- ``plain-threads``: the plain loop with its tasks split between two Python threads, each running
  its tasks one after another with one intra-op thread (``torch.set_num_threads`` is per thread),
  on its own copy of the module (``functional_call`` swaps a module's parameters, so one module
  cannot serve two threads), with the same parameter tensors. Each task's meta-gradient comes from
  ``torch.autograd.grad``; the main thread adds them in task order, so the result does not depend
  on which thread finished first. A measurement of task parallelism, not a metaloop strategy.
- ``metaloop``: :class:`metaloop.algorithms.MAML` with the standard Conv-4
  (:class:`metaloop.nn.conv4_standard.StandardConv4`) and :meth:`meta_backward`.

The peers use an ``nn.Module`` of the same architecture (``nn.BatchNorm2d`` with batch
statistics, no running statistics; convolutions without bias).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaloop.algorithms import MAML
from metaloop.nn.conv4_standard import StandardConv4
from metaloop.tasks.episodes import TaskBatch

Step = Callable[[TaskBatch], None]


def module_conv4(hidden: int, ways: int) -> nn.Module:
    """The standard Conv-4 as plain torch modules (for the peers)."""
    layers: list[nn.Module] = []
    for c in (1, hidden, hidden, hidden):
        layers += [
            nn.Conv2d(c, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, ways))


def higher_step(hidden: int, ways: int, inner_lr: float, steps: int) -> Step:
    import higher

    model = module_conv4(hidden, ways)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)

    def step(batch: TaskBatch) -> None:
        meta_opt.zero_grad(set_to_none=True)
        tasks = batch.num_tasks
        for t in range(tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fnet(batch.support_x[t]), batch.support_y[t]))
                (F.cross_entropy(fnet(batch.query_x[t]), batch.query_y[t]) / tasks).backward()
        meta_opt.step()

    return step


def plain_query_loss(
    module: nn.Module, params: dict[str, torch.Tensor], batch: TaskBatch, t: int, inner_lr: float, steps: int
) -> torch.Tensor:
    """Task ``t``'s query loss after ``steps`` differentiable SGD steps from ``params`` on its support
    set (``autograd.grad(create_graph=True)`` through ``functional_call(module, ...)``)."""
    fast = params
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(module, fast, (batch.support_x[t],)), batch.support_y[t])
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {name: p - inner_lr * g for (name, p), g in zip(fast.items(), grads, strict=True)}
    return F.cross_entropy(functional_call(module, fast, (batch.query_x[t],)), batch.query_y[t])


def plain_step(hidden: int, ways: int, inner_lr: float, steps: int) -> Step:
    model = module_conv4(hidden, ways)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    params = dict(model.named_parameters())

    def step(batch: TaskBatch) -> None:
        meta_opt.zero_grad(set_to_none=True)
        tasks = batch.num_tasks
        for t in range(tasks):
            (plain_query_loss(model, params, batch, t, inner_lr, steps) / tasks).backward()
        meta_opt.step()

    step.model = model  # type: ignore[attr-defined]  # for tests
    return step


def plain_threads_step(hidden: int, ways: int, inner_lr: float, steps: int, workers: int = 2) -> Step:
    model = module_conv4(hidden, ways)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    named = dict(model.named_parameters())
    params = tuple(named.values())
    copies = [copy.deepcopy(model) for _ in range(workers)]

    def task_gradient(module: nn.Module, batch: TaskBatch, t: int) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(plain_query_loss(module, named, batch, t, inner_lr, steps), params)

    def step(batch: TaskBatch) -> None:
        tasks = batch.num_tasks
        per_task: list[tuple[torch.Tensor, ...] | None] = [None] * tasks

        def work(worker: int) -> None:
            torch.set_num_threads(1)
            for t in range(worker, tasks, workers):
                per_task[t] = task_gradient(copies[worker], batch, t)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i, p in enumerate(params):
            p.grad = torch.stack([g[i] for g in per_task]).sum(0) / tasks  # type: ignore[index]
        meta_opt.step()

    step.model = model  # type: ignore[attr-defined]  # for tests
    return step


def metaloop_learner(hidden: int, ways: int, inner_lr: float, steps: int, strategy: str) -> MAML:
    learner = MAML(hidden=hidden, ways=ways, inner_lr=inner_lr, inner_steps=steps, strategy=strategy)
    learner.net = StandardConv4(1, hidden, ways)
    return learner


def metaloop_step(hidden: int, ways: int, inner_lr: float, steps: int, strategy: str) -> Step:
    learner = metaloop_learner(hidden, ways, inner_lr, steps, strategy)
    meta_opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step(batch: TaskBatch) -> None:
        meta_opt.zero_grad(set_to_none=True)
        learner.meta_backward(batch)
        meta_opt.step()

    step.learner = learner  # type: ignore[attr-defined]  # for reporting auto's choice
    return step
