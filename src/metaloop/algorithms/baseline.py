"""The regular few-shot baseline: pretrain an ordinary classifier, then fit a new head per task.

Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot Classification", ICLR 2019,
arXiv:1904.04232: "Baseline" (linear head) and "Baseline++" (cosine-similarity head). This is
the "not learning to learn" contrast: nothing in training looks like a task.

Pretraining (the trainer's outer loop). A Conv-4 embedding f_ω and a head over all C meta-train
classes are trained with cross-entropy, as ordinary supervised learning. The trainer's episodes
serve as class-balanced mini-batches: every support and query image of every task, labelled by
its dataset class (``TaskBatch.classes``), so only meta-train classes are ever seen.
Batch norm uses each task's statistics (as in :class:`ProtoNet`), so a meta-batch split over
processes computes what one process computes.

Adaptation (test time). f_ω is frozen (batch norm on its running statistics); a new head for the
task's W classes is fitted on the support embeddings z = f_ω(x) by ``finetune_steps`` full-batch
Adam steps of size ``finetune_lr`` on the support cross-entropy:

    linear:  logits_k(z) = w_k·z + b_k,               w, b initialised to zero
    cosine:  logits_k(z) = s · cos(w_k, z),           w_k initialised to the class mean of z
                                                       (s = ``scale``)

With ``finetune_backbone`` the embedding's weights are fine-tuned together with the head, per
task, from the pretrained values. Adam is element-wise, so fitting the heads of T tasks as one
batched problem gives exactly the per-task result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaloop.algorithms.base import MetaLearner, Predictor
from metaloop.algorithms.protonet import prototypes
from metaloop.config import Config
from metaloop.nn.backbones import embedding_backbone, embedding_size
from metaloop.nn.task_norm import encode_tasks
from metaloop.tasks.episodes import TaskBatch
from metaloop.tasks.source import TaskSource

HEADS = ("linear", "cosine")


def head_logits(
    head: str, weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor, scale: float
) -> torch.Tensor:
    """Logits ``[T, M, W]`` of embeddings ``z`` ``[T, M, D]`` under per-task heads ``weight``
    ``[T, W, D]`` and ``bias`` ``[T, W]`` (the cosine head ignores ``bias``)."""
    if head == "cosine":
        return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).transpose(1, 2)
    return z @ weight.transpose(1, 2) + bias.unsqueeze(1)


class TransferBaseline(MetaLearner):
    """Pretrain-then-fine-tune baseline ("Baseline" / "Baseline++", Chen et al. 2019).

    Args:
        backbone: the embedding, images ``[B, C, H, W]`` -> ``[B, D]``: a module (e.g. one pretrained
            elsewhere), ``"conv4"``, ``"resnet12"`` or an import path (see :class:`ProtoNet`).
        in_channels: image channels (1 for Omniglot).
        image_size: height = width of the images (28 for Omniglot); fixes the embedding size.
        hidden: filters per Conv-4 layer (64).
        num_classes: C, classes of the meta-train split (the trainer fills it in).
        head: ``"linear"`` (Baseline) or ``"cosine"`` (Baseline++), for pretraining and per task.
        scale: s of the cosine head (10).
        finetune_steps: Adam steps fitting each task's head (100, as Chen et al.).
        finetune_lr: their step size (0.01).
        finetune_backbone: fine-tune the embedding with the head, per task (slower).
        backbone_args: keyword arguments of the backbone's factory (or of ``"resnet12"``).

    Example:
        >>> learner = TransferBaseline(in_channels=1, image_size=28, num_classes=4112, head="cosine")
        >>> loss, metrics = learner.meta_loss(batch)      # ordinary classification over 4112 classes
        >>> logits = learner.eval().adapt(support_x, support_y)(query_x)   # [N, W]
    """

    name = "baseline"
    bf16_safe = True
    config_keys = (
        "backbone",
        "backbone_args",
        "hidden",
        "head",
        "scale",
        "finetune_steps",
        "finetune_lr",
        "finetune_backbone",
    )

    @classmethod
    def data_hparams(cls, config: Config, tasks: TaskSource) -> dict[str, Any]:
        """Image channels and size, and C = the classes of the meta-train split."""
        return {
            "in_channels": tasks.input_channels(),
            "image_size": config.data.image_size,
            "num_classes": tasks.num_classes(config.data.train_split),
        }

    def __init__(
        self,
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 64,
        num_classes: int = 64,
        head: str = "linear",
        scale: float = 10.0,
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        finetune_backbone: bool = False,
        backbone_args: dict | None = None,
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
        if num_classes < 2 or finetune_steps < 1:
            raise ValueError(
                f"num_classes must be >= 2 and finetune_steps >= 1, got {num_classes} and {finetune_steps}"
            )
        encoder, spec = embedding_backbone(backbone, in_channels, hidden, backbone_args)
        dim = embedding_size(encoder, (in_channels, image_size, image_size))
        super().__init__(
            backbone=spec,
            in_channels=in_channels,
            image_size=image_size,
            hidden=hidden,
            num_classes=num_classes,
            head=head,
            scale=scale,
            finetune_steps=finetune_steps,
            finetune_lr=finetune_lr,
            finetune_backbone=finetune_backbone,
            backbone_args=backbone_args,
        )
        self.encoder = encoder
        self.classifier = nn.Linear(dim, num_classes, bias=head == "linear")

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Pretraining logits ``[B, C]`` of embeddings ``[B, D]``."""
        if self.hparams["head"] == "cosine":
            weight = F.normalize(self.classifier.weight, dim=-1)
            return float(self.hparams["scale"]) * F.normalize(z, dim=-1) @ weight.T
        return self.classifier(z)

    # ----- pretraining -----------------------------------------------------------------------
    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy over the C meta-train classes of every image in ``batch``.

        Metrics: ``loss`` and ``accuracy`` of that C-way classification (not episode accuracy).
        """
        if batch.classes is None:
            raise ValueError(
                "the baseline pretrains on dataset classes: the batch must carry TaskBatch.classes"
            )
        images = torch.cat([batch.support_x, batch.query_x], dim=1)  # [T, N+M, C, H, W]
        labels = batch.classes.gather(1, torch.cat([batch.support_y, batch.query_y], dim=1)).flatten()
        logits = self.class_logits(encode_tasks(self.encoder, images).flatten(0, 1))  # [T*(N+M), C]
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return loss, {"loss": loss.item(), "accuracy": accuracy.item()}

    # ----- adaptation ------------------------------------------------------------------------
    def fit_heads(
        self, support_z: torch.Tensor, support_y: torch.Tensor, ways: int
    ) -> tuple[torch.Tensor, ...]:
        """Heads ``(weight [T, W, D], bias [T, W])`` fitted to support embeddings ``[T, N, D]``."""
        head, scale = str(self.hparams["head"]), float(self.hparams["scale"])
        support_z = support_z.detach()
        if head == "cosine":
            weight = prototypes(support_z, support_y, ways).clone()
        else:
            weight = support_z.new_zeros(support_z.shape[0], ways, support_z.shape[-1])
        bias = support_z.new_zeros(support_z.shape[0], ways)
        weight.requires_grad_()
        bias.requires_grad_(head == "linear")

        def loss() -> torch.Tensor:
            logits = head_logits(head, weight, bias, support_z, scale)  # [T, N, W]
            # sum over tasks of each task's mean loss: every task's head gets its own gradient
            return F.cross_entropy(logits.transpose(1, 2), support_y, reduction="none").mean(1).sum()

        self.minimise([weight, bias] if head == "linear" else [weight], loss)
        return weight.detach(), bias.detach()

    def minimise(self, trained: list[torch.Tensor], loss: Callable[[], torch.Tensor]) -> None:
        """``finetune_steps`` Adam steps of ``finetune_lr`` on ``trained`` (in place) against ``loss()``."""
        optimizer = torch.optim.Adam(trained, lr=float(self.hparams["finetune_lr"]))
        with torch.enable_grad():
            for _ in range(int(self.hparams["finetune_steps"])):
                value = loss()
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()

    def finetuned_encoder(self, support_x: torch.Tensor, support_y: torch.Tensor, ways: int) -> Predictor:
        """``finetune_backbone``: one task's embedding and head fine-tuned together; returns the
        task's predictor (logits ``[M, W]`` of queries ``[M, C, H, W]``)."""
        head, scale = str(self.hparams["head"]), float(self.hparams["scale"])
        params = {k: v.detach().clone().requires_grad_() for k, v in self.encoder.named_parameters()}
        with torch.no_grad():
            weight, bias = self.fit_heads(self.encoder(support_x)[None], support_y[None], ways)
        weight.requires_grad_()
        bias.requires_grad_(head == "linear")

        def embed(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.encoder, p, (x,))  # eval mode: running batch-norm statistics

        def loss() -> torch.Tensor:
            logits = head_logits(head, weight, bias, embed(params, support_x)[None], scale)[0]
            return F.cross_entropy(logits, support_y)

        self.minimise([*params.values(), weight] + ([bias] if head == "linear" else []), loss)
        fast = {k: v.detach() for k, v in params.items()}
        weight, bias = weight.detach(), bias.detach()
        return lambda query_x: head_logits(head, weight, bias, embed(fast, query_x)[None], scale)[0]

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """Query logits ``[T, W*Q, W]``: each task's head fitted on its support embeddings."""
        if self.hparams["finetune_backbone"]:
            return super().predict(batch)
        with torch.no_grad():
            z = self.encoder(torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1))
            z = z.view(batch.num_tasks, -1, z.shape[-1])  # [T, N+M, D]
        n = batch.support_y.shape[1]
        weight, bias = self.fit_heads(z[:, :n], batch.support_y, batch.ways)
        with torch.no_grad():
            return head_logits(
                str(self.hparams["head"]), weight, bias, z[:, n:], float(self.hparams["scale"])
            )

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Fit a head (and with ``finetune_backbone`` the embedding) on one task's support set.

        The predictor runs on detached parameters: differentiable with respect to the queries
        (attacks), never with respect to the parameters.
        """
        ways = int(support_y.max()) + 1
        if self.hparams["finetune_backbone"]:
            return self.finetuned_encoder(support_x, support_y, ways)
        head, scale = str(self.hparams["head"]), float(self.hparams["scale"])
        with torch.no_grad():
            support_z = self.encoder(support_x)[None]
        weight, bias = self.fit_heads(support_z, support_y[None], ways)
        frozen = {name: p.detach() for name, p in self.encoder.named_parameters()}

        def predictor(query_x: torch.Tensor) -> torch.Tensor:
            query_z = functional_call(self.encoder, frozen, (query_x,))[None]
            return head_logits(head, weight, bias, query_z, scale)[0]

        return predictor
