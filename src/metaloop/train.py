"""The outer loop: meta-train (Adam or SGD, step or linear decay), meta-validate, keep the best model,
checkpoint atomically, resume exactly, log metrics, and finally evaluate on meta-test.

A run folder holds ``config.yaml``, ``metrics.jsonl`` (one JSON object per line) and the same
records as ``metrics.csv`` (and as TensorBoard events in ``tensorboard/`` with
``train.tensorboard: true``), ``last.pt`` (everything needed to resume), ``best.pt`` (the best
meta-validated model), with ``train.keep_top: K`` the K best-validated models as ``top-STEP.pt``
(for an ensemble, :mod:`metaloop.ensemble`), and ``result.json`` (the meta-test result).

Under ``torchrun`` (see :mod:`metaloop.distributed`) every rank runs this loop on its shard of
each meta-batch with meta-gradients averaged over ranks, so all ranks hold the same parameters
and train as one process would on the whole meta-batch; only rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metaloop import distributed
from metaloop.algorithms import LEARNERS
from metaloop.allocator import keep_freed_memory
from metaloop.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metaloop.config import (
    Config,
    ConfigError,
    TrainConfig,
    changed_settings,
    config_from_dict,
    config_to_yaml,
)
from metaloop.data.transform import training_record
from metaloop.ensemble import TOP_PATTERN, top_file_name
from metaloop.evaluate import EvalResult, Sampler, evaluate, test_learner
from metaloop.fileio import atomic_link, atomic_write_bytes
from metaloop.interrupt import StopRequest, TrainingInterrupted, stop_on_signal
from metaloop.learners import learner_from_checkpoint, learner_from_config
from metaloop.metric_files import MetricsCsv, TensorBoardLog, check_tensorboard
from metaloop.tasks.heterogeneous import backward_over_tasks
from metaloop.tasks.source import TaskSource

log = logging.getLogger(__name__)  # "run folder: ...", one line per meta-validation (the CLI shows them)


NONFINITE_ACTIONS = ("stop", "skip", "lower_lr")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("step", "linear", "cosine")


def outer_optimizer(
    params: Iterable[torch.nn.Parameter], t: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The outer optimiser of ``train.optimizer`` (Adam, or plain SGD: Reptile's step
    θ ← θ − ε g with ε = lr) and its schedule: ``step`` multiplies the rate by
    ``lr_decay_gamma`` every ``lr_decay_every`` steps; ``linear`` takes it from ``lr`` at step 0
    to 0 at step ``steps`` (Nichol et al. 2018 anneal Reptile's ε so); ``cosine`` from ``lr`` to
    ``min_lr`` along half a cosine, β_s = min_lr + (lr − min_lr)(1 + cos(π s / steps)) / 2 (Antoniou
    et al. 2019 anneal MAML++'s outer rate so, per epoch; here per step)."""
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=t.lr) if t.optimizer == "adam" else torch.optim.SGD(params, lr=t.lr)
    )
    if t.lr_schedule == "linear":
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / t.steps))
        return optimizer, schedule
    if t.lr_schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t.steps, eta_min=t.min_lr)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, t.lr_decay_every, t.lr_decay_gamma)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient with ``train.on_nonfinite: stop``."""


@dataclass
class RunState:
    """What the loop carries between steps, saved in ``last.pt`` for an exact resume."""

    step: int = 0
    best_val: float = -float("inf")  # best validation score so far (accuracy, or minus the MSE)
    validations_without_improvement: int = 0
    train_seconds: float = 0.0  # in outer steps
    wall_seconds: float = 0.0  # everything in the loop, validation and checkpoints included
    window: dict[str, float] = field(default_factory=dict)  # metric sums since the last log line
    window_steps: int = 0
    top: list[list[float]] = field(default_factory=list)  # [score, step] of the kept top-K models, best first


class Trainer:
    """Meta-trains ``config`` in ``config.run_dir``; see the module docstring for the files."""

    def __init__(self, config: Config, progress: bool = True) -> None:
        check_world(config)
        keep_freed_memory()  # 1.94x faster ProtoNet steps, benchmarks/results/allocator.json; as the CLI
        for key, options in (
            ("on_nonfinite", NONFINITE_ACTIONS),
            ("precision", PRECISIONS),
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES),
        ):
            value = getattr(config.train, key)
            if value not in options:
                raise ConfigError(f"train.{key} must be one of {', '.join(options)}, got {value!r}")
        if config.train.keep_checkpoints < 0:
            raise ConfigError(f"train.keep_checkpoints must be >= 0, got {config.train.keep_checkpoints}")
        if config.train.tensorboard:
            check_tensorboard()
        self.config = config
        self.progress = progress and distributed.is_main()
        self.run_dir = Path(config.run_dir)
        self.device = distributed.local_device(config.device)
        self.tasks = TaskSource(config)
        t = config.train
        self.sampler = self.tasks.sampler(
            config.data.train_split,
            t.ways,
            t.shots,
            t.queries,
            config.seed,
            t.max_ways,
            t.max_shots,
            t.augment,
        )
        self.validate_sampler()  # constructing it checks the episode shape before any training happens
        self.learner = learner_from_config(config, self.tasks).to(self.device)
        if not any(p.requires_grad for p in self.learner.parameters()):
            raise ConfigError(
                f"{self.learner.name} has no parameter left to meta-train (algorithm.freeze_backbone fixes "
                "its whole network); to use the pretrained network as it is, write a checkpoint with "
                "'metaloop export' and evaluate that"
            )
        if t.checkpoint_inner_steps:
            if not hasattr(self.learner, "checkpoint_inner_steps"):
                raise ConfigError(
                    f"train.checkpoint_inner_steps is for learners with a differentiable inner loop "
                    f"(maml, metasgd, anil, cavia, adml), not {self.learner.name}; set it to false"
                )
            self.learner.checkpoint_inner_steps = True
        if t.precision == "bf16" and not self.learner.bf16_safe:
            safe = ", ".join(sorted(name for name, cls in LEARNERS.items() if cls.bf16_safe))
            raise ConfigError(
                f"train.precision=bf16 is not offered for {self.learner.name}: its bfloat16 meta-gradient "
                "strays too far from float32 (cosine < 0.96 on a seeded batch, tests/test_amp.py); "
                "use train.precision=fp32. "
                f"bf16 is offered for: {safe}"
            )
        self.optimizer, self.scheduler = outer_optimizer(self.learner.parameters(), t)
        self.state = RunState()
        self.csv = MetricsCsv(self.run_dir / "metrics.csv", self.metrics_path)
        self.tensorboard: TensorBoardLog | None = None  # opened with the run folder (rank 0)
        self.interrupted_by: str | None = None  # the signal that stopped fit(), if one did
        # what a file goes through to become an input, saved with the model (metaloop.data.transform)
        train_data = [] if self.tasks.regression else self.tasks.datasets(config.data.train_split)
        self.input_transform = training_record(train_data)

    # ----- files ---------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _log(self, record: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.csv.append(record)
        if self.tensorboard is not None:
            self.tensorboard.add(record)

    def _save_last(self) -> None:
        if not distributed.is_main():
            return
        s = self.state
        last = self.run_dir / "last.pt"
        save_checkpoint(
            last,
            {
                "algorithm": self.learner.name,
                "hparams": self.learner.hparams,
                "config": self.config.to_dict(),
                "input_transform": self.input_transform,
                "model": self.learner.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "run_state": {
                    "step": s.step,
                    "best_val": s.best_val,
                    "validations_without_improvement": s.validations_without_improvement,
                    "train_seconds": s.train_seconds,
                    "wall_seconds": s.wall_seconds,
                    "window": dict(s.window),
                    "window_steps": s.window_steps,
                    "top": [list(entry) for entry in s.top],
                },
            },
        )
        keep = self.config.train.keep_checkpoints
        if keep > 0:  # keep-last-k: step-NNNNNNN.pt names for the k newest checkpoints
            atomic_link(last, self.run_dir / f"step-{s.step:07d}.pt")
            for old in sorted(self.run_dir.glob("step-*.pt"))[:-keep]:
                old.unlink()

    def _save_model(self, name: str, val: EvalResult) -> None:
        """Write the current model, as ``best.pt`` holds it, to ``run_dir/name`` (rank 0 only)."""
        if not distributed.is_main():
            return
        save_checkpoint(
            self.run_dir / name,
            {
                "algorithm": self.learner.name,
                "hparams": self.learner.hparams,
                "config": self.config.to_dict(),
                "input_transform": self.input_transform,
                "model": self.learner.state_dict(),
                "step": self.state.step,
                "val": val.to_dict(),
            },
        )

    def start(self) -> None:
        """Prepare a new run folder; refuses to overwrite a run that already has checkpoints.

        Under torchrun rank 0 prepares the folder (a refusal stops every rank) and the other
        ranks take rank 0's initial model.
        """
        distributed.on_main(self._prepare_run_dir)
        self._join_ranks()

    def _prepare_run_dir(self) -> None:
        if (self.run_dir / "last.pt").exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir} "
                "or choose another run_dir (--set run_dir=...)"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_dir / "config.yaml", config_to_yaml(self.config).encode())
        atomic_write_bytes(self.metrics_path, b"")
        self.csv.rebuild()
        self._open_tensorboard(purge_step=None)
        log.info("run folder: %s", self.run_dir)

    def _open_tensorboard(self, purge_step: int | None) -> None:
        if self.config.train.tensorboard:
            self.tensorboard = TensorBoardLog(self.run_dir / "tensorboard", purge_step)

    def resume(self) -> None:
        """Load ``last.pt`` and drop metric lines written after it, so none is duplicated.

        Under torchrun every rank loads ``last.pt`` (the run folder must be on a file system all
        ranks share); rank 0 alone rewrites the metrics log.
        """
        state = load_checkpoint(self.run_dir / "last.pt")
        if state.get("algorithm") != self.learner.name:
            raise CheckpointError(
                f"{self.run_dir}/last.pt is a {state.get('algorithm')} run, not {self.learner.name}"
            )
        distributed.on_main(lambda: self._record_changed_settings(state["config"]))
        self.learner.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.state = RunState(**state["run_state"])
        distributed.on_main(self._trim_metrics)
        self._restart_selection_if_best_is_missing()
        self._forget_missing_top_models()
        self._join_ranks()

    def _record_changed_settings(self, saved: dict[str, Any]) -> None:
        """Settings changed on resume (``--set``) are the run's from now on (``last.pt`` saves them):
        say which, and rewrite ``config.yaml`` so it shows the settings in force."""
        changes = changed_settings(saved, {**self.config.to_dict(), "run_dir": saved.get("run_dir")})
        if changes:
            log.info("settings changed on resume (kept from now on): %s", "; ".join(changes))
            atomic_write_bytes(self.run_dir / "config.yaml", config_to_yaml(self.config).encode())

    def _restart_selection_if_best_is_missing(self) -> None:
        """A run folder copied without its ``best.pt`` (only ``last.pt`` carried to a new machine)
        would end with no model to test if no later validation beat the lost one: say so, and let
        the next validation write ``best.pt``, so the test uses the best model validated from now on.
        """
        s = self.state
        if s.best_val == -float("inf") or (self.run_dir / "best.pt").is_file():
            return
        distributed.on_main(
            lambda: log.warning(
                "%s/best.pt is missing: the best model validated before step %d (score %.4f) is lost; "
                "model selection starts again, so the test will use the best model validated from now "
                "on (to keep the earlier one, stop and copy that run's best.pt into %s, then resume)",
                self.run_dir,
                s.step,
                s.best_val,
                self.run_dir,
            )
        )
        self._log({"step": s.step, "event": "best_missing", "lost_best_val": s.best_val})
        s.best_val, s.validations_without_improvement = -float("inf"), 0

    def _forget_missing_top_models(self) -> None:
        """Drop from the kept top-K the models whose ``top-STEP.pt`` is not in the run folder (a run
        carried without them), saying so, so that later validations take their places."""
        s = self.state
        missing = [entry for entry in s.top if not (self.run_dir / top_file_name(int(entry[1]))).is_file()]
        if not missing:
            return
        steps = ", ".join(str(int(step)) for _, step in missing)
        distributed.on_main(
            lambda: log.warning(
                "%s lacks the top-K models validated at steps %s; they leave the ensemble "
                "(train.keep_top), and later validations take their places",
                self.run_dir,
                steps,
            )
        )
        s.top = [entry for entry in s.top if entry not in missing]

    def _keep_top(self, val: EvalResult) -> None:
        """With ``train.keep_top: K``, keep the model just validated as ``top-STEP.pt`` if it is among
        the K best validated so far (ties: the earlier step stays), and delete the one it displaces."""
        k, s = self.config.train.keep_top, self.state
        if k == 0:
            return
        entry = [val.score, s.step]
        s.top = sorted([*s.top, entry], key=lambda e: (-e[0], e[1]))[:k]
        if entry in s.top:
            self._save_model(top_file_name(s.step), val)
        if distributed.is_main():
            kept = {top_file_name(int(step)) for _, step in s.top}
            for path in self.run_dir.glob(TOP_PATTERN):
                if path.name not in kept:  # displaced, or written after the last.pt a resume started from
                    path.unlink()

    def _trim_metrics(self) -> None:
        """Keep the metric lines of steps up to the loaded checkpoint's (complete lines only)."""
        kept = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if record.get("step", 0) <= self.state.step:
                    kept.append(line + "\n")
        atomic_write_bytes(self.metrics_path, "".join(kept).encode())
        self.csv.rebuild()
        self._open_tensorboard(purge_step=self.state.step + 1)
        log.info("run folder: %s (continuing after step %d)", self.run_dir, self.state.step)

    def _join_ranks(self) -> None:
        """Check every rank runs the same config and give all of them rank 0's model."""
        if distributed.active():
            distributed.check_same(config_to_yaml(self.config), "configuration")
            distributed.broadcast_module_(self.learner)

    # ----- the loop --------------------------------------------------------------------------
    def validate_sampler(self) -> Sampler:
        """The same validation episodes every time: eval's shape on the val split, seed eval.seed + 1."""
        ev = self.config.eval
        return self.tasks.sampler(self.config.data.val_split, ev.ways, ev.shots, ev.queries, seed=ev.seed + 1)

    def validate(self) -> EvalResult:
        ev = self.config.eval
        return evaluate(
            self.learner,
            self.validate_sampler(),
            self.config.train.val_episodes,
            ev.batch_size,
            self.device,
            False,
        )

    def train_step(self) -> dict[str, float]:
        """One outer step on ``train.meta_batch_size`` tasks; returns metrics averaged over them.

        Under torchrun each rank draws the same tasks and keeps its shard; gradients, float
        buffers and metrics are averaged over ranks before the optimiser step.
        """
        size = self.config.train.meta_batch_size
        keep = distributed.shard(size) if distributed.active() else None
        batch = self.sampler.sample(size, keep=keep).to(self.device)
        t = self.config.train
        # the learner back-propagates (task by task where it can); tasks of unequal shapes: groups
        backward = partial(
            self.learner.meta_backward, max_task_chunk=t.max_task_chunk, memory_budget_mb=t.task_memory_mb
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.learner.begin_outer_step(self.state.step, t.steps)
        with autocast(self.device, t.precision):
            metrics = backward_over_tasks(batch, backward)
        metrics = distributed.average_gradients_(self.learner, metrics)
        bad = self.nonfinite(metrics)
        if bad is None:
            self.optimizer.step()
        self.scheduler.step()
        return metrics, bad

    def nonfinite(self, metrics: dict[str, float]) -> str | None:
        """What went non-finite in this step (the loss, or a named gradient), else None.

        Gradients are checked after averaging over ranks, so every rank decides the same way.
        """
        if not math.isfinite(metrics.get("loss", 0.0)):
            return "loss"
        for name, parameter in self.learner.named_parameters():
            if parameter.grad is not None and not bool(torch.isfinite(parameter.grad).all()):
                return f"gradient of {name}"
        return None

    def handle_nonfinite(self, bad: str) -> None:
        """Apply ``train.on_nonfinite`` to a step whose ``bad`` quantity was NaN or infinite.

        The step's update was not applied. ``stop`` raises :class:`TrainingDiverged` before
        anything more is written, so ``last.pt`` and ``best.pt`` stay the last good ones.
        """
        t, s = self.config.train, self.state
        record = {"step": s.step, "event": "nonfinite", "what": bad, "action": t.on_nonfinite}
        if t.on_nonfinite == "lower_lr":
            for group in self.optimizer.param_groups:
                group["lr"] *= t.nonfinite_lr_factor
            record["lr"] = self.optimizer.param_groups[0]["lr"]
        self._log(record)
        if t.on_nonfinite == "stop":
            raise TrainingDiverged(
                f"step {s.step}: non-finite {bad}; training stopped and {self.run_dir / 'last.pt'} "
                "still holds the last good checkpoint. Lower train.lr, or set train.on_nonfinite=skip or "
                f"lower_lr to drop such batches, then continue with --resume {self.run_dir}"
            )

    def fit(self) -> None:
        """Run outer steps until ``train.steps``, early stopping, or the ``train.max_minutes`` budget.

        The budget counts wall-clock time in this loop (steps, validations, checkpoints) across
        resumes; when it is spent the current model is validated and checkpointed like at the
        last step. Under torchrun the ranks agree on the slowest rank's clock, so all stop together.
        SIGINT or SIGTERM ends the loop after the running step with ``last.pt`` saved there and
        :class:`~metaloop.interrupt.TrainingInterrupted` raised (see :mod:`metaloop.interrupt`).
        """
        with stop_on_signal() as request:
            self._loop(request)
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.interrupted_by is not None:
            s = self.state
            raise TrainingInterrupted(self.interrupted_by, s.step, self.config.train.steps, self.run_dir)

    def _loop(self, request: StopRequest) -> None:
        t, s = self.config.train, self.state
        bar = tqdm(total=t.steps, initial=s.step, desc="meta-train", unit="step", disable=not self.progress)
        postfix: dict[str, str] = {}  # the bar's last train averages and validation
        train_accuracy = None  # of the last logged window, for the meta-overfitting gap
        while s.step < t.steps:
            lap = time.perf_counter()
            metrics, bad = self.train_step()
            s.train_seconds += time.perf_counter() - lap
            s.step += 1
            bar.update(1)
            if bad is not None:
                self.handle_nonfinite(bad)
            else:
                for key, value in metrics.items():
                    s.window[key] = s.window.get(key, 0.0) + value
                s.window_steps += 1
            out_of_time = self.budget_spent(s.wall_seconds + time.perf_counter() - lap)
            last = s.step == t.steps or out_of_time
            if (s.step % t.log_every == 0 or last) and s.window_steps:
                averages = {f"train_{k}": v / s.window_steps for k, v in s.window.items()}
                self._log(
                    {
                        "step": s.step,
                        "seconds": round(s.train_seconds, 3),
                        "lr": self.scheduler.get_last_lr()[0],
                        **averages,
                    }
                )
                postfix.update({k: f"{v:.3f}" for k, v in averages.items()})
                bar.set_postfix(postfix)
                train_accuracy = averages.get("train_accuracy")
                s.window, s.window_steps = {}, 0
            stop = False
            if s.step % t.val_every == 0 or last:
                val = self.validate()
                improved = val.score > s.best_val
                if improved:
                    s.best_val, s.validations_without_improvement = val.score, 0
                    self._save_model("best.pt", val)
                else:
                    s.validations_without_improvement += 1
                self._keep_top(val)
                self._log(
                    {
                        "step": s.step,
                        "seconds": round(s.train_seconds, 3),
                        "wall_seconds": round(s.wall_seconds + time.perf_counter() - lap, 3),
                        f"val_{val.metric}": val.mean,
                        "best": improved,
                        **self.overfitting_gap(train_accuracy, val),
                    }
                )
                postfix.update(self.report_validation(val))
                bar.set_postfix(postfix)
                patience = t.early_stop_patience
                stop = patience is not None and s.validations_without_improvement >= patience
            interrupted = distributed.max_over_ranks(float(request.signal_name is not None), self.device) > 0
            s.wall_seconds += time.perf_counter() - lap
            if stop or last or interrupted or s.step % t.checkpoint_every == 0:
                self._save_last()
            if stop:
                self._log({"step": s.step, "event": "early_stop", "best_val": s.best_val})
            if out_of_time:
                self._log({"step": s.step, "event": "time_budget", "minutes": t.max_minutes})
            if interrupted and not (stop or last):
                # a rank that saw no signal itself was sent SIGTERM by torchrun too
                self.interrupted_by = request.signal_name or "SIGTERM"
                self._log({"step": s.step, "event": "interrupted", "signal": self.interrupted_by})
            if stop or out_of_time or interrupted:
                break
        bar.close()

    def report_validation(self, val: EvalResult) -> dict[str, str]:
        """Log one line for a meta-validation (its mean ± 95% CI and the best so far); returns the
        progress bar's ``val`` and ``best`` entries."""
        s = self.state
        if val.metric == "accuracy":
            now, best = f"{100 * val.mean:.2f} ± {100 * val.ci95:.2f}%", f"{100 * s.best_val:.2f}%"
        else:
            now, best = f"{val.mean:.4f} ± {val.ci95:.4f}", f"{-s.best_val:.4f}"
        log.info("step %d: meta-val %s; best so far %s", s.step, val, best)
        return {"val": now.replace(" ± ", "±"), "best": best}

    @staticmethod
    def overfitting_gap(train_accuracy: float | None, val: EvalResult) -> dict[str, float]:
        """``{"gap": train − val accuracy}`` (meta-overfitting shows as a growing gap), when both are
        known; the train accuracy is on training episodes, which may have another shape."""
        if train_accuracy is None or val.metric != "accuracy":
            return {}
        return {"gap": train_accuracy - val.mean}

    def budget_spent(self, wall_seconds: float) -> bool:
        """Whether ``train.max_minutes`` is set and ``wall_seconds`` (slowest rank) reached it."""
        budget = self.config.train.max_minutes
        if budget is None:
            return False
        return distributed.max_over_ranks(wall_seconds, self.device) >= 60.0 * budget


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for the meta-loss: ``precision="bf16"`` runs matmuls and convolutions in bfloat16
    (losses and reductions stay float32, parameters and gradients float32); ``"fp32"`` does nothing.

    bfloat16 keeps float32's exponent range, so no loss scaling is needed. It is opt-in, and only
    for learners with ``bf16_safe``: over seeded 5-way 1-shot batches (``tests/test_amp.py``,
    ``benchmarks/bf16_agreement.py``) the least cosine of the bf16 and float32 meta-gradients was
    0.978-0.995 for ProtoNet, Siamese, Reptile, the attention learner, ANIL, the baseline and CAVIA
    (0.972 for MAML++, whose inner steps are smaller),
    but 0.94 (Meta-SGD), 0.93 (FOMAML), 0.91 (MAML) and 0.87 (ADML), where a full-network inner step
    of size α amplifies bf16 rounding.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def check_world(config: Config) -> None:
    """Refuse a torchrun launch the trainer cannot split exactly (see :mod:`metaloop.distributed`)."""
    if distributed.launched() and not distributed.active():
        raise distributed.DistributedError(
            f"started as one of {distributed.world_size()} ranks (WORLD_SIZE is set) but not in a process "
            "group: call metaloop.train.run(), or wrap the Trainer in metaloop.distributed.process_group()"
        )
    check_meta_batch_split(config)


def check_meta_batch_split(config: Config) -> None:
    """Refuse a meta-batch that does not split evenly over the ranks (``$WORLD_SIZE`` before joining)."""
    world, size = distributed.world_size(), config.train.meta_batch_size
    if size % world:
        raise ConfigError(
            f"train.meta_batch_size = {size} does not split evenly over {world} processes; use a multiple "
            f"of {world} (e.g. --set train.meta_batch_size={size + world - size % world}) or launch a "
            f"number of processes that divides {size}"
        )


def run(config: Config, resume: bool = False, progress: bool = True) -> EvalResult:
    """Meta-train (or continue) a run, then meta-test its best model; writes ``result.json``.

    Launched by torchrun, joins the process group for the run (timeout ``dist_timeout_s``); every
    rank returns the same result.
    """
    # Checked before joining, so every rank refuses on its own: a rank that joined and left at once
    # could close its sockets while a slower peer was still connecting, and that peer would fail there.
    check_meta_batch_split(config)
    with distributed.process_group(config.device, config.dist_timeout_s):
        trainer = Trainer(config, progress)
        trainer.resume() if resume else trainer.start()
        trainer.fit()
        distributed.barrier()  # rank 0 has written best.pt
        best = load_checkpoint(trainer.run_dir / "best.pt")
        learner = learner_from_checkpoint(best).to(trainer.device)
        result = test_learner(config, learner, trainer.progress)
        summary = {
            **result.to_dict(),
            "best_step": best["step"],
            "val": best["val"],
            "train_seconds": trainer.state.train_seconds,
            "wall_seconds": trainer.state.wall_seconds,
            "steps": trainer.state.step,
        }
        text = json.dumps(summary, indent=2) + "\n"
        distributed.on_main(lambda: atomic_write_bytes(trainer.run_dir / "result.json", text.encode()))
    return result


def config_of_run(run_dir: str | Path) -> Config:
    """The configuration a run was started with (from its ``last.pt``)."""
    return config_from_dict(load_checkpoint(Path(run_dir) / "last.pt")["config"])
