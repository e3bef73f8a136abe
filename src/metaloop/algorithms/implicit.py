"""Implicit meta-gradients (iMAML; Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit
Gradients", NeurIPS 2019, arXiv:1909.04630): conjugate gradient on Hessian-vector products.

For task i with adapted parameters φ_i ≈ argmin_φ L_support_i(φ) + (λ/2) ||φ − θ||², the implicit
function theorem gives dφ_i/dθ = (I + H_i/λ)^{-1} with H_i = ∇²_φ L_support_i(φ_i), so

    g_i = (I + H_i/λ)^{-1} ∇_φ L_query_i(φ_i)

is task i's meta-gradient, whatever path the inner solver took to φ_i. It is found by ``steps``
steps of conjugate gradient (CG) on (I + H_i/λ) g = ∇_φ L_query_i(φ_i) from g = 0, where each
matrix-vector product is one Hessian-vector product (a double backward of the support loss at φ_i).
Only the graph of one support-loss gradient per task is held, never the inner steps, so memory does
not depend on their number. ``steps = 0`` is the first-order shortcut g_i = ∇_φ L_query_i(φ_i).

Damping (the paper's code, aravindr93/imaml_dev, ``matrix_evaluator``): with ``damping`` μ and
``lam_damping`` ν the system solved is ((1 + μ) I + H_i/(λ + ν)) g = ∇_φ L_query_i(φ_i); μ = ν = 0 is
the paper's equation. The equation needs I + H_i/λ positive definite, which fails wherever the support
Hessian has an eigenvalue below −λ. On Omniglot 5-way 1-shot with the Conv-4 at initialisation, after
5 proximal steps, its extreme eigenvalues were about −9 and +37 (``benchmarks/imaml_spectrum.py``): at
λ = 2, CG on the equation's system ended with a residual larger than its right-hand side, while on the
code's system (μ = 1, ν = 10, positive definite there) 5 steps left 0.1% of it.

Parameter dicts here carry a leading task dimension ``[T, ...]``: CG runs for all T tasks at once,
with per-task dot products, step sizes and directions, exactly T independent solves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metaloop.inner import Forward, Params, TaskLoss

MatVec = Callable[[Params], Params]
"""``matvec(v)``: A_t v_t for each task t, dicts of ``[T, ...]`` tensors."""


def task_dot(a: Params, b: Params) -> torch.Tensor:
    """Per-task inner product ``[T]`` of two dicts of ``[T, ...]`` tensors."""
    return sum((a[name] * b[name]).flatten(1).sum(1) for name in a)


def _scaled(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``c[t] * v[t]`` for per-task scalars ``c`` ``[T]`` and ``v`` ``[T, ...]``."""
    return c.view(-1, *([1] * (v.dim() - 1))) * v


def conjugate_gradient(matvec: MatVec, b: Params, steps: int) -> Params:
    """``steps`` iterations of conjugate gradient on A_t x_t = b_t for every task t, from x = 0
    (Hestenes & Stiefel). A_t must be symmetric; a task whose residual or curvature along the
    search direction is exactly 0 stops moving (its x is final).

    Args:
        matvec: v -> A v (see :data:`MatVec`).
        b: right-hand sides ``{name: [T, ...]}``.
        steps: CG iterations; 0 returns x = b (no solve: the first-order shortcut of iMAML).
    """
    if steps == 0:
        return {name: v.clone() for name, v in b.items()}
    x = {name: torch.zeros_like(v) for name, v in b.items()}
    r = {name: v.clone() for name, v in b.items()}
    p = {name: v.clone() for name, v in b.items()}
    rr = task_dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        curvature = task_dot(p, ap)
        alpha = torch.where(curvature != 0, rr / torch.where(curvature != 0, curvature, 1), 0)
        x = {name: x[name] + _scaled(alpha, p[name]) for name in x}
        r = {name: r[name] - _scaled(alpha, ap[name]) for name in r}
        rr_next = task_dot(r, r)
        beta = torch.where(rr != 0, rr_next / torch.where(rr != 0, rr, 1), 0)
        p = {name: r[name] + _scaled(beta, p[name]) for name in p}
        rr = rr_next
    return x


def implicit_gradients(
    forward: Forward,
    loss: TaskLoss,
    adapted: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    lam: float,
    steps: int,
    batched: bool,
    damping: float = 0.0,
    lam_damping: float = 0.0,
) -> tuple[Params, torch.Tensor]:
    """Each task's implicit meta-gradient g_i = (I + H_i/λ)^{-1} ∇_φ L_query_i(φ_i) (module docstring).

    Args:
        forward: the inner problem's ``forward(params, x)`` (:data:`metaloop.inner.Forward`).
        loss: per-task loss (:data:`metaloop.inner.TaskLoss`).
        adapted: φ, ``{name: [T, ...]}`` (e.g. from :meth:`metaloop.inner.InnerLoop.run`); detached here.
        support_x, support_y, query_x, query_y: the tasks, ``[T, n, ...]``.
        lam: λ > 0 of the proximal term.
        steps: CG iterations (0: g_i = ∇_φ L_query_i(φ_i)).
        batched: ``forward`` takes parameters with a leading task dimension and all tasks at once
            (the built-in networks, strategy ``"batched"``); else one task at a time (any network).
        damping, lam_damping: μ and ν of the damped system (module docstring); 0 and 0: the equation.

    Returns:
        g ``{name: [T, ...]}`` and the query losses ``[T]`` at φ (detached).
    """
    system = (1.0 + damping, lam + lam_damping)
    if batched:
        return _solve(forward, loss, adapted, support_x, support_y, query_x, query_y, system, steps)

    def one_task(p: Params, x: torch.Tensor) -> torch.Tensor:  # [1, ...] parameters -> [1, n, K]
        return forward({name: v[0] for name, v in p.items()}, x[0])[None]

    grads, losses = [], []
    for t in range(support_x.shape[0]):
        task = {name: v[t : t + 1] for name, v in adapted.items()}
        g, task_loss = _solve(
            one_task,
            loss,
            task,
            support_x[t : t + 1],
            support_y[t : t + 1],
            query_x[t : t + 1],
            query_y[t : t + 1],
            system,
            steps,
        )
        grads.append(g)
        losses.append(task_loss)
    return {name: torch.cat([g[name] for g in grads]) for name in adapted}, torch.cat(losses)


def _solve(
    forward: Forward,
    loss: TaskLoss,
    adapted: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    system: tuple[float, float],
    steps: int,
) -> tuple[Params, torch.Tensor]:
    """:func:`implicit_gradients` for a ``forward`` over ``[T, ...]`` parameters and ``[T, n, ...]``
    inputs, solving (c I + H/d) g = ∇L_query for ``system = (c, d)``. Task t's losses depend only on
    slice t, so gradients of sums are per-task gradients."""
    identity_scale, hessian_divisor = system
    with torch.enable_grad():
        phi = {name: v.detach().requires_grad_() for name, v in adapted.items()}
        names, leaves = list(phi), list(phi.values())
        query_losses = loss(forward(phi, query_x), query_y)  # [T]
        query_grads = torch.autograd.grad(query_losses.sum(), leaves, materialize_grads=True)
        rhs = dict(zip(names, query_grads, strict=True))
        if steps == 0:
            return conjugate_gradient(lambda v: v, rhs, 0), query_losses.detach()
        support_losses = loss(forward(phi, support_x), support_y)  # [T]
        support_grads = torch.autograd.grad(
            support_losses.sum(), leaves, create_graph=True, materialize_grads=True
        )

        def matvec(v: Params) -> Params:
            """(c I + H/d) v per task: one double backward through the support gradient."""
            inner = sum((g * v[name]).sum() for name, g in zip(names, support_grads, strict=True))
            if not inner.requires_grad:  # the support loss is linear in φ: H = 0
                return {name: identity_scale * x for name, x in v.items()}
            hv = torch.autograd.grad(inner, leaves, retain_graph=True, materialize_grads=True)
            scaled = zip(names, hv, strict=True)
            return {name: identity_scale * v[name] + h / hessian_divisor for name, h in scaled}

        return conjugate_gradient(matvec, rhs, steps), query_losses.detach()
