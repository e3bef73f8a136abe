"""Run configuration: typed dataclasses <-> YAML, with ``--set a.b=c`` overrides.

Unknown keys and values of the wrong type are rejected with the valid choices spelled out,
so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class AlgorithmConfig:
    """Which learner, and its hyper-parameters.

    Keys left at ``None`` take the learner's own default (the paper's value for its backbone);
    a key set for a learner that has no such hyper-parameter is an error.
    """

    name: str = "protonet"  # see metaloop.algorithms.LEARNERS (metaloop train --help lists them)
    backbone: str | None = None  # conv4 | resnet12 (images) | mlp (regression) | package.module:factory
    backbone_args: dict | None = None  # keyword arguments of the backbone (a factory's, or resnet12's)
    backbone_weights: str | None = (
        None  # a state dict (torch.save(net.state_dict())) loaded into the backbone
    )
    freeze_backbone: bool | None = None  # keep backbone_weights fixed while meta-training
    hidden: int | None = None  # filters per Conv-4 layer (64) or MLP width (40)
    inner_lr: float | None = None  # α
    inner_steps: int | None = None  # inner SGD steps while meta-training
    eval_inner_steps: int | None = None  # inner SGD steps at test time
    first_order: bool | None = None
    inner_optimizer: str | None = None  # Reptile: sgd (full batch, Algorithm 1) | adam (the paper's code)
    inner_batch_size: int | None = None  # Reptile: support examples per inner step (default: all)
    eval_inner_batch_size: int | None = None  # Reptile: the same at test time (default: inner_batch_size)
    strategy: str | None = None  # how the tasks of a meta-batch run: auto | loop | vmap | batched
    multi_step_loss: bool | None = None  # MAML++: the query loss after every inner step, annealed (MSL)
    msl_steps: int | None = None  # MAML++: outer steps over which the MSL weights anneal to the last step
    per_step_lr: bool | None = None  # MAML++: a learned α per parameter tensor and inner step (LSLR)
    per_step_bn: bool | None = None  # MAML++: batch-norm scale and shift per inner step (BNWB)
    second_order_after: int | None = None  # MAML++: first-order outer steps before second order
    num_context_params: int | None = None  # CAVIA
    alpha_low: float | None = None  # Meta-SGD: α initialised uniformly in [alpha_low, alpha_high]
    alpha_high: float | None = None
    lam: float | None = None  # iMAML: λ of the proximal term (λ/2)||φ − θ||² of each task's inner problem
    cg_steps: int | None = None  # iMAML: conjugate-gradient steps of the implicit gradient (0: first order)
    cg_damping: float | None = None  # iMAML: μ, solve ((1 + μ) I + H/(λ + ν)) g = ∇L_query (its code: 1)
    lam_damping: float | None = None  # iMAML: ν of that damped system (its code: 10)
    attack: str | None = None  # ADML: fgsm | pgd, how its adversarial support and query images are made
    epsilon: float | None = None  # ADML: L-infinity radius of that attack, pixel units of [0, 1] images
    attack_steps: int | None = None  # ADML with attack: pgd, the attack's steps
    head: str | None = None  # baseline: linear (Baseline) | cosine (Baseline++); anil: the head submodule
    scale: float | None = None  # cosine head: logits = scale * cosine similarity
    finetune_steps: int | None = None  # transfer baseline: Adam steps fitting each task's head
    finetune_lr: float | None = None
    finetune_backbone: bool | None = None  # transfer baseline: fine-tune the embedding too, per task
    loss: str | None = None  # siamese: bce (weighted L1 + sigmoid, Koch) | contrastive
    margin: float | None = None  # siamese, contrastive loss: margin m
    negatives: str | None = None  # siamese: cycle (other classes in turn) | hardest (mined)
    d_model: int | None = None  # attention (model-based learner): token width
    layers: int | None = None  # attention: Transformer layers reading the support sequence
    heads: int | None = None  # attention: heads per layer


@dataclass
class DataConfig:
    """Which dataset and which of its splits serve meta-train, meta-val and meta-test."""

    name: str = "glyphs"  # glyphs | omniglot | folder | miniimagenet | sinusoid (regression tasks, no images)
    image_size: int = 28
    # Pillow filter of the image resize (omniglot, folder): lanczos | nearest (Snell et al.'s Omniglot
    # loader: binary images) | bilinear | bicubic | box | hamming
    resize: str = "lanczos"
    data_dir: str | None = None  # default: $METALOOP_DATA or ~/.cache/metaloop
    root: str | None = None  # image folder root (name: folder)
    train_split: str = "train"
    train_classes: int | None = None  # meta-train on this many of the train split's classes (seeded pick)
    val_split: str = "val"
    test_split: str = "test"


@dataclass
class TrainConfig:
    """Meta-training episodes and the outer optimiser (Adam with step decay)."""

    ways: int = 20
    shots: int = 1
    queries: int = 5
    meta_batch_size: int = 1  # tasks per outer step
    max_ways: int | None = None  # variable-way episodes: ways drawn per task in [ways, max_ways]
    max_shots: int | None = None  # variable-shot episodes: shots drawn per task in [shots, max_shots]
    augment: str = "none"  # training tasks: none | rot90 | shift | rot90+shift (metaloop.tasks.augment)
    steps: int = 600  # outer steps
    optimizer: str = "adam"  # outer optimiser: adam | sgd (lr = Reptile's outer step size ε)
    lr: float = 0.001
    lr_schedule: str = "step"  # step: × lr_decay_gamma every lr_decay_every | linear: to 0 at `steps`
    # | cosine: from lr to min_lr at `steps` along half a cosine (MAML++)
    min_lr: float = 0.0  # the cosine schedule's last rate (MAML++: 1e-5)
    lr_decay_every: int = 2000  # steps between learning-rate decays (Snell et al.: halve every 2000)
    lr_decay_gamma: float = 0.5
    log_every: int = 50  # steps averaged into one metrics-log line
    val_every: int = 200  # steps between meta-validations
    val_episodes: int = 200
    checkpoint_every: int = 200
    early_stop_patience: int | None = None  # validations without improvement before stopping
    precision: str = "fp32"  # fp32 | bf16: bf16 autocasts the meta-loss (inner and outer passes)
    max_minutes: float | None = None  # wall-clock budget (training + validation); stops early when spent
    keep_checkpoints: int = 2  # step-NNNNNNN.pt files kept besides last.pt (0: last.pt only)
    keep_top: int = 0  # the K best-validated models also kept as top-NNNNNNN.pt (MAML++'s ensemble: 5)
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop | skip (the batch) | lower_lr (and skip)
    nonfinite_lr_factor: float = 0.5  # on_nonfinite: lower_lr multiplies the learning rate by this
    tensorboard: bool = False  # also log metrics to <run_dir>/tensorboard (needs the tensorboard package)
    max_task_chunk: int | None = None  # gradient learners, batched/vmap: tasks per backward (None: by memory)
    task_memory_mb: float | None = None  # graph memory a chunk of tasks may hold (None: 256 MB)
    checkpoint_inner_steps: bool = False  # second-order learners: recompute inner steps in backward


@dataclass
class EvalConfig:
    """Test episodes: shape, count and the seed that fixes them for every learner."""

    ways: int = 5
    shots: int = 1
    queries: int = 15
    episodes: int = 1000
    seed: int = 1234
    batch_size: int = 16  # tasks evaluated at once


@dataclass
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    run_dir: str = "runs/default"
    device: str = "auto"  # cpu | cuda | auto (cuda when a GPU is visible)
    dist_timeout_s: float = 120.0  # torchrun: a rank waiting longer than this for a peer stops with an error

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A configuration that cannot be used as written."""


def _check_value(path: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` (int -> float allowed) or raise ConfigError."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(path, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{path}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"in {prefix!r}" if prefix else "at the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(map(repr, unknown))} {where}; valid: {', '.join(names)}"
        )
    values = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _from_dict(hints[name], value, path)
        else:
            values[name] = _check_value(path, value, hints[name])
    return cls(**values)


# Keys that must be at least this large for a run to make sense.
MINIMUMS = {
    "train.shots": 1,
    "train.queries": 1,
    "train.meta_batch_size": 1,
    "train.steps": 1,
    "train.log_every": 1,
    "train.val_every": 1,
    "train.val_episodes": 2,
    "train.checkpoint_every": 1,
    "train.keep_top": 0,
    "eval.shots": 1,
    "eval.queries": 1,
    "eval.episodes": 2,
    "eval.batch_size": 1,
    "data.image_size": 8,
}


def config_from_dict(data: dict[str, Any]) -> Config:
    """A validated :class:`Config` from nested dicts; missing keys take their defaults."""
    config = _from_dict(Config, data, "")
    for key, least in MINIMUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value < least:
            raise ConfigError(f"{key} must be at least {least}, got {value}")
    return config


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. train.steps=500)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw else None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} not found; "
                "'metaloop recipes' lists the shipped ones, run by name with --recipe NAME"
            )
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.steps": 100, ...}`` from a nested config dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each dotted key whose value differs between two config dicts
    (what ``--set`` changed when a run was resumed)."""
    old, new = flat_settings(before), flat_settings(after)
    return [
        f"{k}: {old.get(k)} -> {new.get(k)}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
