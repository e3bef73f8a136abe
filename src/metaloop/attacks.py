"""Adversarial examples in an L∞ ball: FGSM and PGD, for images with pixels in [0, 1].

Both attacks take a differentiable ``logits_fn(x) -> [N, W]`` (a network, or a learner's adapted
predictor), images ``x`` ``[N, C, H, W]`` in [0, 1] and int64 labels ``[N]``; they raise the
cross-entropy of ``logits_fn`` by moving every pixel at most ``epsilon`` (in pixel units of [0, 1]),
and return detached images that stay in [0, 1]. Gradients are taken with respect to the images
only (``torch.autograd.grad``): nothing accumulates in any parameter's ``.grad``, and the attacks
work under ``torch.no_grad()`` as well.

- FGSM: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015,
  arXiv:1412.6572.
- PGD: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
  Adversarial Attacks", ICLR 2018, arXiv:1706.06083.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

ATTACKS = ("fgsm", "pgd")


def check_attack(name: str, epsilon: float, steps: int = 10) -> None:
    """Raise ``ValueError`` unless ``name`` is a known attack, ``0 < epsilon <= 1`` and ``steps >= 1``."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)}")
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(
            f"epsilon must be in (0, 1] (pixel units of images in [0, 1], e.g. 0.1), got {epsilon}"
        )
    if steps < 1:
        raise ValueError(f"a PGD attack needs at least 1 step, got {steps}")


def _input_gradient(logits_fn: LogitsFn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """∇_x of the mean cross-entropy of ``logits_fn(x)`` at ``x = images``: ``[N, C, H, W]``."""
    with torch.enable_grad():
        x = images.detach().requires_grad_()
        loss = F.cross_entropy(logits_fn(x), labels)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(logits_fn: LogitsFn, images: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015, arXiv:1412.6572), one step:

        x_adv = clip_[0,1](x + ε · sign(∇_x L(logits_fn(x), y)))

    Args:
        logits_fn: differentiable map from images ``[N, C, H, W]`` to logits ``[N, W]``.
        images: ``[N, C, H, W]`` in [0, 1].
        labels: int64 ``[N]``, the true classes (the attack moves away from them).
        epsilon: ε, the L∞ radius in pixel units, in (0, 1].

    Returns:
        Detached adversarial images ``[N, C, H, W]`` in [0, 1] with ``|x_adv − x| <= ε``.
    """
    check_attack("fgsm", epsilon)
    grad = _input_gradient(logits_fn, images, labels)
    return (images.detach() + epsilon * grad.sign()).clamp(0.0, 1.0)


def pgd(
    logits_fn: LogitsFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    steps: int = 10,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent on the negative loss (Madry et al. 2018, arXiv:1706.06083):
    a random start in the ball, then ``steps`` signed-gradient steps, each projected back:

        x_0 = clip_[0,1](x + u),  u ~ U[−ε, ε]^{C×H×W}
        x_{k+1} = clip_[0,1](x + clip_[−ε,ε](x_k + a · sign(∇_x L(logits_fn(x_k), y)) − x))

    Args:
        logits_fn, images, labels, epsilon: as for :func:`fgsm`.
        steps: K, the number of gradient steps (default 10).
        step_size: a, in pixel units (default 2.5 · ε / K, so that the K steps together can
            cross the ball, 2ε wide, with room to spare).
        generator: draws the random start (on its device, default the CPU's global generator);
            seed it for a reproducible attack.

    Returns:
        Detached adversarial images ``[N, C, H, W]`` in [0, 1] with ``|x_adv − x| <= ε``.
    """
    check_attack("pgd", epsilon, steps)
    a = 2.5 * epsilon / steps if step_size is None else step_size
    clean = images.detach()
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(clean.shape, generator=generator, dtype=clean.dtype, device=device).to(clean.device)
    x = (clean + epsilon * (2 * noise - 1)).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = _input_gradient(logits_fn, x, labels)
        x = clean + (x + a * grad.sign() - clean).clamp(-epsilon, epsilon)
        x = x.clamp(0.0, 1.0)
    return x


def perturb(
    attack: str,
    logits_fn: LogitsFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial images ``[N, C, H, W]`` by the attack named ``attack`` (``"fgsm"`` or ``"pgd"``;
    ``steps`` and ``generator`` are PGD's)."""
    check_attack(attack, epsilon, steps)
    if attack == "fgsm":
        return fgsm(logits_fn, images, labels, epsilon)
    return pgd(logits_fn, images, labels, epsilon, steps, generator=generator)
