"""Plots: learning curves of runs, accuracy against shots with 95% CI bands, and episodes with their
predictions.

Every plot is saved as ``<out_stem>.png`` and ``<out_stem>.svg``, each written atomically (temp file +
rename). Figures are drawn on matplotlib's Agg canvas through its object-oriented API, never pyplot,
so a caller's own matplotlib backend and open figures are left alone.

A run's ``metrics.jsonl`` (see :mod:`metaloop.train`) has training lines (``step``, ``seconds``: time
in outer steps, ``train_loss``, ``train_accuracy`` or ``train_mse``, averaged since the previous
training line), validation lines (``step``, ``seconds``, ``wall_seconds``: everything in the loop,
validation and checkpoints included, ``val_accuracy`` or ``val_mse``) and event lines (ignored).
"""

from __future__ import annotations

import bisect
import io
import json
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from metaloop.algorithms.base import MetaLearner
from metaloop.fileio import atomic_write_bytes
from metaloop.tasks.episodes import TaskBatch

FORMATS = ("png", "svg")
RIGHT, WRONG = "#1a9641", "#d7191c"  # frame colours of right and wrong predictions
LEGENDS_IN_PANELS_MAX = 4  # more runs than this share one legend beside the panels


def run_colours(n: int) -> list[Any]:
    """``n`` distinct line colours: matplotlib's ten defaults, or the twenty of tab20 beyond ten."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    return [colormaps["tab20"](i % 20) for i in range(n)]


def save_figure(fig: Figure, out_stem: str | os.PathLike) -> list[Path]:
    """Write ``fig`` to ``<out_stem>.png`` (150 dpi) and ``<out_stem>.svg`` atomically; their paths.

    The same figure gives the same bytes every time: the SVG carries no date, and its element ids
    come from a fixed salt instead of a random one."""
    if Path(out_stem).suffix.lower() in tuple(f".{f}" for f in FORMATS):
        raise ValueError(f"out_stem {out_stem} should have no extension: .png and .svg are added")
    FigureCanvasAgg(fig)
    if fig.get_layout_engine() is not None:  # lay out once, not again for every format
        fig.draw_without_rendering()
        fig.set_layout_engine("none")
    paths = []
    for fmt in FORMATS:
        buffer = io.BytesIO()
        with rc_context({"svg.hashsalt": "metaloop"}):
            fig.savefig(buffer, format=fmt, dpi=150, metadata={"Date": None} if fmt == "svg" else None)
        path = Path(f"{out_stem}.{fmt}")
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


# ----- learning curves ---------------------------------------------------------------------------
def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(training lines, validation lines)`` of ``run_dir/metrics.jsonl``, in file order.

    Lines cut short by a crash are skipped; so are event lines.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a run folder of 'metaloop train'?")
    train, val = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train_loss" in record:
            train.append(record)
        elif "val_accuracy" in record or "val_mse" in record:
            val.append(record)
    return train, val


def train_wall_seconds(train: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]]) -> np.ndarray:
    """Wall-clock seconds at each training line ``[len(train)]``.

    Training lines record only time in outer steps (``seconds``); the rest of the loop (validation,
    checkpoints) is the ``wall_seconds - seconds`` of the validation lines. A training line's wall
    clock is its ``seconds`` plus that overhead as of the last validation before its step.
    Logs without ``wall_seconds`` (older runs) count no overhead.
    """
    val_steps = [r["step"] for r in val]
    overhead = [r.get("wall_seconds", r["seconds"]) - r["seconds"] for r in val]
    out = []
    for record in train:
        before = bisect.bisect_left(val_steps, record["step"])  # validations at earlier steps
        out.append(record["seconds"] + (overhead[before - 1] if before else 0.0))
    return np.asarray(out, dtype=float)


def _column(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.asarray([r.get(key, np.nan) for r in records], dtype=float)


def _task_shapes(run_dir: Path) -> str | None:
    """``"train 20-way 1-shot, val 5-way 1-shot"`` when the run's train and val tasks differ in shape."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text()) or {}
    t, e = config.get("train", {}), config.get("eval", {})
    train_shape, val_shape = (t.get("ways"), t.get("shots")), (e.get("ways"), e.get("shots"))
    if train_shape == val_shape:
        return None
    return f"train {train_shape[0]}-way {train_shape[1]}-shot, val {val_shape[0]}-way {val_shape[1]}-shot"


def plot_learning_curves(runs: Mapping[str, str | os.PathLike], out_stem: str | os.PathLike) -> list[Path]:
    """:func:`learning_curves_figure` of ``runs`` saved as ``<out_stem>.png`` and ``.svg``; their paths."""
    return save_figure(learning_curves_figure(runs), out_stem)


def learning_curves_figure(runs: Mapping[str, str | os.PathLike]) -> Figure:
    """One figure of every run's meta-training curves.

    Top row against the outer step, bottom row against wall-clock seconds (see
    :func:`train_wall_seconds`): meta-train loss, meta-val accuracy (or MSE), and on the right the
    meta-train and meta-val metric together (top) and their gap (bottom: train − val accuracy in
    points, or val − train MSE), the training metric interpolated at the validation steps. Training
    metrics are measured as training runs (``train`` task shape, ``inner_steps``) and validation as
    evaluation does (``eval`` shape, ``eval_inner_steps``), so the gap also holds those differences;
    where a run's training and validation tasks differ in shape (the default recipe trains 20-way and
    validates 5-way) its legend entry says so. Up to ``LEGENDS_IN_PANELS_MAX`` runs each panel has
    its legend; more share one legend to the right of the panels, so that none hides a curve.

    Args:
        runs: ``{legend label: run folder}``; the runs must all be classification (accuracy) or all
            regression (MSE).
    """
    if not runs:
        raise ValueError("plot_learning_curves needs at least one run")
    logs = {label: read_metrics(run_dir) for label, run_dir in runs.items()}
    empty = [label for label, (train, val) in logs.items() if not train and not val]
    if empty:
        raise ValueError(f"no training or validation lines in the metrics.jsonl of run(s) {', '.join(empty)}")
    kinds = {
        "accuracy" if any("val_accuracy" in r or "train_accuracy" in r for r in train + val) else "mse"
        for train, val in logs.values()
    }
    if len(kinds) > 1:
        raise ValueError("these runs mix classification (accuracy) and regression (MSE); plot them apart")
    metric = kinds.pop()
    scale, name, unit = (100.0, "accuracy", "accuracy (%)") if metric == "accuracy" else (1.0, "MSE", "MSE")
    sign = 1.0 if metric == "accuracy" else -1.0  # gap = train − val accuracy, val − train MSE

    shared_legend = len(logs) > LEGENDS_IN_PANELS_MAX
    fig = Figure(figsize=(19 if shared_legend else 15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3)
    for ax in (axes[0, 1], axes[0, 2], axes[1, 2]):
        ax.sharex(axes[0, 0])  # outer steps
    axes[1, 1].sharex(axes[1, 0])  # wall-clock
    entries = []  # one legend handle per run, for the shared legend
    for color, (label, (train, val)) in zip(run_colours(len(logs)), logs.items(), strict=True):
        shapes = _task_shapes(Path(runs[label])) if metric == "accuracy" else None
        entries.append(Line2D([], [], color=color, label=f"{label} ({shapes})" if shapes else label))
        steps, loss = _column(train, "step"), _column(train, "train_loss")
        val_steps, val_metric = _column(val, "step"), scale * _column(val, f"val_{metric}")
        train_metric = scale * _column(train, f"train_{metric}")
        val_wall = np.asarray([r.get("wall_seconds", r["seconds"]) for r in val], dtype=float)
        axes[0, 0].plot(steps, loss, color=color, label=label)
        axes[1, 0].plot(train_wall_seconds(train, val), loss, color=color, label=label)
        axes[0, 1].plot(val_steps, val_metric, "o-", color=color, markersize=3, label=label)
        axes[1, 1].plot(val_wall, val_metric, "o-", color=color, markersize=3, label=label)
        axes[0, 2].plot(steps, train_metric, color=color, label=f"{label} (train)")
        axes[0, 2].plot(val_steps, val_metric, "o--", color=color, markersize=3, label=f"{label} (val)")
        if len(steps) and len(val_steps):
            gap = sign * (np.interp(val_steps, steps, train_metric) - val_metric)
            axes[1, 2].plot(val_steps, gap, "o-", color=color, markersize=3, label=entries[-1].get_label())
    gap_label = "train − val accuracy (points)" if metric == "accuracy" else "val − train MSE"
    panels = [
        (axes[0, 0], "meta-train loss", "outer step", "loss"),
        (axes[0, 1], f"meta-val {unit}", "outer step", unit),
        (axes[0, 2], f"meta-train (solid) vs meta-val (dashed) {name}", "outer step", unit),
        (axes[1, 0], "meta-train loss", "wall-clock (s)", "loss"),
        (axes[1, 1], f"meta-val {unit}", "wall-clock (s)", unit),
        (axes[1, 2], "generalisation gap", "outer step", gap_label),
    ]
    for ax, title, xlabel, ylabel in panels:
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines and not shared_legend:
            ax.legend(fontsize="small")
    log_scale = [axes[0, 0], axes[1, 0]]
    if metric == "mse":
        log_scale += [axes[0, 1], axes[1, 1], axes[0, 2]]
    for ax in log_scale:  # losses and MSEs often span decades: then a log scale shows them all
        values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines] or [[]])
        values = values[np.isfinite(values)]
        if values.size and values.min() > 0 and values.max() >= 10 * values.min():
            ax.set_yscale("log")
    axes[1, 2].axhline(0.0, color="0.5", linewidth=0.8)
    if shared_legend:
        fig.legend(handles=entries, loc="outside right upper", fontsize="small", title="runs")
    return fig


def write_learning_curve(run_dir: str | os.PathLike) -> list[Path]:
    """``run_dir/learning_curve.png`` and ``.svg``: :func:`plot_learning_curves` of the run alone."""
    run_dir = Path(run_dir)
    return plot_learning_curves({run_dir.name: run_dir}, run_dir / "learning_curve")


def draw_learning_curve(run_dir: str | os.PathLike) -> None:
    """:func:`write_learning_curve` for a finished run (``metaloop train`` calls it); never raises.

    It runs after ``result.json`` is written, so a failure here loses no result, and it does not fail
    the run: a plot is not worth a lost exit code after hours of training. It is not silent either.
    Expected failures (``OSError``: disk full, read-only folder; ``ValueError``: a metrics log with
    nothing to plot) print one warning line; anything else is a bug in metaloop and prints its full
    traceback as a warning, asking for a report. The tests check that every run has its plot, so
    such a bug fails them.
    """
    redo = f"redraw it with metaloop.report.write_learning_curve({str(run_dir)!r})"
    try:
        write_learning_curve(run_dir)
    except (OSError, ValueError) as error:
        print(f"warning: learning curve not drawn: {error}; {redo}", file=sys.stderr)
    except Exception:
        print(
            f"warning: learning curve not drawn because of a bug in metaloop (the run itself is complete; "
            f"please report this):\n{traceback.format_exc()}{redo}",
            file=sys.stderr,
        )


# ----- accuracy against shots -------------------------------------------------------------------
def plot_accuracy_vs_shots(
    results: Mapping[str, Sequence[tuple[int, float, float]]],
    out_stem: str | os.PathLike,
    title: str | None = None,
    xlabel: str = "shots per class",
) -> list[Path]:
    """Test accuracy against shots per class, one line per learner with its 95% CI as a band.

    Args:
        results: ``{label: [(shots, mean, ci95), ...]}`` with ``mean`` and ``ci95`` as fractions, as
            :class:`metaloop.evaluate.EvalResult` holds them (plotted in percent).
        out_stem: output path without extension.
        title: e.g. ``"5-way, glyphs test split"``.
        xlabel: what the x values count (another count works too, e.g. meta-train classes).
    """
    if not results or not any(results.values()):
        raise ValueError("plot_accuracy_vs_shots needs at least one (shots, mean, ci95) point")
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    all_shots: set[int] = set()
    for i, (label, points) in enumerate(results.items()):
        for shots, mean, ci95 in points:
            if shots < 1 or not 0.0 <= mean <= 1.0 or ci95 < 0.0:
                raise ValueError(
                    f"{label}: point (shots={shots}, mean={mean}, ci95={ci95}) needs shots >= 1, mean in "
                    "[0, 1] and ci95 >= 0 (fractions, not percent)"
                )
        shots, mean, ci95 = (np.asarray(column, dtype=float) for column in zip(*sorted(points), strict=True))
        all_shots.update(int(s) for s in shots)
        ax.plot(shots, 100 * mean, "o-", color=f"C{i % 10}", label=label)
        low, high = np.clip(mean - ci95, 0.0, 1.0), np.clip(mean + ci95, 0.0, 1.0)
        ax.fill_between(shots, 100 * low, 100 * high, color=f"C{i % 10}", alpha=0.2)
    ticks = sorted(all_shots)
    if ticks[-1] >= 4 * ticks[0]:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel="test accuracy (%), 95% CI band", title=title or "")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_stem)


# ----- episodes ----------------------------------------------------------------------------------
def _show(ax: Axes, image: torch.Tensor, frame: str, width: float) -> None:
    """Draw ``image`` ``[C, H, W]`` in [0, 1] with a coloured frame of ``width`` points."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(frame)
        spine.set_linewidth(width)


def _spread(n: int, k: int) -> list[int]:
    """``min(k, n)`` indices spread evenly over ``0..n-1`` (so class-major rows show every class)."""
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(k, n))})


def plot_episode_grid(
    learner: MetaLearner,
    batch: TaskBatch,
    out_stem: str | os.PathLike,
    tasks: int = 3,
    columns: int = 10,
) -> list[Path]:
    """The first ``tasks`` episodes of ``batch``, two rows each: support images with their labels, then
    queries framed green (predicted right) or red (wrong), titled with the prediction.

    Predictions are ``learner.predict`` in eval mode, as in evaluation. At most ``columns`` images
    per row, spread over the episode (its examples are grouped by class, so every class shows).

    Args:
        learner: a classifier.
        batch: classification episodes, ``support_x`` ``[T, W*S, C, H, W]`` in [0, 1], ...
        out_stem: output path without extension.
    """
    if batch.ways == 0:
        raise ValueError("plot_episode_grid draws classification episodes; this batch is regression (ways 0)")
    device = next(learner.parameters(), torch.empty(0)).device
    batch = batch.slice(0, min(tasks, batch.num_tasks)).to(device)
    was_training = learner.training
    learner.eval()
    try:
        with torch.no_grad():
            predicted = learner.predict(batch).argmax(-1).cpu()  # [T, W*Q]
    finally:
        learner.train(was_training)
    batch = batch.to("cpu")
    support_cols = _spread(batch.support_y.shape[1], columns)
    query_cols = _spread(batch.query_y.shape[1], columns)
    width = max(len(support_cols), len(query_cols))
    fig = Figure(figsize=(1.1 * width + 0.8, 2.5 * batch.num_tasks + 0.5), layout="constrained")
    axes = fig.subplots(2 * batch.num_tasks, width, squeeze=False)
    for t in range(batch.num_tasks):
        right = int((predicted[t] == batch.query_y[t]).sum())
        for ax, j in zip(axes[2 * t], support_cols, strict=False):
            _show(ax, batch.support_x[t, j], "0.6", 0.5)
            ax.set_title(f"class {int(batch.support_y[t, j])}", fontsize="small")
        for ax, j in zip(axes[2 * t + 1], query_cols, strict=False):
            truth, guess = int(batch.query_y[t, j]), int(predicted[t, j])
            _show(ax, batch.query_x[t, j], RIGHT if guess == truth else WRONG, 3.0)
            ax.set_title(f"→ {guess}" if guess == truth else f"→ {guess} (is {truth})", fontsize="small")
        for ax in (*axes[2 * t, len(support_cols) :], *axes[2 * t + 1, len(query_cols) :]):
            ax.set_visible(False)
        axes[2 * t, 0].set_ylabel(f"episode {t + 1}\nsupport")
        axes[2 * t + 1, 0].set_ylabel(f"queries\n{right}/{batch.query_y.shape[1]} right")
    shots = batch.support_y.shape[1] // batch.ways
    fig.suptitle(f"{learner.name}: {batch.ways}-way {shots}-shot episodes (green: right, red: wrong)")
    return save_figure(fig, out_stem)
