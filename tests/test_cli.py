import json

import pytest

from metaloop.cli import main


def test_train_then_eval(tiny_cli_args, image_folder, tmp_path, capsys):
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "protonet on folder/test: 3-way 1-shot accuracy:" in out and "95% CI, 10 episodes" in out
    json_path = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "run"),
            "--episodes",
            "12",
            "--ways",
            "2",
            "--json",
            str(json_path),
        ]
    )
    assert code == 0
    assert "2-way 1-shot accuracy" in capsys.readouterr().out
    assert json.loads(json_path.read_text())["episodes"] == 12


def test_eval_batch_size_sets_the_episodes_run_at_once(
    tiny_cli_args, image_folder, tmp_path, capsys, monkeypatch
):
    import metaloop.evaluate

    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, tmp_path / "run")]) == 0
    chunks = []
    evaluate = metaloop.evaluate.evaluate
    monkeypatch.setattr(metaloop.evaluate, "evaluate", lambda *a: chunks.append(a[3]) or evaluate(*a))
    results = []
    for size in ([], ["--batch-size", "5"]):
        argv = ["eval", "--checkpoint", str(tmp_path / "run"), "--episodes", "12", *size, "--no-progress"]
        assert main([*argv, "--json", str(tmp_path / "e.json")]) == 0
        results.append(json.loads((tmp_path / "e.json").read_text()))
    assert chunks == [16, 5]  # the run's eval.batch_size, then the option's
    assert results[0]["episodes"] == results[1]["episodes"] == 12
    assert abs(results[0]["mean"] - results[1]["mean"]) < results[0]["ci95"] + 1e-6  # the same episodes
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--batch-size", "0"]) == 2
    assert "eval.batch_size must be at least 1, got 0" in capsys.readouterr().err


def test_resume_continues_and_extends(tiny_cli_args, image_folder, tmp_path, capsys):
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, tmp_path / "run")]) == 0
    assert main(["train", "--no-progress", "--resume", str(tmp_path / "run"), "--set", "train.steps=6"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--set", "train.stpes=3"], "unknown config key(s) 'stpes'"),
        (["train", "--config", "missing.yaml"], "config file 'missing.yaml' not found"),
        (["eval", "--checkpoint", "nowhere.pt"], "checkpoint nowhere.pt does not exist"),
        (["train", "--set", "data.name=mnist"], "unknown dataset 'mnist'"),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_impossible_task_shape_fails_before_training(tiny_cli_args, image_folder, tmp_path, capsys):
    argv = ["train", *tiny_cli_args(image_folder, tmp_path / "run"), "--set", "train.ways=50"]
    assert main(argv) == 2
    assert "50-way tasks but folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["predict"], ["data"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: metaloop" in capsys.readouterr().out
