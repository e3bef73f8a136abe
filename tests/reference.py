"""Slow, obviously correct reference computations of the optimisation-based meta-learners.

Independent of the library's functional modules and inner loop: each network is written out
with ``F.conv2d`` / ``F.linear`` and batch norm from its definition, tasks run in a plain
Python loop, inner gradients come from ``torch.autograd.grad(create_graph=True)``. Used by
the tests (gradients must agree to 1e-8 in float64) and by ``benchmarks/throughput.py``
(the "reference loop" baseline). Parameter names follow the library's modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from metaloop.tasks.episodes import TaskBatch

Params = dict[str, torch.Tensor]
Net = Callable[..., torch.Tensor]


def conv_net(
    p: Params, x: torch.Tensor, context: torch.Tensor | None = None, film_layer: int = 2
) -> torch.Tensor:
    """MAML's Conv-4 on one task: x ``[n, C, H, W]`` -> logits ``[n, W]``."""
    h = x
    for i in range(4):
        h = F.conv2d(h, p[f"blocks.{i}.conv"], stride=2, padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5)
        h = h * p[f"blocks.{i}.scale"].view(1, -1, 1, 1) + p[f"blocks.{i}.shift"].view(1, -1, 1, 1)
        if context is not None and i == film_layer:
            film = F.linear(context, p["film.weight"], p["film.bias"])
            channels = h.shape[1]
            gamma, beta = film[:channels], film[channels:]
            h = h * (1 + gamma.view(1, -1, 1, 1)) + beta.view(1, -1, 1, 1)
        h = F.relu(h)
    return F.linear(h.mean(dim=(2, 3)), p["head.weight"], p["head.bias"])


def standard_conv_net(p: Params, x: torch.Tensor) -> torch.Tensor:
    """The standard Conv-4 on one task (3x3 conv with padding 1, batch norm, ReLU, 2x2 max-pool;
    flattened features, linear head): x ``[n, C, H, W]`` -> logits ``[n, W]``."""
    h = x
    for i in range(4):
        h = F.conv2d(h, p[f"blocks.{i}.conv"], padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5)
        h = h * p[f"blocks.{i}.scale"].view(1, -1, 1, 1) + p[f"blocks.{i}.shift"].view(1, -1, 1, 1)
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), p["head.weight"], p["head.bias"])


def mlp_net(p: Params, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """The sinusoid MLP on one task: x ``[n, 1]`` -> ``[n, 1]``; context concatenated to the input."""
    if context is not None:
        x = torch.cat([x, context.unsqueeze(0).repeat(x.shape[0], 1)], dim=1)
    h = F.relu(F.linear(x, p["layers.0.weight"], p["layers.0.bias"]))
    h = F.relu(F.linear(h, p["layers.1.weight"], p["layers.1.bias"]))
    return F.linear(h, p["head.weight"], p["head.bias"])


def task_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer labels, mean squared error otherwise."""
    if targets.dtype == torch.int64:
        return F.cross_entropy(outputs, targets)
    return ((outputs - targets) ** 2).mean()


def _step_size(lr: float | torch.Tensor | Params, name: str) -> float | torch.Tensor:
    return lr[name] if isinstance(lr, dict) else lr


def sgd_steps(
    net: Net,
    params: Params,
    names: list[str],
    lr: float | torch.Tensor | Params,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    first_order: bool,
) -> Params:
    """``steps`` SGD steps on the parameters ``names`` of ``params``; returns all parameters."""
    params = dict(params)
    for _ in range(steps):
        loss = task_loss(net(params, x), y)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        for name, grad in zip(names, grads, strict=True):
            if first_order:
                grad = grad.detach()
            params[name] = params[name] - _step_size(lr, name) * grad
    return params


def maml_loss(
    net: Net,
    params: Params,
    batch: TaskBatch,
    lr: float | torch.Tensor | Params,
    steps: int,
    first_order: bool = False,
    names: list[str] | None = None,
) -> torch.Tensor:
    """(1/T) Σ_t L_query_t(θ_t), θ_t after ``steps`` SGD steps on ``names`` (default: all).

    Covers MAML, FOMAML (``first_order``), Meta-SGD (``lr`` a dict of tensors) and ANIL
    (``names`` the head's parameters)."""
    names = list(params) if names is None else names
    total = 0.0
    for t in range(batch.num_tasks):
        adapted = sgd_steps(
            net, params, names, lr, batch.support_x[t], batch.support_y[t], steps, first_order
        )
        total = total + task_loss(net(adapted, batch.query_x[t]), batch.query_y[t])
    return total / batch.num_tasks


def maml_plus_plus_loss(
    net: Net,
    params: Params,
    batch: TaskBatch,
    lr: float | Params,
    steps: int,
    weights: list[float] | None,
    first_order: bool = False,
    step_norm: Params | None = None,
) -> torch.Tensor:
    """MAML++'s meta-loss written out: per task, ``steps`` SGD steps where step k uses the step
    size ``lr`` (a float, or per parameter name a tensor ``[steps]`` indexed by k) and, for each
    name in ``step_norm`` (tensors ``[steps, C]``), that parameter's row k instead of ``params``';
    the query loss after step k is weighted by ``weights[k]`` (None: only the last step counts)."""
    step_norm = step_norm or {}
    names = [name for name in params if name not in step_norm]
    total = 0.0
    for t in range(batch.num_tasks):
        adapted = {name: params[name] for name in names}
        for k in range(steps):
            at_k = {**adapted, **{name: rows[k] for name, rows in step_norm.items()}}
            loss = task_loss(net(at_k, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, [adapted[n] for n in names], create_graph=not first_order)
            adapted = {
                name: adapted[name] - (lr[name][k] if isinstance(lr, dict) else lr) * grad
                for name, grad in zip(names, grads, strict=True)
            }
            if weights is not None or k == steps - 1:
                at_k = {**adapted, **{name: rows[k] for name, rows in step_norm.items()}}
                query = task_loss(net(at_k, batch.query_x[t]), batch.query_y[t])
                total = total + (1.0 if weights is None else weights[k]) * query
    return total / batch.num_tasks


def cavia_loss(
    net: Net,
    params: Params,
    batch: TaskBatch,
    lr: float,
    steps: int,
    num_context: int,
    first_order: bool = False,
) -> torch.Tensor:
    """(1/T) Σ_t L_query_t(φ_t, θ), φ_t after ``steps`` SGD steps from φ = 0 on the support set."""
    total = 0.0
    for t in range(batch.num_tasks):
        context = torch.zeros(
            num_context, dtype=batch.support_x.dtype, device=batch.support_x.device, requires_grad=True
        )
        for _ in range(steps):
            loss = task_loss(net(params, batch.support_x[t], context), batch.support_y[t])
            (grad,) = torch.autograd.grad(loss, [context], create_graph=True)
            context = context - lr * (grad.detach() if first_order else grad)
        total = total + task_loss(net(params, batch.query_x[t], context), batch.query_y[t])
    return total / batch.num_tasks


def reptile_gradient(
    net: Net, params: Params, batch: TaskBatch, lr: float, steps: int
) -> tuple[Params, torch.Tensor]:
    """g = θ − (1/T) Σ_t θ_t, θ_t after ``steps`` SGD steps on task t's support set; and the
    mean query loss at the θ_t."""
    start = {name: p.detach().requires_grad_() for name, p in params.items()}
    total = {name: torch.zeros_like(p) for name, p in start.items()}
    query_loss = 0.0
    for t in range(batch.num_tasks):
        adapted = sgd_steps(net, start, list(start), lr, batch.support_x[t], batch.support_y[t], steps, True)
        for name in total:
            total[name] += adapted[name].detach()
        with torch.no_grad():
            query_loss = query_loss + task_loss(net(adapted, batch.query_x[t]), batch.query_y[t])
    g = {name: start[name].detach() - total[name] / batch.num_tasks for name in start}
    return g, query_loss / batch.num_tasks


def reptile_adam_gradient(
    net: Net,
    params: Params,
    batch: TaskBatch,
    lr: float,
    batches: list[torch.Tensor],
    optimizer_state: dict | None = None,
) -> tuple[Params, torch.Tensor, torch.optim.Adam]:
    """Reptile as Nichol et al.'s code runs it: one ``torch.optim.Adam(betas=(0, 0.999))`` whose
    state persists from task to task; each task restarts from θ and takes a step on each
    minibatch ``batches[t][j]`` (support rows). Returns g = θ − (1/T) Σ_t θ_t, the mean query
    loss at the θ_t and the optimiser (its state is what the next meta-batch starts from)."""
    start = {name: p.detach().clone() for name, p in params.items()}
    weights = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    optimizer = torch.optim.Adam(list(weights.values()), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    total = {name: torch.zeros_like(p) for name, p in start.items()}
    query_loss = 0.0
    for t in range(batch.num_tasks):
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(start[name])
        for rows in batches[t]:
            optimizer.zero_grad()
            task_loss(net(weights, batch.support_x[t][rows]), batch.support_y[t][rows]).backward()
            optimizer.step()
        with torch.no_grad():
            for name in total:
                total[name] += weights[name]
            query_loss = query_loss + task_loss(net(weights, batch.query_x[t]), batch.query_y[t])
    g = {name: start[name] - total[name] / batch.num_tasks for name in start}
    return g, query_loss / batch.num_tasks, optimizer


def meta_gradient(loss: torch.Tensor, tensors: Params) -> Params:
    """∂loss/∂tensor for each named tensor."""
    grads = torch.autograd.grad(loss, list(tensors.values()))
    return dict(zip(tensors, grads, strict=True))


def proximal_sgd(
    net: Net, params: Params, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, lam: float
) -> Params:
    """φ after ``steps`` plain SGD steps on L(net(φ, x), y) + (λ/2) ||φ − θ||² from φ = θ (no graph)."""
    theta = {name: p.detach() for name, p in params.items()}
    phi = dict(theta)
    for _ in range(steps):
        leaves = {name: p.requires_grad_() for name, p in ((n, v.detach().clone()) for n, v in phi.items())}
        loss = task_loss(net(leaves, x), y)
        loss = loss + 0.5 * lam * sum(((leaves[n] - theta[n]) ** 2).sum() for n in leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        phi = {name: (leaves[name] - lr * g).detach() for name, g in zip(leaves, grads, strict=True)}
    return phi


def flat_function(
    net: Net, params: Params, x: torch.Tensor, y: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``w -> L(net(w, x), y)`` over the parameters flattened into one vector (in dict order)."""
    shapes = {name: p.shape for name, p in params.items()}

    def loss(w: torch.Tensor) -> torch.Tensor:
        p, offset = {}, 0
        for name, shape in shapes.items():
            size = shape.numel()
            p[name] = w[offset : offset + size].view(shape)
            offset += size
        return task_loss(net(p, x), y)

    return loss


def textbook_cg(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` iterations of conjugate gradient on the dense system a x = b from x = 0."""
    x, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    for _ in range(steps):
        ap = a @ p
        alpha = (r @ r) / (p @ ap)
        x = x + alpha * p
        r_next = r - alpha * ap
        p = r_next + ((r_next @ r_next) / (r @ r)) * p
        r = r_next
    return x


def imaml_gradient(
    net: Net,
    params: Params,
    batch: TaskBatch,
    lr: float,
    steps: int,
    lam: float,
    cg_steps: int | None = None,
    lam_in_solve: bool = True,
    damping: float = 0.0,
    lam_damping: float = 0.0,
) -> tuple[Params, torch.Tensor]:
    """iMAML's meta-gradient (1/T) Σ_t (I + H_t/λ)^{-1} ∇L_query_t(φ_t) from the dense Hessian H_t of
    the support loss at φ_t (:func:`proximal_sgd`), solved exactly (``cg_steps=None``, LU) or by
    ``cg_steps`` textbook CG iterations; and the mean query loss at the φ_t. ``lam_in_solve=False``
    is a wrong formula the tests show apart: (I + H_t)^{-1} ∇L_query_t(φ_t). ``damping`` μ and
    ``lam_damping`` ν give the paper code's system ((1 + μ) I + H_t/(λ + ν))."""
    flat_total, query_loss = 0.0, 0.0
    for t in range(batch.num_tasks):
        phi = proximal_sgd(net, params, batch.support_x[t], batch.support_y[t], lr, steps, lam)
        w = torch.cat([p.flatten() for p in phi.values()])
        query = flat_function(net, phi, batch.query_x[t], batch.query_y[t])
        w_leaf = w.clone().requires_grad_()
        value = query(w_leaf)
        (v,) = torch.autograd.grad(value, [w_leaf])
        support = flat_function(net, phi, batch.support_x[t], batch.support_y[t])
        hessian = torch.autograd.functional.hessian(support, w, vectorize=True)
        identity = (1.0 + damping) * torch.eye(len(w), dtype=w.dtype)
        a = identity + hessian / ((lam + lam_damping) if lam_in_solve else 1.0)
        g = torch.linalg.solve(a, v) if cg_steps is None else textbook_cg(a, v, cg_steps)
        flat_total = flat_total + g
        query_loss = query_loss + value.detach()
    flat, out, offset = flat_total / batch.num_tasks, {}, 0
    for name, p in params.items():
        out[name] = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return out, query_loss / batch.num_tasks


def imaml_query_loss(
    net: Net, params: Params, batch: TaskBatch, lr: float, steps: int, lam: float
) -> torch.Tensor:
    """(1/T) Σ_t L_query_t(φ_t(θ)) with φ_t from :func:`proximal_sgd` (for finite differences)."""
    total = 0.0
    for t in range(batch.num_tasks):
        phi = proximal_sgd(net, params, batch.support_x[t], batch.support_y[t], lr, steps, lam)
        total = total + task_loss(net(phi, batch.query_x[t]), batch.query_y[t])
    return total / batch.num_tasks
