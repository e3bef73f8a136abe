"""How the command line fails: a user's mistake is one line and exit code 2, a bug shows its
traceback, and ``--debug`` / ``METALOOP_DEBUG=1`` shows the traceback of a mistake too."""

import json

import pytest
import torch
import yaml

import metaloop.cli_commands
import metaloop.train
from metaloop.cli import main


def one_error_line(argv, capsys, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    return err


@pytest.fixture(scope="module")
def trained_run(tiny_cli_args, image_folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, run_dir)]) == 0
    return run_dir


def device_argv(command, run_dir, tmp_path, device):
    return {
        "train": ["train", "--set", f"run_dir={tmp_path / 'new'}"],
        "eval": ["eval", "--checkpoint", str(run_dir)],
        "predict": [
            "predict",
            "--checkpoint",
            str(run_dir),
            "--support",
            str(tmp_path),
            "--query",
            str(tmp_path),
        ],
        "compare": ["compare", str(run_dir), "--out", str(tmp_path / "cmp")],
    }[command] + ["--device", device]


COMMANDS = ["train", "eval", "predict", "compare"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_misspelt_device_lists_the_valid_names(command, trained_run, tmp_path, capsys):
    argv = device_argv(command, trained_run, tmp_path, "gpu")
    one_error_line(argv, capsys, "unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N")
    assert not (tmp_path / "new").exists() and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_with_a_torch_built_without_cuda(command, trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    argv = device_argv(command, trained_run, tmp_path, "cuda")
    one_error_line(
        argv, capsys, "this torch (" + torch.__version__ + ") was built without CUDA; use --device cpu"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_with_no_gpu_visible(command, trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    argv = device_argv(command, trained_run, tmp_path, "cuda")
    one_error_line(argv, capsys, "asks for a GPU, but none is visible")


def test_a_run_trained_on_a_gpu_is_evaluated_on_the_cpu_of_a_machine_without_one(
    trained_run, tmp_path, capsys, monkeypatch
):
    assert main(["eval", "--checkpoint", str(trained_run / "best.pt"), "--no-progress"]) == 0
    on_cpu = capsys.readouterr().out
    state = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=False)
    state["config"]["device"] = "cuda"
    torch.save(state, tmp_path / "gpu_trained.pt")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert main(["eval", "--checkpoint", str(tmp_path / "gpu_trained.pt"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "trained on 'cuda', which this machine lacks; evaluating on the CPU" in captured.err
    assert captured.out == on_cpu  # the same episodes, the same numbers
    one_error_line(  # asked for by name, a missing GPU is still an error
        ["eval", "--checkpoint", str(tmp_path / "gpu_trained.pt"), "--device", "cuda"], capsys, "without CUDA"
    )


def test_a_device_in_a_recipe_is_checked_too(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"device": "gpu", "run_dir": str(tmp_path / "run")}))
    one_error_line(["train", "--config", str(recipe)], capsys, "unknown device 'gpu'")


# ----- bugs and --debug (issue 16, point 5) ----------------------------------------------------
def test_a_bug_shows_its_traceback(monkeypatch, tiny_cli_args, image_folder, tmp_path, capsys):
    def broken_run(*args, **kwargs):
        return {}["missing key"]  # a KeyError: a bug, not the user's mistake

    monkeypatch.setattr(metaloop.train, "run", broken_run)
    code = main(["train", *tiny_cli_args(image_folder, tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "KeyError: 'missing key'" in err
    assert "internal error KeyError (a bug in metaloop, not in your input)" in err


def test_ctrl_c_outside_training_is_one_line_and_exit_code_130(monkeypatch, trained_run, capsys):
    """Ctrl-C while eval reads its checkpoint: no traceback."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(metaloop.cli_commands, "load_checkpoint", interrupted)
    assert main(["eval", "--checkpoint", str(trained_run), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err == "metaloop eval: interrupted\n"


def test_a_value_error_from_outside_metaloop_is_a_bug(
    monkeypatch, tiny_cli_args, image_folder, tmp_path, capsys
):
    monkeypatch.setattr(metaloop.train, "run", lambda *args, **kwargs: int("not a number"))
    code = main(["train", *tiny_cli_args(image_folder, tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "ValueError: invalid literal" in err


@pytest.mark.parametrize("how", ["flag", "flag-before-command", "environment"])
def test_debug_shows_the_traceback_of_a_user_error(how, capsys, monkeypatch):
    argv = ["train", "--set", "train.stpes=3"]
    if how == "flag":
        argv.append("--debug")
    elif how == "flag-before-command":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("METALOOP_DEBUG", "1")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("metaloop train: error: unknown config key(s) 'stpes'")


def test_without_debug_a_user_error_has_no_traceback(capsys, monkeypatch):
    monkeypatch.setenv("METALOOP_DEBUG", "0")
    one_error_line(["train", "--set", "train.stpes=3"], capsys, "unknown config key(s) 'stpes'")


# ----- the smaller items of issue 18 --------------------------------------------------------
def test_data_list_takes_no_name(capsys):
    one_error_line(
        ["data", "list", "foo"], capsys, "'data list' lists every dataset and takes no name, got 'foo'"
    )


def test_run_folder_is_announced_only_after_the_settings_are_checked(
    tiny_cli_args, image_folder, tmp_path, capsys
):
    err = one_error_line(
        ["train", *tiny_cli_args(image_folder, tmp_path / "bad", "train.ways=50")], capsys, "50-way"
    )
    assert "run folder" not in err and not (tmp_path / "bad").exists()  # a good run: test_train_seed_flag


@pytest.mark.parametrize("command", ["train", "eval", "data-verify"])
def test_a_mistyped_data_dir_is_not_created(command, trained_run, tmp_path, capsys):
    typo = tmp_path / "dtaa"
    argv = {
        "train": ["train", "--set", "data.name=omniglot", "--set", f"run_dir={tmp_path / 'run'}"],
        "eval": ["eval", "--checkpoint", str(trained_run)],
        "data-verify": ["data", "verify"],
    }[command]
    one_error_line([*argv, "--data-dir", str(typo)], capsys, f"data folder {typo} does not exist")
    assert not typo.exists() and not (tmp_path / "run").exists()


def test_eval_refuses_one_way(trained_run, capsys):
    one_error_line(
        ["eval", "--checkpoint", str(trained_run), "--ways", "1"], capsys, "--ways must be at least 2"
    )


def test_missing_omniglot_says_how_to_get_it_on_the_command_line(tmp_path, capsys):
    err = one_error_line(
        ["data", "prepare", "omniglot", "--no-download", "--data-dir", str(tmp_path)],
        capsys,
        f"Get them with 'metaloop data prepare omniglot --data-dir {tmp_path}'",
    )
    assert "download=True" not in err


def test_train_seed_flag(trained_run, tiny_cli_args, image_folder, tmp_path, capsys):
    def metrics(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]

    run_dir = tmp_path / "seed3"
    assert main(["train", "--no-progress", "--seed", "3", *tiny_cli_args(image_folder, run_dir)]) == 0
    assert f"run folder: {run_dir}" in capsys.readouterr().err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 3
    assert yaml.safe_load((trained_run / "config.yaml").read_text())["seed"] == 0
    assert metrics(run_dir) != metrics(trained_run)  # same settings but the seed: another run


def test_output_to_a_reader_that_went_away_ends_quietly():
    """``metaloop recipes | head -1``: the reader closes the pipe; no error line, exit code 0."""
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "metaloop", "recipes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # before the command has written anything: its first write fails
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and stderr == b""
