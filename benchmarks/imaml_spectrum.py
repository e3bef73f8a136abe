"""Why iMAML needs its code's damped system on Omniglot: the support Hessian's extreme eigenvalues at
the adapted parameters, and how conjugate gradient (CG) fares on the paper's system and on the damped one.

For each of a few Omniglot 5-way 1-shot meta-training tasks (Vinyals split, 28x28, 1 query per class,
as in the iMAML recipe), a freshly initialised Conv-4 (64 filters, seed 0) is adapted by ``--inner-steps``
proximal SGD steps (α = 0.1, λ = 2). At the adapted φ this script estimates, with Hessian-vector
products of the support loss:

- the eigenvalue of largest magnitude of H (power iteration, 60 products) and the lowest eigenvalue
  (power iteration on c I − H with c = |largest|, 100 products);
- for CG with 1, 3, 5 and 10 steps from 0, the relative residual ||b − A x|| / ||b|| of the returned
  x, for the paper's A = I + H/λ and for the code's damped A = 2 I + H/(λ + 10) (b = ∇L_query(φ)).

The paper's A is positive definite only if the lowest eigenvalue of H is above −λ; CG assumes it.

Run: OMP_NUM_THREADS=1 python benchmarks/imaml_spectrum.py  (reads Omniglot from $METALOOP_DATA;
writes benchmarks/results/imaml_spectrum.json)
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from metaloop.algorithms import IMAML
from metaloop.algorithms.implicit import conjugate_gradient, task_dot
from metaloop.data.omniglot import load_omniglot
from metaloop.tasks.episodes import EpisodeSampler

RESULTS = Path(__file__).resolve().parent / "results"
LAM, INNER_LR = 2.0, 0.1
SYSTEMS = {"paper: I + H/λ": (1.0, LAM), "code: 2 I + H/(λ + 10)": (2.0, LAM + 10.0)}
CG_STEPS = (1, 3, 5, 10)

Params = dict[str, torch.Tensor]
"""Vectors in parameter space with a leading task dimension of 1, as :mod:`metaloop.algorithms.implicit`
takes them."""


def dot(a: Params, b: Params) -> float:
    return task_dot(a, b).item()


def scaled(c: float, a: Params) -> Params:
    return {name: c * v for name, v in a.items()}


def task_report(learner: IMAML, support_x, support_y, query_x, query_y) -> dict[str, object]:
    """Eigenvalue estimates and CG residuals for one task ``[n, 1, 28, 28]`` at its adapted φ."""
    with torch.no_grad():
        steps = int(learner.hparams["inner_steps"])
        _, adapted = learner.run_inner(support_x[None], support_y[None], query_x[None], steps, True)
    forward, _, _ = learner.inner_problem(meta=False)
    phi = {name: v[0].detach().requires_grad_() for name, v in adapted.items()}
    names, leaves = list(phi), list(phi.values())
    support = learner.loss(forward(phi, support_x)[None], support_y[None]).sum()
    support_grads = torch.autograd.grad(support, leaves, create_graph=True)
    query = learner.loss(forward(phi, query_x)[None], query_y[None]).sum()
    b = {name: g[None] for name, g in zip(names, torch.autograd.grad(query, leaves), strict=True)}

    def hessian(v: Params) -> Params:
        inner = sum((g * v[name][0]).sum() for name, g in zip(names, support_grads, strict=True))
        hv = torch.autograd.grad(inner, leaves, retain_graph=True)
        return {name: h[None] for name, h in zip(names, hv, strict=True)}

    generator = torch.Generator().manual_seed(0)
    v = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype)[None] for name, p in phi.items()}
    for _ in range(60):
        hv = hessian(v)
        largest = dot(v, hv) / dot(v, v)
        v = scaled(dot(hv, hv) ** -0.5, hv)
    shift = abs(largest)
    v = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype)[None] for name, p in phi.items()}
    for _ in range(100):
        hv = hessian(v)
        lowest = dot(v, hv) / dot(v, v)
        w = {name: shift * v[name] - hv[name] for name in v}
        v = scaled(dot(w, w) ** -0.5, w)
    residuals = {}
    for label, (identity, divisor) in SYSTEMS.items():

        def matrix(v: Params, identity=identity, divisor=divisor) -> Params:
            return {name: identity * v[name] + h / divisor for name, h in hessian(v).items()}

        row = {}
        for steps in CG_STEPS:
            x = conjugate_gradient(matrix, b, steps)
            r = {name: b[name] - ax for name, ax in matrix(x).items()}
            row[steps] = round((dot(r, r) / dot(b, b)) ** 0.5, 4)
        residuals[label] = row
    return {
        "largest_eigenvalue": round(largest, 3),
        "lowest_eigenvalue": round(lowest, 3),
        "cg_relative_residual": residuals,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "imaml_spectrum.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    learner = IMAML(ways=5, inner_lr=INNER_LR, inner_steps=args.inner_steps, lam=LAM, strategy="loop")
    learner.train()
    batch = EpisodeSampler(load_omniglot("train", 28, download=False), 5, 1, 1, seed=0).sample(args.tasks)
    reports = [
        task_report(learner, batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t])
        for t in range(args.tasks)
    ]
    for t, report in enumerate(reports):
        low, high = report["lowest_eigenvalue"], report["largest_eigenvalue"]
        print(f"task {t}: eigenvalues of H in [{low}, {high}]")
        for label, row in report["cg_relative_residual"].items():
            print(f"  {label:24s} CG relative residual after {list(row)} steps: {list(row.values())}")
    meta = {
        "setting": "Omniglot 5-way 1-shot, 1 query per class, Conv-4 64 filters at initialisation (seed 0)",
        "lam": LAM,
        "inner_lr": INNER_LR,
        "inner_steps": args.inner_steps,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    args.out.write_text(json.dumps({"meta": meta, "tasks": reports}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
