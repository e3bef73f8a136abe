"""Plots (metaloop.report): every training run draws its learning curve; each plot is a valid,
non-trivial PNG and SVG; a plotting failure never fails a finished run but is never silent."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from conftest import make_class_images
from matplotlib.colors import to_rgba
from PIL import Image

from metaloop import report, train
from metaloop.algorithms.base import MetaLearner
from metaloop.checkpoint import load_checkpoint
from metaloop.cli import main
from metaloop.report import (
    RIGHT,
    WRONG,
    learning_curves_figure,
    plot_accuracy_vs_shots,
    plot_episode_grid,
    plot_learning_curves,
    read_metrics,
    train_wall_seconds,
)
from metaloop.tasks.episodes import EpisodeSampler, TaskBatch

pytestmark = pytest.mark.real_learning_curve  # metaloop train writes the real files here


def assert_plot(stem, min_colours=20):
    """``stem.png`` is a PNG with real content and ``stem.svg`` well-formed SVG with many elements; no
    temporary file is left beside them. Returns the PNG as an RGB image."""
    png, svg = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"
    with Image.open(png) as im:
        assert im.format == "PNG"
        im.verify()
    image = Image.open(png).convert("RGB")
    assert min(image.size) >= 300
    colours = image.getcolors(maxcolors=1 << 24)
    assert len(colours) >= min_colours, "a nearly blank image"
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert sum(1 for _ in root.iter()) > 100
    assert not list(stem.parent.glob(".*.tmp"))
    return image


def count_colour(image, colour, tolerance=40):
    """Pixels of ``image`` within ``tolerance`` (per channel) of the hex ``colour``."""
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(image, dtype=int)  # [H, W, 3]
    return int((np.abs(pixels - target) <= tolerance).all(-1).sum())


@pytest.fixture(scope="module")
def two_runs(tiny_cli_args, image_folder, tmp_path_factory):
    """Two seconds-long runs through the command line: ProtoNet and ANIL on the synthetic folder."""
    root = tmp_path_factory.mktemp("report-runs")
    for name in ("protonet", "anil"):
        args = tiny_cli_args(image_folder, root / name, f"algorithm.name={name}", "train.log_every=1")
        assert main(["train", "--no-progress", *args]) == 0
    return {"protonet": root / "protonet", "anil": root / "anil"}


def test_every_training_run_draws_its_learning_curve(two_runs):
    for run_dir in two_runs.values():
        assert_plot(run_dir / "learning_curve")


def test_learning_curves_of_several_runs(two_runs, tmp_path):
    paths = plot_learning_curves(two_runs, tmp_path / "curves")
    assert [p.name for p in paths] == ["curves.png", "curves.svg"]
    image = assert_plot(tmp_path / "curves")
    # the default colours of the two runs (C0 blue, C1 orange) are both drawn
    assert count_colour(image, "#1f77b4", 20) > 500 and count_colour(image, "#ff7f0e", 20) > 500


def test_many_runs_share_one_legend_beside_the_panels(two_runs):
    few = learning_curves_figure(two_runs)
    assert not few.legends and all(ax.get_legend() is not None for ax in few.axes)
    many = {f"run{i}": run_dir for i in range(12) for run_dir in [list(two_runs.values())[i % 2]]}
    figure = learning_curves_figure(many)
    assert all(ax.get_legend() is None for ax in figure.axes)  # no legend covers a curve
    (legend,) = figure.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == 12 and all(text.startswith(f"run{i}") for i, text in enumerate(texts))
    colours = {tuple(to_rgba(line.get_color())) for line in figure.axes[0].lines}
    assert len(colours) == 12  # beyond matplotlib's ten default colours, none repeats


def write_log(run_dir, records):
    run_dir.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "trunc')  # a line cut short


def test_metrics_and_wall_clock(tmp_path):
    """Training lines get the validation time spent before them added: wall_seconds - seconds."""
    write_log(
        tmp_path / "run",
        [
            {"step": 1, "seconds": 1.0, "train_loss": 2.0},
            {"step": 2, "seconds": 2.0, "train_loss": 1.5},
            {"step": 2, "seconds": 2.0, "wall_seconds": 2.5, "val_mse": 1.0},
            {"step": 3, "seconds": 3.0, "train_loss": 1.0},
            {"step": 4, "seconds": 4.0, "train_loss": 0.5},
            {"step": 4, "seconds": 4.0, "wall_seconds": 5.0, "val_mse": 0.5},
            {"step": 4, "event": "early_stop", "best_val": -0.5},
        ],
    )
    train_lines, val_lines = read_metrics(tmp_path / "run")
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4] and [r["step"] for r in val_lines] == [2, 4]
    assert train_wall_seconds(train_lines, val_lines).tolist() == [1.0, 2.0, 3.5, 4.5]


def test_regression_curves_and_refusals(tmp_path):
    mse = [{"step": s, "seconds": s, "train_loss": 1 / s, "train_mse": 1 / s} for s in range(1, 6)]
    mse.append({"step": 5, "seconds": 5, "wall_seconds": 6, "val_mse": 0.3})
    write_log(tmp_path / "mse", mse)
    plot_learning_curves({"maml": tmp_path / "mse"}, tmp_path / "mse_curves")
    assert_plot(tmp_path / "mse_curves")
    write_log(tmp_path / "acc", [{"step": 1, "seconds": 1, "train_loss": 1.0, "train_accuracy": 0.5}])
    with pytest.raises(ValueError, match="mix classification"):
        plot_learning_curves({"a": tmp_path / "acc", "b": tmp_path / "mse"}, tmp_path / "mixed")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        plot_learning_curves({"a": tmp_path}, tmp_path / "none")
    with pytest.raises(ValueError, match="no extension"):
        plot_learning_curves({"a": tmp_path / "acc"}, tmp_path / "curves.png")


def test_plotting_never_fails_a_finished_run_and_is_never_silent(two_runs, tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text("")  # nothing to plot: an expected failure, one line
    report.draw_learning_curve(tmp_path)
    err = capsys.readouterr().err
    assert "warning: learning curve not drawn: no training or validation lines" in err
    assert "Traceback" not in err

    def buggy(run_dir):
        return None + 1  # a programming error: its traceback is printed

    monkeypatch.setattr(report, "write_learning_curve", buggy)
    report.draw_learning_curve(two_runs["protonet"])
    err = capsys.readouterr().err
    assert "bug in metaloop" in err and "Traceback" in err and "TypeError" in err


def test_accuracy_vs_shots(tmp_path):
    results = {
        "protonet": [(1, 0.80, 0.02), (5, 0.93, 0.01), (2, 0.87, 0.015), (10, 0.95, 0.008)],
        "maml": [(1, 0.75, 0.03), (5, 0.90, 0.02)],
    }
    plot_accuracy_vs_shots(results, tmp_path / "shots", title="5-way, synthetic")
    assert_plot(tmp_path / "shots")
    plot_accuracy_vs_shots(results, tmp_path / "again", title="5-way, synthetic")
    for fmt in ("png", "svg"):  # no date, no random ids: the same plot gives the same bytes
        assert (tmp_path / f"again.{fmt}").read_bytes() == (tmp_path / f"shots.{fmt}").read_bytes()
    with pytest.raises(ValueError, match="fractions, not percent"):
        plot_accuracy_vs_shots({"x": [(1, 80.0, 2.0)]}, tmp_path / "bad")


class HalfRight(MetaLearner):
    """Predicts the true class of even-numbered queries and a wrong one for odd-numbered ones."""

    name = "half-right"

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def meta_loss(self, batch):
        raise NotImplementedError

    def adapt(self, support_x, support_y):
        raise NotImplementedError

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        index = torch.arange(batch.query_y.shape[1])
        guess = torch.where(index % 2 == 0, batch.query_y, (batch.query_y + 1) % batch.ways)
        return torch.nn.functional.one_hot(guess, batch.ways).float()  # [T, W*Q, W]


def test_episode_grid_frames_right_green_and_wrong_red(tmp_path):
    batch = EpisodeSampler(make_class_images(num_classes=8), ways=4, shots=2, queries=3, seed=0).sample(4)
    plot_episode_grid(HalfRight(), batch, tmp_path / "episodes", tasks=2, columns=6)
    image = assert_plot(tmp_path / "episodes", min_colours=4)
    assert count_colour(image, RIGHT) > 200 and count_colour(image, WRONG) > 200
    with pytest.raises(ValueError, match="regression"):
        plot_episode_grid(HalfRight(), TaskBatch(*[torch.zeros(1, 5, 1)] * 4, ways=0), tmp_path / "x")


def test_episode_grid_of_a_trained_learner(two_runs, tmp_path):
    learner = train.learner_from_checkpoint(load_checkpoint(two_runs["protonet"]))
    unseen = make_class_images(num_classes=6, seed=5)
    batch = EpisodeSampler(unseen, ways=3, shots=1, queries=4, seed=1).sample(3)
    plot_episode_grid(learner, batch, tmp_path / "episodes")
    image = assert_plot(tmp_path / "episodes", min_colours=4)
    assert count_colour(image, RIGHT) + count_colour(image, WRONG) > 500  # 12 framed queries per episode
