"""A run killed with SIGKILL mid-way and resumed ends exactly like an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metaloop.checkpoint import load_checkpoint


def train_command(root, run_dir, *extra):
    sets = [
        "data.name=folder",
        f"data.root={root}",
        "algorithm.hidden=8",
        "train.ways=3",
        "train.queries=2",
        "train.steps=400",
        "train.log_every=5",
        "train.val_every=100",
        "train.val_episodes=5",
        "train.checkpoint_every=10",
        "eval.ways=3",
        "eval.queries=3",
        "eval.episodes=10",
        f"run_dir={run_dir}",
        *extra,
    ]
    return [
        sys.executable,
        "-m",
        "metaloop",
        "train",
        "--no-progress",
        *[a for s in sets for a in ("--set", s)],
    ]


def metric_lines(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


@pytest.mark.slow  # a killed and a resumed training process: about 30 s; CI runs it (-m slow)
def test_sigkill_then_resume_matches_an_uninterrupted_run(image_folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_command(image_folder, tmp_path / "whole"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(image_folder, killed), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a few checkpoints exist, mid-way through the steps
        if (killed / "last.pt").exists() and len(metric_lines(killed)) >= 12:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    interrupted_at = load_checkpoint(killed / "last.pt")["run_state"]["step"]
    assert 0 < interrupted_at < 400, "the run must be killed mid-way for this test to mean anything"

    resume = [sys.executable, "-m", "metaloop", "train", "--no-progress", "--resume", str(killed)]
    subprocess.run(resume, check=True, env=env, capture_output=True)

    whole, resumed = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(killed / "last.pt")
    assert resumed["run_state"]["step"] == 400
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert metric_lines(tmp_path / "whole") == metric_lines(killed)
    assert (
        json.loads((killed / "result.json").read_text())["mean"]
        == json.loads((tmp_path / "whole" / "result.json").read_text())["mean"]
    )


def test_sigterm_saves_the_step_it_stopped_after_and_says_how_to_resume(image_folder, tmp_path):
    """The command line's side of metaloop.interrupt: exit code 143, one line naming the step and the
    resume command, and last.pt at that step (mid-way between checkpoints, most of the time)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        train_command(image_folder, run_dir), env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        (run_dir / "metrics.jsonl").exists() and len(metric_lines(run_dir)) >= 3
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    step = load_checkpoint(run_dir / "last.pt")["run_state"]["step"]
    assert 0 < step < 400
    assert f"stopped by SIGTERM after step {step} of 400" in stderr
    assert f"metaloop train --resume {run_dir}" in stderr
    assert metric_lines(run_dir)[-1] == {"step": step, "event": "interrupted", "signal": "SIGTERM"}
    assert not (run_dir / "result.json").exists()
