"""The files of ``metaloop compare``: ``comparison.json``, ``comparison.md`` and the plots it embeds.

Works on the JSON-ready comparison :func:`metaloop.compare.compare` returns: ``settings``,
``learners`` (one dict per run: name, label, algorithm, run folder, training cost, ...), ``cells``
(one per (ways, shots): ``accuracy`` and ``difference`` by label, None where n/a) and ``notes``.
Tables have a row per label (runs joined under one label share a row), in the order of the runs.
Accuracies are fractions there and percent (points) in the markdown.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metaloop.fileio import atomic_write_bytes
from metaloop.report import plot_accuracy_vs_shots, plot_learning_curves


def accuracy_text(result: dict[str, Any] | None) -> str:
    """``"98.42 ± 0.20"`` (percent) or ``"n/a"``."""
    return "n/a" if result is None else f"{100 * result['mean']:.2f} ± {100 * result['ci95']:.2f}"


def difference_text(difference: dict[str, Any] | None) -> str:
    """``"+1.23 ± 0.40 *"`` (points; ``*`` when the CI excludes 0) or ``"n/a"``."""
    if difference is None:
        return "n/a"
    star = " *" if difference["significant"] else ""
    return f"{100 * difference['mean']:+.2f} ± {100 * difference['ci95']:.2f}{star}"


def seconds_text(seconds: float | None) -> str:
    """``"4,613.2"`` or ``"—"`` (not recorded)."""
    return "—" if seconds is None else f"{seconds:,.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def labels(comparison: dict[str, Any]) -> list[str]:
    """The learners' labels (the rows of the tables) in the order of their first run."""
    return list(dict.fromkeys(d["label"] for d in comparison["learners"]))


def cells_where(comparison: dict[str, Any], key: str, value: int) -> list[dict[str, Any]]:
    """The cells with ``cell[key] == value`` (``key``: ``"ways"`` or ``"shots"``), in order."""
    return [cell for cell in comparison["cells"] if cell[key] == value]


def shots_points(comparison: dict[str, Any], ways: int) -> dict[str, list[tuple[int, float, float]]]:
    """``{learner: [(shots, mean, ci95), ...]}`` at ``ways``, for learners tested there."""
    points: dict[str, list[tuple[int, float, float]]] = {label: [] for label in labels(comparison)}
    for cell in cells_where(comparison, "ways", ways):
        for name, result in cell["accuracy"].items():
            if result is not None:
                points[name].append((cell["shots"], result["mean"], result["ci95"]))
    return {name: p for name, p in points.items() if p}


def draw_plots(comparison: dict[str, Any], out_dir: Path) -> tuple[dict[int, str], str | None, list[str]]:
    """Accuracy vs shots (one figure per number of ways) and every run's learning curves on one figure.

    Returns ``({ways: png name}, learning-curve png name or None, notes)``. A run whose metrics log
    cannot be plotted costs the learning curves, not the comparison: a note says why.
    """
    data = comparison["settings"]["test_data"]
    shot_plots = {}
    for ways in comparison["settings"]["ways"]:
        points = shots_points(comparison, ways)
        if points:
            stem = out_dir / f"accuracy_vs_shots_{ways}way"
            plot_accuracy_vs_shots(points, stem, title=f"{ways}-way, {data}")
            shot_plots[ways] = f"{stem.name}.png"
    runs = {d["name"]: d["run_dir"] for d in comparison["learners"]}
    logged = {name: run for name, run in runs.items() if (Path(run) / "metrics.jsonl").is_file()}
    notes = []
    if len(logged) < len(runs):
        unlogged = ", ".join(f"{name} ({runs[name]})" for name in runs if name not in logged)
        notes.append(
            f"no learning curve for {unlogged}: no metrics.jsonl (a zoo model ships best.pt, "
            "config.yaml and result.json, not its training log)"
        )
    if not logged:
        return shot_plots, None, notes
    try:
        plot_learning_curves(logged, out_dir / "learning_curves")
    except (OSError, ValueError) as error:
        return shot_plots, None, [*notes, f"learning curves not drawn: {error}"]
    return shot_plots, "learning_curves.png", notes


def accuracy_sections(comparison: dict[str, Any], shot_plots: dict[int, str]) -> list[str]:
    """Markdown: accuracy against shots (a table and plot per number of ways), then against ways (a
    table per number of shots)."""
    names = labels(comparison)
    lines = ["", "## Accuracy vs shots"]
    for ways in comparison["settings"]["ways"]:
        cells = cells_where(comparison, "ways", ways)
        rows = [[name, *(accuracy_text(c["accuracy"][name]) for c in cells)] for name in names]
        header = ["learner", *(f"{c['shots']}-shot" for c in cells)]
        lines += ["", f"### {ways}-way", "", *markdown_table(header, rows)]
        if ways in shot_plots:
            lines += ["", f"![{ways}-way accuracy vs shots, 95% CI bands]({shot_plots[ways]})"]
    lines += ["", "## Accuracy vs ways"]
    for shots in comparison["settings"]["shots"]:
        cells = cells_where(comparison, "shots", shots)
        rows = [[name, *(accuracy_text(c["accuracy"][name]) for c in cells)] for name in names]
        header = ["learner", *(f"{c['ways']}-way" for c in cells)]
        lines += ["", f"### {shots}-shot", "", *markdown_table(header, rows)]
    return lines


def difference_section(comparison: dict[str, Any]) -> list[str]:
    """Markdown: every learner's paired difference against the reference, in every cell."""
    reference, cells = comparison["settings"]["reference"], comparison["cells"]
    others = [label for label in labels(comparison) if label != reference]
    lines = [
        "",
        f"## Paired differences against {reference}",
        "",
        f"Accuracy minus {reference}'s, in points, on the same episodes: mean ± 95% CI of the per-episode "
        "differences. *: the CI excludes 0.",
        "",
    ]
    if not others:
        return [*lines, "(no other learner)"]
    header = ["learner", *(f"{c['ways']}-way {c['shots']}-shot" for c in cells)]
    rows = [[name, *(difference_text(c["difference"][name]) for c in cells)] for name in others]
    return lines + markdown_table(header, rows)


def cost_section(comparison: dict[str, Any]) -> list[str]:
    """Markdown: each run's training steps and seconds."""
    header = [
        "learner",
        "algorithm",
        "trained here",
        "steps",
        "best step",
        "training (s)",
        "wall-clock (s)",
        "validations",
        "val change sd (points)",
        "2nd half",
        "run",
    ]
    rows = []
    for d in comparison["learners"]:
        cost = d["training"]
        steps = "—" if cost["steps"] is None else str(cost["steps"])
        seconds = [seconds_text(cost["train_seconds"]), seconds_text(cost["wall_seconds"])]
        trained = "yes" if d["trained_here"] else "no"
        validation = d.get("validation") or {}
        steadiness = [
            "—" if validation.get(key) is None else f"{validation[key]:.2f}"
            for key in ("change_sd", "late_change_sd")
        ]
        rows.append(
            [
                d["label"],
                d["algorithm"],
                trained,
                steps,
                str(d["best_step"]),
                *seconds,
                "—" if validation.get("validations") is None else str(validation["validations"]),
                *steadiness,
                f"`{d['run_dir']}`",
            ]
        )
    return [
        "",
        "## Training cost",
        "",
        *markdown_table(header, rows),
        "",
        "Training (s): time in outer steps; wall-clock (s): the whole training loop, validation and "
        "checkpoints included (— for runs older than that record). Val change sd: the standard deviation "
        "of the change in meta-validation accuracy from one validation to the next, in points (smaller "
        "is a steadier curve; — with fewer than three validations or no metrics log, and validations — "
        "without that log); 2nd half: the same over the validations after half the last validated step.",
    ]


def comparison_markdown(
    comparison: dict[str, Any], shot_plots: dict[int, str], curves: str | None, notes: Sequence[str]
) -> str:
    """``comparison.md``: accuracy vs shots and vs ways, paired differences, training cost, plots, notes."""
    s, learners, rows = comparison["settings"], comparison["learners"], labels(comparison)
    runs = f" ({len(learners)} runs)" if len(learners) != len(rows) else ""
    lines = [
        f"# Comparison of {len(rows)} learners{runs}",
        "",
        f"Every learner is tested on the same {s['episodes']} episodes per cell, drawn with seed {s['seed']} "
        f"from {s['test_data']}, {s['queries']} queries per class. Accuracy in percent: mean ± 95% CI "
        "(1.96·std/√episodes, ddof=1). n/a: the learner's output layer is built for another number of ways.",
    ]
    if s["budget"]:
        budget = ", ".join(f"`{item}`" for item in s["budget"])
        lines += ["", f"Recipes were trained here under one budget: {budget}."]
    lines += [*accuracy_sections(comparison, shot_plots), *difference_section(comparison)]
    lines += cost_section(comparison)
    if curves:
        lines += ["", "## Learning curves", "", f"![learning curves of every run]({curves})"]
    costs = {"last.pt": "unfinished run, training cost read from last.pt", None: "training cost unknown"}
    notes = [
        *notes,
        *(
            f"{d['name']}: {costs[d['training']['source']]}"
            for d in learners
            if d["training"]["source"] in costs
        ),
    ]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def write_comparison_report(comparison: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``comparison.json``, the plots and ``comparison.md`` into ``out_dir``; the paths of the
    two documents (plots: ``accuracy_vs_shots_<W>way`` and ``learning_curves``, PNG and SVG)."""
    out_dir = Path(out_dir)
    json_path, markdown_path = out_dir / "comparison.json", out_dir / "comparison.md"
    atomic_write_bytes(json_path, (json.dumps(comparison, indent=2) + "\n").encode())
    shot_plots, curves, plot_notes = draw_plots(comparison, out_dir)
    text = comparison_markdown(comparison, shot_plots, curves, [*comparison["notes"], *plot_notes])
    atomic_write_bytes(markdown_path, text.encode())
    return [json_path, markdown_path]
