"""``metaloop compare``: paired statistics, the end-to-end command, and its refusals."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from metaloop.checkpoint import load_checkpoint, save_checkpoint
from metaloop.cli import main
from metaloop.compare import Cell, cell_record, paired_difference
from metaloop.config import config_from_dict
from metaloop.evaluate import evaluate
from metaloop.learners import learner_from_checkpoint
from metaloop.tasks.source import TaskSource


def test_paired_difference_matches_a_direct_computation():
    learner = [1.0, 0.8, 0.6, 1.0, 0.4, 0.9, 0.7, 0.5]
    reference = [0.9, 0.8, 0.4, 0.9, 0.3, 0.9, 0.6, 0.2]
    differences = [a - b for a, b in zip(learner, reference, strict=True)]
    mean, std = statistics.fmean(differences), statistics.stdev(differences)  # stdev: ddof=1
    result = paired_difference(torch.tensor(learner), torch.tensor(reference))
    assert result["mean"] == pytest.approx(mean, abs=1e-6)
    assert result["mean"] == pytest.approx(statistics.fmean(learner) - statistics.fmean(reference), abs=1e-6)
    assert result["std"] == pytest.approx(std, abs=1e-6)
    assert result["ci95"] == pytest.approx(1.96 * std / math.sqrt(len(differences)), abs=1e-6)
    assert result["significant"] == (abs(mean) > 1.96 * std / math.sqrt(8)) and result["significant"]
    # unpaired, the two 95% intervals overlap: pairing is what shows the difference
    separate = [1.96 * statistics.stdev(v) / math.sqrt(8) for v in (learner, reference)]
    assert statistics.fmean(learner) - separate[0] < statistics.fmean(reference) + separate[1]
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference(torch.ones(8), torch.ones(7))


def test_validation_steadiness_is_the_sd_of_step_to_step_changes(tmp_path):
    from metaloop.contenders import validation_steadiness

    lines = [
        {"step": 1, "train_loss": 1.0},
        {"step": 2, "val_accuracy": 0.50},
        {"step": 4, "val_accuracy": 0.60},
    ]
    lines += [{"step": 6, "val_accuracy": 0.55}, {"step": 8, "val_accuracy": 0.75}]
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 9, "val_acc'  # a line cut short
    (tmp_path / "metrics.jsonl").write_text(text)
    changes = torch.tensor([10.0, -5.0, 20.0], dtype=torch.float64)
    result = validation_steadiness(tmp_path)
    assert result["validations"] == 4
    assert result["change_sd"] == pytest.approx(changes.std().item())
    assert result["late_change_sd"] is None  # steps 6 and 8 are past 8/2: one change, no sd
    lines += [{"step": 10, "val_accuracy": 0.70}, {"step": 12, "val_accuracy": 0.78}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    late = torch.tensor([-5.0, 8.0], dtype=torch.float64)  # steps 8, 10, 12: above half of 12
    assert validation_steadiness(tmp_path)["late_change_sd"] == pytest.approx(late.std().item())
    missing = {"validations": None, "change_sd": None, "late_change_sd": None}
    assert validation_steadiness(tmp_path / "missing") == missing


def test_cell_record_marks_learners_without_the_cell_not_applicable():
    cell, other = Cell(5, 1, 15), Cell(20, 1, 15)
    values = {
        "protonet": {cell: torch.tensor([1.0, 0.5, 0.75]), other: torch.tensor([0.5, 0.5, 0.25])},
        "maml": {cell: torch.tensor([0.5, 0.5, 1.0])},  # a 5-way output layer: no 20-way cell
    }
    five, twenty = cell_record(cell, values, "protonet"), cell_record(other, values, "protonet")
    assert set(five["difference"]) == {"maml"}  # no difference of the reference with itself
    assert five["difference"]["maml"]["mean"] == pytest.approx(-0.25 / 3)
    assert twenty["accuracy"]["maml"] is None and twenty["difference"]["maml"] is None
    assert twenty["accuracy"]["protonet"]["mean"] == pytest.approx(1.25 / 3)
    # with the fixed-ways learner as reference, nobody has a difference in the 20-way cell
    assert cell_record(other, values, "maml")["difference"] == {"protonet": None}


@pytest.fixture(scope="module")
def runs(image_folder, tiny_cli_args, tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs on the image folder: ProtoNet and the transfer baseline (3-way, 4 steps)."""
    root = tmp_path_factory.mktemp("runs")
    extra = {"protonet": [], "baseline": ["algorithm.name=baseline", "algorithm.finetune_steps=5"]}
    for name, sets in extra.items():
        assert main(["train", "--no-progress", *tiny_cli_args(image_folder, root / name, *sets)]) == 0
    return {name: root / name for name in extra}


def tiny_recipe(
    path: Path, image_folder: Path, run_dir: Path, algorithm: str = "maml", ways: int = 3
) -> Path:
    """A recipe of a seconds-long ``ways``-way run on the image folder (MAML's output layer is built
    for ``ways``)."""
    recipe = {
        "algorithm": {"name": algorithm, "hidden": 8},
        "data": {"name": "folder", "root": str(image_folder)},
        "train": {"ways": ways, "queries": 2, "steps": 1000, "val_every": 2, "val_episodes": 5},
        "eval": {"ways": ways, "queries": 3, "episodes": 10},
        "run_dir": str(run_dir),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_compare_end_to_end_is_reproducible(runs, image_folder, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "maml_tiny.yaml", image_folder, tmp_path / "unused")
    out = tmp_path / "comparison"
    argv = [
        "compare",
        *map(str, runs.values()),
        str(recipe),
        "--out",
        str(out),
        "--ways",
        "3",
        "2",
        "--shots",
        "1",
        "2",
        "--episodes",
        "6",
        "--train",
        "--steps",
        "4",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "3 learners compared" in capsys.readouterr().out
    first = (out / "comparison.json").read_text()
    comparison = json.loads(first)
    assert [d["name"] for d in comparison["learners"]] == ["protonet", "baseline", "maml_tiny"]
    assert comparison["settings"]["reference"] == "protonet"
    maml = comparison["learners"][2]
    assert maml["trained_here"] and maml["fixed_ways"] == 3 and maml["training"]["steps"] == 4
    assert [(c["ways"], c["shots"], c["queries"]) for c in comparison["cells"]] == [
        (2, 1, 9),  # 15 queries asked; the test classes hold 10 images
        (2, 2, 8),
        (3, 1, 9),
        (3, 2, 8),
    ]
    for cell in comparison["cells"]:
        accuracy, difference = cell["accuracy"], cell["difference"]
        assert (accuracy["maml_tiny"] is None) == (cell["ways"] == 2)
        paired = difference["baseline"]["mean"]
        assert paired == pytest.approx(accuracy["baseline"]["mean"] - accuracy["protonet"]["mean"], abs=1e-12)
        assert accuracy["protonet"]["episodes"] == 6
    # a cell's numbers are those of a plain evaluation on episodes from a fresh sampler of that seed
    best = load_checkpoint(runs["protonet"] / "best.pt")
    sampler = TaskSource(config_from_dict(best["config"])).sampler("test", 3, 2, 8, seed=1234)
    plain = evaluate(learner_from_checkpoint(best), sampler, episodes=6, progress=False)
    assert comparison["cells"][3]["accuracy"]["protonet"]["mean"] == pytest.approx(plain.mean, abs=1e-12)

    markdown = (out / "comparison.md").read_text()
    assert "## Paired differences against protonet" in markdown and "| maml_tiny | n/a | n/a |" in markdown
    for image in ("accuracy_vs_shots_2way.png", "accuracy_vs_shots_3way.png", "learning_curves.png"):
        assert f"]({image})" in markdown and (out / image).is_file()

    trained = (out / "runs" / "maml_tiny" / "last.pt").stat().st_mtime_ns
    assert main(argv) == 0  # again: the finished run is reused, and every number is the same
    assert (out / "runs" / "maml_tiny" / "last.pt").stat().st_mtime_ns == trained
    assert (out / "comparison.json").read_text() == first
    assert (out / "comparison.md").read_text() == markdown
    elsewhere = tmp_path / "again"  # trained afresh there: the same model, so the same numbers
    assert main([str(elsewhere) if arg == str(out) else arg for arg in argv]) == 0
    assert json.loads((elsewhere / "comparison.json").read_text())["cells"] == comparison["cells"]


def test_a_label_joins_runs_of_different_ways_into_one_learner(runs, image_folder, tmp_path, capsys):
    recipes = [
        tiny_recipe(tmp_path / f"maml_{w}w.yaml", image_folder, tmp_path / "unused", ways=w) for w in (3, 2)
    ]
    out = tmp_path / "comparison"
    argv = ["compare", str(runs["protonet"]), *(f"maml={r}" for r in recipes), "--out", str(out)]
    argv += "--ways 2 3 --shots 1 --episodes 6 --train --steps 3 --no-progress".split()
    assert main(argv) == 0
    assert "2 learners compared" in capsys.readouterr().out
    comparison = json.loads((out / "comparison.json").read_text())
    assert [(d["name"], d["label"], d["fixed_ways"]) for d in comparison["learners"]] == [
        ("protonet", "protonet", None),
        ("maml_3w", "maml", 3),
        ("maml_2w", "maml", 2),
    ]
    for cell in comparison["cells"]:  # one row: each cell from the run built for its ways
        assert set(cell["accuracy"]) == {"protonet", "maml"} and set(cell["difference"]) == {"maml"}
        member = out / "runs" / f"maml_{cell['ways']}w"
        best = load_checkpoint(member / "best.pt")
        sampler = TaskSource(config_from_dict(best["config"])).sampler("test", cell["ways"], 1, 9, seed=1234)
        plain = evaluate(learner_from_checkpoint(best), sampler, episodes=6, progress=False)
        assert cell["accuracy"]["maml"]["mean"] == pytest.approx(plain.mean, abs=1e-12)
    markdown = (out / "comparison.md").read_text()
    assert markdown.startswith("# Comparison of 2 learners (3 runs)")
    assert re.search(r"\| maml \| \d+\.\d\d ± \d+\.\d\d \| \d+\.\d\d ± \d+\.\d\d \|", markdown)
    assert "| n/a" not in markdown.split("## Paired differences")[0]
    assert markdown.count("| maml | maml | yes | 3 |") == 2  # training cost: a line per run

    same_ways = [
        "compare",
        str(runs["protonet"]),
        f"protonet={runs['baseline']}",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main([*same_ways, "--ways", "5", "--shots", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        "protonet and baseline are both labelled 'protonet' and would both be tested at 5-way 1-shot" in err
    )
    assert main(["compare", f"={runs['baseline']}", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "LABEL=RUN_OR_RECIPE with both parts given" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def altered_run(run_dir: Path, to: Path, **data: object) -> Path:
    """A copy of ``run_dir``'s best.pt whose config has ``data`` keys (``seed`` at the top) replaced."""
    state = load_checkpoint(run_dir / "best.pt")
    for key, value in data.items():
        (state["config"] if key == "seed" else state["config"]["data"])[key] = value
    to.mkdir()
    save_checkpoint(to / "best.pt", state)
    return to


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_size": 20}, "folder/test of .*, 20x20 images, seed 0, which hold different images"),
        ({"seed": 1}, "their test episodes would differ"),  # the folder's class split follows the seed
        ({"name": "sinusoid"}, "sinusoid regression run"),
    ],
)
def test_runs_of_different_test_data_are_refused(runs, tmp_path, capsys, change, message):
    other = altered_run(runs["protonet"], tmp_path / "other", **change)
    argv = ["compare", str(runs["protonet"]), str(other), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_argument_errors_are_clear(runs, image_folder, tmp_path, capsys):
    run = str(runs["protonet"])
    out = ["--out", str(tmp_path / "out")]
    recipe = str(tiny_recipe(tmp_path / "maml_tiny.yaml", image_folder, tmp_path / "never_trained"))
    cases = [
        (["compare", run, "nowhere", *out], "nowhere does not exist"),
        (["compare", run, recipe, *out], "has no trained run at its run_dir .* add --train"),
        (["compare", run, recipe, *out, "--train"], "--train trains every recipe under one budget"),
        (["compare", run, *out, "--steps", "3"], "add --train"),
        (["compare", run, *out, "--reference", "maml"], "--reference 'maml' is none of"),
        (["compare", run, run, *out], "are both named 'protonet'"),
        (["compare", run, *out, "--ways", "50"], "50-way tasks but .* has only 6 classes; use ways <= 6"),
    ]
    for argv, message in cases:
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "never_trained").exists()


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--ways", "--shots", "--episodes", "--seed", "--train", "--steps", "--minutes"):
        assert option in out
