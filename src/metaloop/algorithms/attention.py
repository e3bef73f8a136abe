"""A model-based meta-learner: attention over the labelled support sequence.

The "constrain the architecture" family: the network itself reads the support set and answers
queries, with no gradient step at adaptation time. This one follows SNAIL (Mishra, Rohaninejad,
Chen & Abbeel, "A Simple Neural Attentive Meta-Learner", ICLR 2018, arXiv:1707.03141) in feeding
the learner a sequence of (embedding, one-hot label) pairs and reading queries out of it with
soft attention; it keeps SNAIL's attention blocks and drops its temporal convolutions.

For one task with support (x_i, y_i), i = 1..N, and queries q_j, j = 1..M:

    e = f_ω(x)                                        Conv-4 embedding, [D]
    support token  s_i = W_in [e(x_i); onehot(y_i)]   [d_model]
    query token    t_j = W_in [e(q_j); 0]             [d_model]
    L Transformer layers over [s_1..s_N, t_j]:        support tokens attend to support tokens,
                                                       each query token to the support and itself
    logits_j = W_out h(t_j)                           [W]

There is no positional encoding, so a prediction does not depend on the ORDER of the support
sequence (tested: shuffling it changes the logits by float rounding only). It does depend on
WHICH label each class gets: labels are inputs, and the logit of label k is read from what the
network stored with label k, so relabelling the support classes permutes the logits only as far
as training made the network label-symmetric (random labels per episode push it that way).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaloop.algorithms.base import most_ways
from metaloop.algorithms.embedding import EmbeddingReader
from metaloop.config import Config
from metaloop.nn.backbones import embedding_backbone, embedding_size
from metaloop.nn.task_norm import encode_tasks
from metaloop.tasks.episodes import TaskBatch
from metaloop.tasks.source import TaskSource


def support_query_mask(n_support: int, n_query: int, device: torch.device) -> torch.Tensor:
    """bool ``[N+M, N+M]``, True where attention is NOT allowed: support rows see the N support
    tokens; query row j sees the support tokens and itself (queries never see each other)."""
    size = n_support + n_query
    allowed = torch.zeros(size, size, dtype=torch.bool, device=device)
    allowed[:, :n_support] = True
    allowed[n_support:, n_support:] = torch.eye(n_query, dtype=torch.bool, device=device)
    return ~allowed


def keep_key_bias_at_zero(in_proj_bias: nn.Parameter, d_model: int) -> None:
    """Freeze the key part ``[d:2d]`` of an attention layer's input-projection bias at 0.

    A key bias b_k adds q·b_k to every attention logit of a query alike, and the softmax over keys
    ignores such a shift: no output depends on b_k, so its true gradient is zero. The float32
    gradient is rounding noise (~1e-9) that Adam scales up to steps of about ``lr``: a random walk
    that changes nothing but makes a run depend on the order of its sums (threads, processes).
    PyTorch initialises the bias to 0; a gradient hook keeps that part of it there.
    """
    mask = torch.ones_like(in_proj_bias)
    mask[d_model : 2 * d_model] = 0.0
    in_proj_bias.register_hook(lambda grad: grad * mask)


class AttentiveLearner(EmbeddingReader):
    """Model-based learner: a Transformer reads (embedding, label) support tokens, answers queries.

    Args:
        backbone: the embedding f_ω, images ``[B, C, H, W]`` -> ``[B, D]``: a module, ``"conv4"``,
            ``"resnet12"`` or an import path (see :class:`ProtoNet`).
        in_channels: image channels (1 for Omniglot).
        image_size: height = width of the images; fixes the embedding size D.
        hidden: filters per Conv-4 layer (64).
        ways: W, the most labels a task can have (the label one-hots and the output layer have W
            units; a task of w < W ways uses labels and logits 0..w-1).
        d_model: width of the tokens (128).
        layers: Transformer encoder layers (2).
        heads: attention heads per layer (4).
        backbone_args: keyword arguments of the backbone's factory (or of ``"resnet12"``).

    Example:
        >>> learner = AttentiveLearner(in_channels=1, image_size=28, ways=5)
        >>> loss, metrics = learner.meta_loss(batch)    # query cross-entropy, batch of 5-way tasks
        >>> logits = learner.eval().adapt(support_x, support_y)(query_x)   # [M, 5], no gradient steps
    """

    name = "attention"
    bf16_safe = True
    config_keys = ("backbone", "backbone_args", "hidden", "d_model", "layers", "heads")

    @classmethod
    def data_hparams(cls, config: Config, tasks: TaskSource) -> dict[str, Any]:
        """Image channels and size, and W = the most ways of a training task."""
        return {
            "in_channels": tasks.input_channels(),
            "image_size": config.data.image_size,
            "ways": most_ways(config, cls.name),
        }

    @classmethod
    def output_ways(cls, hparams: dict[str, Any]) -> int | None:
        """W: its label inputs and output layer are built for W ways."""
        return int(hparams["ways"])

    def __init__(
        self,
        backbone: nn.Module | str = "conv4",
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 64,
        ways: int = 5,
        d_model: int = 128,
        layers: int = 2,
        heads: int = 4,
        backbone_args: dict | None = None,
    ) -> None:
        if ways < 2 or d_model % heads:
            raise ValueError(f"need ways >= 2 and d_model divisible by heads, got {ways}, {d_model}, {heads}")
        encoder, spec = embedding_backbone(backbone, in_channels, hidden, backbone_args)
        dim = embedding_size(encoder, (in_channels, image_size, image_size))
        super().__init__(
            backbone=spec,
            in_channels=in_channels,
            image_size=image_size,
            hidden=hidden,
            ways=ways,
            d_model=d_model,
            layers=layers,
            heads=heads,
            backbone_args=backbone_args,
        )
        self.encoder = encoder
        self.token = nn.Linear(dim + ways, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.reader = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.reader.layers:
            keep_key_bias_at_zero(block.self_attn.in_proj_bias, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, ways)

    def check_ways(self, ways: int) -> None:
        if ways > self.hparams["ways"]:
            raise ValueError(
                f"this attention learner reads tasks of up to {self.hparams['ways']} ways (its label inputs "
                f"and outputs are fixed) but the task has {ways} classes; train one with ways={ways}"
            )

    def forward(
        self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Read the support sequence: logits ``[T, M, w]`` from support embeddings ``[T, N, D]``,
        labels ``[T, N]`` in ``0..w-1`` (``ways`` = w <= W) and query embeddings ``[T, M, D]``."""
        width = int(self.hparams["ways"])  # W: label inputs and logits of the network
        labels = F.one_hot(support_y, width).to(support_z.dtype)
        support = self.token(torch.cat([support_z, labels], -1))  # [T, N, d]
        blank = query_z.new_zeros(*query_z.shape[:2], width)
        queries = self.token(torch.cat([query_z, blank], -1))  # [T, M, d]
        n, m = support.shape[1], queries.shape[1]
        mask = support_query_mask(n, m, support.device)
        h = self.reader(torch.cat([support, queries], 1), mask=mask)  # [T, N+M, d]
        return self.readout(self.norm(h[:, n:]))[..., :ways]  # a task of w < W ways: logits 0..w-1

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Query cross-entropy averaged over the tasks (batch norm per task in the encoder)."""
        self.check_ways(batch.ways)
        n = batch.support_y.shape[1]
        z = encode_tasks(self.encoder, torch.cat([batch.support_x, batch.query_x], 1))  # [T, N+M, D]
        logits = self(z[:, :n], batch.support_y, z[:, n:], batch.ways)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        accuracy = (logits.argmax(-1) == batch.query_y).float().mean()
        return loss, {"loss": loss.item(), "accuracy": accuracy.item()}
