"""What a training run shows and writes while it runs: a line per meta-validation with its 95% CI
and the best so far, metrics.csv beside metrics.jsonl (also after a resume), TensorBoard events."""

import csv
import json
import re

import pytest

from metaloop.cli import main
from metaloop.metric_files import tensorboard_available


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_console_shows_meta_validation_with_its_ci_and_the_best(
    tiny_cli_args, image_folder, tmp_path, capsys
):
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    lines = re.findall(
        r"step (\d+): meta-val 3-way 1-shot accuracy: ([\d.]+) ± ([\d.]+)% .*best so far ([\d.]+)%", err
    )
    assert [int(step) for step, *_ in lines] == [2, 4], err  # train.val_every=2, train.steps=4
    logged = [r["val_accuracy"] for r in records(tmp_path / "run") if "val_accuracy" in r]
    for (_, mean, ci, best), accuracy, best_so_far in zip(
        lines, logged, [logged[0], max(logged)], strict=True
    ):
        assert float(mean) == pytest.approx(100 * accuracy, abs=0.006)
        assert float(ci) > 0
        assert float(best) == pytest.approx(100 * best_so_far, abs=0.006)


def test_csv_holds_the_json_records_and_follows_a_resume(tiny_cli_args, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, run_dir, "train.log_every=1")]) == 0
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = records(run_dir)
    assert len(rows) == len(logged) == 6  # 4 training lines + 2 validations
    for row, record in zip(rows, logged, strict=True):
        assert {k: v for k, v in row.items() if v != ""} == {k: str(v) for k, v in record.items()}
    # a crash after step 4 left lines past the checkpoint: resume trims both logs alike
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "train_loss": 9.0}) + "\n" + '{"step": 6, "trai')
    with open(run_dir / "metrics.csv", "a") as f:
        f.write("5,0.5,0.001,9.0\n")
    argv = ["train", "--no-progress", "--resume", str(run_dir), "--set", "train.steps=6"]
    assert main(argv) == 0
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = records(run_dir)
    assert 9.0 not in [r.get("train_loss") for r in logged]
    assert [int(row["step"]) for row in rows] == [r["step"] for r in logged] == [1, 2, 2, 3, 4, 4, 5, 6, 6]


@pytest.mark.skipif(
    not tensorboard_available(), reason="tensorboard is not installed (pip install tensorboard)"
)
def test_tensorboard_events(tiny_cli_args, image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert (
        main(["train", "--no-progress", *tiny_cli_args(image_folder, run_dir, "train.tensorboard=true")]) == 0
    )
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    val = [(e.step, e.value) for e in events.Scalars("val_accuracy")]
    logged = [(r["step"], r["val_accuracy"]) for r in records(run_dir) if "val_accuracy" in r]
    assert [s for s, _ in val] == [s for s, _ in logged] == [2, 4]
    assert [v for _, v in val] == pytest.approx([v for _, v in logged])


def test_tensorboard_requested_without_the_package(
    tiny_cli_args, image_folder, tmp_path, capsys, monkeypatch
):
    import metaloop.metric_files as metric_files

    monkeypatch.setattr(metric_files, "tensorboard_available", lambda: False)
    code = main(["train", *tiny_cli_args(image_folder, tmp_path / "run", "train.tensorboard=true")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'metaloop[tensorboard]'" in err
    assert not (tmp_path / "run").exists()
