"""A user's network given by import path through the command line: it trains, resumes bit-identically
after SIGKILL, and its checkpoint serves eval and predict; bad networks are one-line errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_crash_resume import metric_lines, train_command

from metaloop.checkpoint import load_checkpoint
from metaloop.cli import main

TESTS = Path(__file__).parent
USER_NET = [
    "algorithm.name=maml",
    "algorithm.backbone=user_networks:residual_net",
    "algorithm.backbone_args={width: 4}",
    "algorithm.inner_lr=0.3",
    "train.steps=60",
    "data.image_size=16",
]


def environment():
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.mark.slow  # three training processes: about 75 s on the shared 2-core machine
def test_a_user_network_trains_resumes_after_sigkill_and_serves_eval_and_predict(
    image_folder, tmp_path, capsys
):
    env = environment()
    whole_run = train_command(image_folder, tmp_path / "whole", *USER_NET)
    subprocess.run(whole_run, check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        train_command(image_folder, killed, *USER_NET), env=env, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a few checkpoints exist, mid-way through the steps
        if (killed / "last.pt").exists() and len(metric_lines(killed)) >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = load_checkpoint(killed / "last.pt")["run_state"]["step"]
    assert 0 < interrupted_at < 60, "the run must be killed mid-way for this test to mean anything"
    resume = [sys.executable, "-m", "metaloop", "train", "--no-progress", "--resume", str(killed)]
    subprocess.run(resume, check=True, env=env, capture_output=True)

    whole, resumed = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(killed / "last.pt")
    assert resumed["hparams"]["backbone"] == "user_networks:residual_net"
    assert resumed["hparams"]["backbone_args"] == {"width": 4}
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert metric_lines(tmp_path / "whole") == metric_lines(killed)
    result = json.loads((killed / "result.json").read_text())
    assert result["mean"] == json.loads((tmp_path / "whole" / "result.json").read_text())["mean"]
    assert result["mean"] > 0.45  # learned: chance is 1/3

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(killed), "--episodes", "10", "--no-progress"]) == 0
    assert "maml on folder/test after 3 inner steps" in capsys.readouterr().out
    classes = sorted(p for p in image_folder.iterdir() if p.is_dir())[:3]
    support = tmp_path / "support"
    for c in classes:
        (support / c.name).mkdir(parents=True)
        for image in sorted(c.iterdir())[:2]:
            (support / c.name / image.name).write_bytes(image.read_bytes())
    argv = ["predict", "--checkpoint", str(killed), "--support", str(support), "--query", str(classes[0])]
    assert main(argv) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == f"path,predicted,{','.join('p_' + c.name for c in classes)}" and len(rows) == 11


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ["algorithm.backbone=no_such_package.nets:factory"],
            "backbone 'no_such_package.nets:factory': module 'no_such_package.nets' cannot be imported",
        ),
        (["algorithm.backbone=user_networks:missing"], "module 'user_networks' has no attribute 'missing'"),
        (
            ["algorithm.backbone=user_networks:not_a_network", "algorithm.backbone_args={}"],
            "backbone 'user_networks:not_a_network' returned a str, not a torch.nn.Module",
        ),
        (
            ["algorithm.backbone_args={width: 4, ways: 5}"],
            re.escape(
                "maps inputs [2, 1, 16, 16] to [2, 5], but this maml learner for 3-way tasks needs [2, 3]"
            ),
        ),
        (["algorithm.backbone_args={depth: 4}"], "does not take backbone_args {'depth': 4}"),
        (
            ["algorithm.backbone=user_networks:encoder"],
            re.escape("to [2, 4], but this maml learner for 3-way"),
        ),
        (["algorithm.backbone=resnet18"], "unknown backbone 'resnet18': use a built-in"),
    ],
    ids=[
        "no-module",
        "no-factory",
        "not-a-module",
        "wrong-ways",
        "bad-args",
        "embedding-not-logits",
        "unknown",
    ],
)
def test_bad_networks_are_one_line_errors_and_nothing_is_written(
    image_folder, tmp_path, capsys, sets, message
):
    run_dir = tmp_path / "run"
    command = train_command(image_folder, run_dir, *USER_NET, *sets)[4:]  # after "python -m metaloop train"
    assert main(["train", *command]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # the error alone: "run folder:" only follows checked settings
    assert re.search(message, lines[0]), lines[0]
    assert not run_dir.exists()


def test_a_checkpoint_whose_factory_cannot_be_imported_fails_in_one_line(image_folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    sets = [*USER_NET, "train.steps=2", "train.val_every=2", "eval.episodes=2"]
    assert main(["train", *train_command(image_folder, run_dir, *sets)[4:]]) == 0
    state = load_checkpoint(run_dir / "best.pt")
    state["hparams"]["backbone"] = "gone_package.nets:residual_net"
    torch.save(state, tmp_path / "moved.pt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "moved.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cannot rebuild this maml checkpoint's network: backbone 'gone_package.nets:residual_net'" in err
