"""``carried/``: the checkpoints of unfinished long runs kept in git, each file under 2 MB, each
``last.pt`` a loadable checkpoint of a run that still has steps to go, and ``carried/carry.sh``, which
copies a run there and refuses a file over the limit."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metaloop.checkpoint import load_checkpoint
from metaloop.cli import main

ROOT = Path(__file__).resolve().parents[1]
CARRIED = ROOT / "carried"
LIMIT_BYTES = 2 * 1000 * 1000
RUNS = sorted(p.name for p in CARRIED.iterdir() if p.is_dir())


def test_no_carried_file_is_over_2_mb():
    sizes = {str(p.relative_to(ROOT)): p.stat().st_size for p in CARRIED.rglob("*") if p.is_file()}
    assert sizes, "carried/ holds no files"
    too_big = {path: size for path, size in sizes.items() if size > LIMIT_BYTES}
    assert not too_big, f"over the 2 MB that carried/ allows: {too_big}"


@pytest.mark.parametrize("run", RUNS)
def test_each_carried_run_resumes_from_a_checkpoint_with_steps_to_go(run):
    state = load_checkpoint(CARRIED / run / "last.pt")
    assert (CARRIED / run / "config.yaml").is_file()
    steps = state["config"]["train"]["steps"]
    assert 0 < state["run_state"]["step"] < steps, f"{run} is finished: test it and take it out of carried/"


def _carry(cwd: Path, *runs: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = CARRIED / "carry.sh"
    return subprocess.run(["bash", str(script), *runs], cwd=cwd, env=env, capture_output=True, text=True)


def test_carry_copies_a_run_and_refuses_a_file_over_the_limit(image_folder, tmp_path, tiny_cli_args):
    run = tmp_path / "runs" / "tiny"
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, run, "train.keep_top=1")]) == 0
    stale = tmp_path / "carried" / "tiny" / "top-0000001.pt"  # kept by an earlier carry, displaced since
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    done = _carry(tmp_path, "tiny")
    assert done.returncode == 0, done.stderr
    assert "'step': 4" in done.stdout
    (top,) = [p.name for p in run.glob("top-*.pt")]
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", top):
        assert (tmp_path / "carried" / "tiny" / name).read_bytes() == (run / name).read_bytes()
    assert not stale.exists()

    big = tmp_path / "runs" / "big"
    shutil.copytree(run, big)
    (big / "last.pt").write_bytes(b"\0" * (LIMIT_BYTES + 1))
    refused = _carry(tmp_path, "big")
    assert refused.returncode == 2
    assert "over the 2 MB" in refused.stderr and "runs/big/last.pt" in refused.stderr
    assert not (tmp_path / "carried" / "big").exists()
