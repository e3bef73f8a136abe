"""ADML: Yin, Tang, Xu & Wang, "Adversarial Meta-Learning", 2018, arXiv:1806.03316.

MAML trained on clean and adversarial examples "in an adversarial manner": the parameters adapted
on clean support examples are judged on adversarial queries, and those adapted on adversarial
support examples on clean queries (the paper's Algorithm 1).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from metaloop.algorithms.gradient_based import map_tasks
from metaloop.algorithms.maml import MAML
from metaloop.attacks import check_attack, perturb
from metaloop.tasks.episodes import TaskBatch


class ADML(MAML):
    """ADversarial Meta-Learner: a MAML initialisation meta-trained on clean and adversarial tasks.

    The meta-parameters ω are the network's initial weights θ, as in MAML. For each task i of a
    meta-batch, with clean support set S_i, clean query set Q_i and f_θ the network at the current θ:

        S_i^adv = attack(f_θ, S_i),   Q_i^adv = attack(f_θ, Q_i)          (ε-ball, no gradient)
        φ_i^clean = θ − α ∇_θ L(f_θ, S_i)                               (K = ``inner_steps`` steps)
        φ_i^adv   = θ − α ∇_θ L(f_θ, S_i^adv)                           (K steps)
        θ ← θ − β ∇_θ (1/T) Σ_i [ L(f_{φ_i^clean}, Q_i^adv) + L(f_{φ_i^adv}, Q_i) ]

    The pairing is the paper's: clean-adapted parameters meet adversarial queries and
    adversarial-adapted parameters meet clean queries (Algorithm 1 splits each task's 2K clean and
    2K adversarial samples into an inner part D_a and an outer part D_b; here D_a is the support set
    and D_b the query set). The differences from Algorithm 1, all deliberate:

    - one inner step size α for both inner updates (the paper allows α1 for clean, α2 for adversarial);
    - one outer step on the sum of the two query losses, with the trainer's optimiser and β, where
      the paper takes two successive steps (β1 on the adversarial-query loss, then β2 on the
      clean-query loss); to first order in β the two are the same;
    - the adversarial examples are made once per outer step, against f_θ, with batch-norm
      statistics of the set being attacked (support and query separately, each task on its own);
      they are constants of the outer loss: the meta-gradient does not flow through the attack.

    Second order like :class:`MAML` (``first_order=True`` cuts the inner gradients). Test time
    (``predict`` / ``adapt``) is MAML's: ``eval_inner_steps`` steps on the clean support set.
    Images must lie in [0, 1] (the attack clips to that range), so only image classifiers are
    accepted (conv4, resnet12 or a user's network).

    Args:
        backbone, in_channels, hidden, ways, inner_lr, inner_steps, eval_inner_steps, first_order,
            strategy, backbone_args: as for :class:`MAML` (α = ``inner_lr``, default 0.4 as MAML's
            Omniglot value).
        attack: ``"fgsm"`` (default; the paper makes its adversarial samples with FGSM) or ``"pgd"``.
        epsilon: ε, the L∞ radius in pixel units of [0, 1] images (default 0.1: our choice for
            Omniglot's binary strokes; the paper's experiments are on MiniImageNet and CIFAR100).
        attack_steps: PGD's steps (step size 2.5 ε / steps); unused by FGSM. PGD's random starts
            come from torch's global generator (seeded by the trainer and saved in checkpoints); they
            depend on how a meta-batch is split over torchrun processes, FGSM has none.

    Example:
        >>> learner = ADML(backbone="conv4", in_channels=1, hidden=64, ways=5, epsilon=0.1)
        >>> loss, metrics = learner.meta_loss(batch)    # batch: a TaskBatch of 5-way tasks
        >>> loss.backward(); optimizer.step()
        >>> logits = learner.adapt(support_x, support_y)(query_x)   # [N, 5]
    """

    name = "adml"
    task_types = ("classification",)
    config_keys = (*MAML.config_keys, "attack", "epsilon", "attack_steps")
    bf16_safe = False  # like MAML: bf16/fp32 meta-gradient cosine about 0.91 (tests/test_amp.py)

    def __init__(
        self,
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        hidden: int | None = None,
        ways: int | None = None,
        inner_lr: float | None = None,
        inner_steps: int | None = None,
        eval_inner_steps: int | None = None,
        first_order: bool | None = None,
        strategy: str = "auto",
        attack: str = "fgsm",
        epsilon: float = 0.1,
        attack_steps: int = 10,
        backbone_args: dict | None = None,
    ) -> None:
        if backbone == "mlp" or ways == 0:
            raise ValueError(
                "adml attacks images in [0, 1] and needs an image classifier (conv4, resnet12 or your "
                "network), not regression (for regression use maml)"
            )
        check_attack(attack, epsilon, attack_steps)
        super().__init__(
            backbone,
            in_channels,
            hidden,
            ways,
            inner_lr,
            inner_steps,
            eval_inner_steps,
            first_order,
            strategy,
            backbone_args,
        )
        self.hparams.update(attack=attack, epsilon=epsilon, attack_steps=attack_steps)

    def splits_by_task(self) -> bool:
        """FGSM: yes (every task is attacked on its own). PGD: no, its random starts are drawn for
        the whole batch at once, so chunks would draw different ones."""
        return self.hparams["attack"] == "fgsm"

    def adversarial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Detached adversarial images ``[T, n, C, H, W]`` for images ``x`` ``[T, n, C, H, W]`` with
        labels ``y`` ``[T, n]``, against f_θ at the current θ (each task its own batch-norm batch)."""
        tasks, n = y.shape
        frozen = {name: p.detach() for name, p in self.net.named_parameters()}

        def one_task(images: torch.Tensor) -> torch.Tensor:  # [(T,) n, C, H, W] -> [(T,) n, W]
            return functional_call(self.net, frozen, (images,))

        def logits_fn(images: torch.Tensor) -> torch.Tensor:  # [T*n, C, H, W] -> [T*n, W]
            per_task = images.view(tasks, n, *images.shape[1:])  # [T, n, C, H, W]
            return map_tasks(one_task, per_task, "batched" if self.functional else "loop").flatten(0, 1)

        h = self.hparams
        attack, epsilon, steps = str(h["attack"]), float(h["epsilon"]), int(h["attack_steps"])
        return perturb(attack, logits_fn, x.flatten(0, 1), y.flatten(), epsilon, steps).view_as(x)

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """(1/T) Σ_i [L(f_{φ_i^clean}, Q_i^adv) + L(f_{φ_i^adv}, Q_i)] and its metrics: ``loss``,
        ``accuracy`` (the mean of the two query accuracies), ``adv_query_accuracy`` (φ^clean on
        Q^adv) and ``clean_query_accuracy`` (φ^adv on Q)."""
        self.check_batch(batch)
        steps = int(self.hparams["inner_steps"])
        support_adv = self.adversarial(batch.support_x, batch.support_y)
        query_adv = self.adversarial(batch.query_x, batch.query_y)
        on_adv_query, _ = self.run_inner(batch.support_x, batch.support_y, query_adv, steps, meta=True)
        on_clean_query, _ = self.run_inner(support_adv, batch.support_y, batch.query_x, steps, meta=True)
        loss = self.loss(on_adv_query, batch.query_y).mean() + self.loss(on_clean_query, batch.query_y).mean()
        adv_accuracy = self.metrics(on_adv_query, batch, loss)["accuracy"]
        clean_accuracy = self.metrics(on_clean_query, batch, loss)["accuracy"]
        return loss, {
            "loss": loss.item(),
            "accuracy": (adv_accuracy + clean_accuracy) / 2,
            "adv_query_accuracy": adv_accuracy,
            "clean_query_accuracy": clean_accuracy,
        }
