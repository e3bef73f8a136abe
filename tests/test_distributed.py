"""Multi-process meta-training (``metaloop.distributed``) with real processes: gloo on the CPU.

Two ways of starting 2 ranks, both on the loopback interface:

- ``torchrun --standalone --nproc-per-node 2 -m metaloop ...`` (as a user does; run here as
  ``python -m torch.distributed.run``), see :func:`torchrun`;
- two plain processes with the environment torchrun gives its workers (:func:`launch`), where a
  test must watch or kill one rank without a launcher stepping in, or wrap rank 1 in a guard that
  makes it fail if it writes anything into the run folder.

Every process uses one thread, and so does every 1-process reference run: the order of
floating-point sums depends on the thread count, and that order is all that may differ.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaloop.algorithms import ProtoNet
from metaloop.checkpoint import load_checkpoint
from metaloop.cli import main
from metaloop.config import load_config
from metaloop.tasks import EpisodeSampler, SinusoidTasks, TaskBatch
from metaloop.train import run

WORLD = 2
TOLERANCE = 1e-6


# ----- launching ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(commands: list[list[str]], logs: Path) -> list[subprocess.Popen]:
    """Start ``commands[r]`` as rank r of ``len(commands)``, as torchrun would (no launcher left
    to watch them); stdout and stderr go to ``logs/rank<r>.out|err``."""
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    processes = []
    for r, command in enumerate(commands):
        env = {
            **child_env(),
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(len(commands)),
            "LOCAL_WORLD_SIZE": str(len(commands)),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        out, err = open(logs / f"rank{r}.out", "w"), open(logs / f"rank{r}.err", "w")
        processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=err))
        out.close()
        err.close()
    return processes


def wait_all(processes: list[subprocess.Popen], logs: Path, timeout: float = 120) -> list[int]:
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise
    return codes


def read_logs(logs: Path, r: int) -> str:
    return (logs / f"rank{r}.out").read_text() + (logs / f"rank{r}.err").read_text()


# Rank 1 runs `python -m metaloop ...` under this guard: creating, replacing or removing anything in
# the run folder (the paths the trainer writes through: open, os.open, rename/replace, mkdir)
# ends the process with code 99 and a message, so the test sees it.
GUARD = """
import builtins, io, os, runpy, sys
run_dir = os.path.realpath(sys.argv.pop(1))

def inside(path):
    try:
        return os.path.realpath(os.fspath(path)).startswith(run_dir)
    except TypeError:
        return False

def refuse(what, path):
    sys.stderr.write(f"GUARD: rank 1 tried to {what} {path}\\n")
    sys.stderr.flush()
    os._exit(99)

real_open, real_os_open = builtins.open, os.open
def guarded_open(file, mode="r", *args, **kwargs):
    if inside(file) and any(c in mode for c in "wax+"):
        refuse("open for writing", file)
    return real_open(file, mode, *args, **kwargs)
def guarded_os_open(path, flags, *args, **kwargs):
    if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        refuse("os.open for writing", path)
    return real_os_open(path, flags, *args, **kwargs)
builtins.open = io.open = guarded_open
os.open = guarded_os_open
for name in ("replace", "rename", "mkdir", "makedirs", "unlink", "remove"):
    def make(real, name=name):
        def guarded(path, *args, **kwargs):
            if inside(path) or (args and inside(args[0])):
                refuse(name, path)
            return real(path, *args, **kwargs)
        return guarded
    setattr(os, name, make(getattr(os, name)))
if sys.argv[1] == "-c":  # a script, as in `python -c SCRIPT ARGS...`
    sys.argv.pop(1)
    exec(compile(sys.argv.pop(1), "<guarded>", "exec"), {"__name__": "__main__"})
else:
    sys.argv[0] = "metaloop"
    runpy.run_module("metaloop", run_name="__main__")
"""

# `python -c SEQUENCE '[argv, ...]'`: one rank's `metaloop` commands, one after another, in one process
# group that this process joins (and the commands then use, see metaloop.distributed.process_group),
# so that several runs pay the start of Python and torch once; each command's output (stdout) starts
# with a line "== algorithm.name=<learner>". Each runs as metaloop.cli.main does, which under a
# launcher then leaves the process (os._exit, as the tests that start `python -m metaloop` check).
SEQUENCE = """
import json, os, sys
from metaloop import cli, distributed
from metaloop.allocator import keep_freed_memory
code = 0
with distributed.process_group("cpu", 60):
    for argv in json.loads(sys.argv[1]):
        print("== " + next(a for a in argv if a.startswith("algorithm.name=")), flush=True)
        args = cli.build_parser().parse_args(argv)
        keep_freed_memory()
        cli.log_to_console()
        code = cli.run_command(args.handler, args)
        if code:
            break
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


def metaloop_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "metaloop", *args]


def guarded_command(run_dir: Path, args: list[str]) -> list[str]:
    """``python -m metaloop ARGS`` under the guard; ``-c SCRIPT ...`` runs ``python -c SCRIPT ...``."""
    return [sys.executable, "-c", GUARD, str(run_dir), *args]


def torchrun(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        "-m",
        "metaloop",
        *args,
    ]
    return subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----- runs --------------------------------------------------------------------------------------
def tiny_sets(root: Path, run_dir: Path, algorithm: str, *extra: str) -> list[str]:
    """Config overrides of a seconds-long run: 20 outer steps of 4 tasks (2 per rank)."""
    return [
        "data.name=folder",
        f"data.root={root}",
        f"algorithm.name={algorithm}",
        "algorithm.hidden=8",
        "train.ways=3",
        "train.shots=1",
        "train.queries=2",
        "train.meta_batch_size=4",
        "train.steps=20",
        "train.log_every=5",
        "train.val_every=10",
        "train.val_episodes=10",
        "train.checkpoint_every=10",
        "eval.ways=3",
        "eval.queries=3",
        "eval.episodes=20",
        "eval.batch_size=4",
        f"run_dir={run_dir}",
        *extra,
    ]


# ProtoNet at 32x32: on 28x28 images its Conv-4 ends in a 1x1 map, and the last batch-norm shift of a
# channel that is positive for every image of a task moves every embedding alike, which leaves every
# distance unchanged; its gradient is then exactly zero, computed as rounding noise that Adam scales
# up to steps of ~lr. Such a parameter takes different values whenever the order of a sum changes
# (also in one process with 1 thread vs 2), so that setting cannot show anything about sharding.
# The same holds for the transfer baseline's Conv-4 embedding.
EXTRA = {
    "maml": [],
    "reptile": ["algorithm.inner_steps=2"],
    "protonet": ["data.image_size=32"],
    "baseline": ["data.image_size=32"],
    "attention": ["data.image_size=32", "algorithm.d_model=16", "algorithm.heads=2"],
}


def train_args(sets: list[str]) -> list[str]:
    return ["train", "--no-progress", *[arg for s in sets for arg in ("--set", s)]]


@pytest.fixture(scope="module")
def one_process_runs(image_folder, tmp_path_factory):
    """``learner -> run folder`` of 1-process reference runs (one thread), made on first use."""
    made: dict[str, Path] = {}

    def get(algorithm: str) -> Path:
        if algorithm not in made:
            run_dir = tmp_path_factory.mktemp("one") / algorithm
            config = load_config(overrides=tiny_sets(image_folder, run_dir, algorithm, *EXTRA[algorithm]))
            with one_thread():
                run(config, progress=False)
            made[algorithm] = run_dir
        return made[algorithm]

    return get


TWO_PROCESS_LEARNERS = ("maml", "protonet", "reptile", "baseline", "attention")


@pytest.fixture(scope="module")
def two_process_runs(image_folder, tmp_path_factory):
    """``(learner -> run folder, learner -> (rank 0 output, rank 1 output))`` of the runs of 2 ranks,
    one after another in one launch (:data:`SEQUENCE`), rank 1 under the guard for all their folders."""
    root, logs = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("two-logs")
    runs = {name: root / name for name in TWO_PROCESS_LEARNERS}
    commands = [train_args(tiny_sets(image_folder, runs[n], n, *EXTRA[n])) for n in TWO_PROCESS_LEARNERS]
    script = ["-c", SEQUENCE, json.dumps(commands)]
    processes = launch([[sys.executable, *script], guarded_command(root, script)], logs)
    assert wait_all(processes, logs, timeout=600) == [0, 0], read_logs(logs, 0) + read_logs(logs, 1)
    outputs = {}
    for r in range(WORLD):
        parts = re.split(r"^== algorithm\.name=(\w+)\n", (logs / f"rank{r}.out").read_text(), flags=re.M)
        assert parts[1::2] == list(TWO_PROCESS_LEARNERS), read_logs(logs, r)
        err = (logs / f"rank{r}.err").read_text()  # each learner's stdout part, then the whole stderr
        outputs[r] = {name: out + err for name, out in zip(parts[1::2], parts[2::2], strict=True)}
    return runs, {n: (outputs[0][n], outputs[1][n]) for n in TWO_PROCESS_LEARNERS}


def model_differences(a: Path, b: Path) -> dict[str, float]:
    """Largest absolute difference of each floating-point entry of two checkpoints' models."""
    model_a, model_b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert model_a.keys() == model_b.keys()
    return {
        k: (model_a[k].double() - model_b[k].double()).abs().max().item()
        for k in model_a
        if model_a[k].is_floating_point()
    }


def metric_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "duplicate lines in the metrics log"
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in lines]


def assert_same_log(one: Path, two: Path) -> None:
    records_one, records_two = metric_records(one), metric_records(two)
    assert [r["step"] for r in records_one] == [r["step"] for r in records_two] == [5, 10, 10, 15, 20, 20]
    for a, b in zip(records_one, records_two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


# ----- in one process: what sharding relies on ----------------------------------------------------
FIELDS = ("support_x", "support_y", "query_x", "query_y")


@pytest.mark.parametrize("kind", ["episodes", "sinusoid"])
def test_kept_tasks_are_those_of_the_whole_draw_and_the_stream_goes_on_alike(kind, class_images):
    def sampler():
        return EpisodeSampler(class_images, 3, 1, 2, seed=4) if kind == "episodes" else SinusoidTasks(5, 5, 4)

    whole, parts = sampler(), [sampler(), sampler()]
    batch = whole.sample(5)
    kept = [part.sample(5, keep=keep) for part, keep in zip(parts, [range(0, 2), range(2, 5)], strict=True)]
    for field in FIELDS:
        assert torch.equal(torch.cat([getattr(k, field) for k in kept]), getattr(batch, field)), field
    after = whole.sample(3)  # every sampler drew all 5 tasks, so the next ones agree
    for part in parts:
        following = part.sample(3)
        assert all(torch.equal(getattr(following, f), getattr(after, f)) for f in FIELDS)
    assert sampler().sample(4, keep=range(0)).num_tasks == 0
    with pytest.raises(ValueError, match="outside the 4 tasks drawn"):
        sampler().sample(4, keep=range(3, 5))


def test_protonet_tasks_do_not_see_each_other(class_images):
    """A task's training loss and gradient are the same alone or in a meta-batch, the running
    statistics move by the mean of the tasks' statistics, the convolution biases (in front of batch
    norm) get no gradient, and the checkpoint keys are those of earlier versions."""
    torch.manual_seed(0)
    learner = ProtoNet(hidden=8)
    assert learner.hparams == {"backbone": "conv4", "in_channels": 1, "hidden": 8}
    assert list(learner.state_dict())[:7] == [
        "encoder.blocks.0.0.weight",
        "encoder.blocks.0.0.bias",
        "encoder.blocks.0.1.weight",
        "encoder.blocks.0.1.bias",
        "encoder.blocks.0.1.running_mean",
        "encoder.blocks.0.1.running_var",
        "encoder.blocks.0.1.num_batches_tracked",
    ]
    b = EpisodeSampler(class_images, 3, 1, 2, seed=0).sample(3)
    batch = TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y, b.ways)
    together = copy.deepcopy(learner).double()
    alone = [copy.deepcopy(learner).double() for _ in range(3)]
    loss, _ = together.meta_loss(batch)
    (3 * loss).backward()  # the sum of the tasks' losses
    for t, single in enumerate(alone):
        single.meta_loss(batch.task(t))[0].backward()
    for name, p in together.named_parameters():
        grads = [dict(single.named_parameters())[name].grad for single in alone]
        if name.endswith(".0.bias"):
            assert p.grad is None and all(g is None for g in grads), name
        else:
            assert torch.allclose(p.grad, sum(grads), rtol=1e-10, atol=1e-12), name
    for name, buffer in together.named_buffers():
        if buffer.is_floating_point():
            mean = sum(dict(single.named_buffers())[name] for single in alone) / 3
            assert torch.allclose(buffer, mean, rtol=1e-12, atol=1e-14), name


# ----- tests with processes ----------------------------------------------------------------------
GRADIENT_CHECK = """
import copy, json, torch
from metaloop import distributed
from metaloop.algorithms import build_learner
from metaloop.data.base import ClassImages
from metaloop.tasks import EpisodeSampler, SinusoidTasks, TaskBatch

def double(batch):
    fields = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    return TaskBatch(*[f.double() if f.is_floating_point() else f for f in fields], batch.ways)

g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (8 * 6, 1, 28, 28), generator=g, dtype=torch.uint8)
data = ClassImages(images, torch.arange(0, 49, 6), [str(k) for k in range(8)], "random")
conv = {"hidden": 8, "ways": 3}
cases = [
    ("protonet", {"hidden": 8}, lambda: EpisodeSampler(data, 3, 1, 2, seed=5)),
    *[(name, conv, lambda: EpisodeSampler(data, 3, 1, 2, seed=5))
      for name in ("maml", "fomaml", "metasgd", "anil", "reptile", "cavia")],
    ("maml", {"backbone": "mlp", "hidden": 16}, lambda: SinusoidTasks(5, 5, seed=5)),
    ("cavia", {"backbone": "mlp", "hidden": 16}, lambda: SinusoidTasks(5, 5, seed=5)),
]
report = {}
with distributed.process_group("cpu", 30):
    for name, kwargs, sampler in cases:
        torch.manual_seed(0)
        full = build_learner(name, **kwargs).double()
        sharded = copy.deepcopy(full)
        # one process, the whole meta-batch of 4 tasks
        loss, full_metrics = full.meta_loss(double(sampler().sample(4)))
        loss.backward()
        # this rank's shard of the same 4 tasks, then the average over ranks
        loss, metrics = sharded.meta_loss(double(sampler().sample(4, keep=distributed.shard(4))))
        loss.backward()
        metrics = distributed.average_gradients_(sharded, metrics)
        grads = {n: (p.grad, q.grad) for (n, p), q in zip(full.named_parameters(), sharded.parameters())}
        scale = max(a.abs().max().item() for a, _ in grads.values() if a is not None)
        report[f"{name}-{kwargs.get('backbone', 'conv4')}"] = {
            "gradient": max((a - b).abs().max().item() / scale for a, b in grads.values() if a is not None),
            "missing": sorted(n for n, (a, b) in grads.items() if (a is None) != (b is None)),
            "buffers": max([(a - b).abs().max().item() for a, b in zip(full.buffers(), sharded.buffers())
                            if a.is_floating_point()] or [0.0]),
            "metrics": max(abs(full_metrics[k] - metrics[k]) for k in full_metrics),
            "scale": scale,
        }
if distributed.is_main():
    print("REPORT " + json.dumps(report))
"""


def test_sharded_meta_gradients_equal_the_full_batch_gradient(tmp_path):
    """For every learner, in float64: each rank's gradient on its 2 of 4 tasks, averaged over 2
    ranks, is the 1-process gradient on all 4 (relative to the largest gradient entry); so are the
    metrics and, for ProtoNet, the batch-norm running statistics. Reptile's surrogate included.
    (float64, because in float32 a sum of many cancelling terms differs by ~1e-6 relative when
    its order changes, which says nothing about the algorithm.)"""
    logs = tmp_path / "logs"
    processes = launch([[sys.executable, "-c", GRADIENT_CHECK]] * WORLD, logs)
    assert wait_all(processes, logs) == [0, 0], read_logs(logs, 0) + read_logs(logs, 1)
    line = next(x for x in read_logs(logs, 0).splitlines() if x.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    assert len(report) == 9
    print({case: f"{result['gradient']:.1e}" for case, result in report.items()})
    for case, result in report.items():
        assert result["missing"] == [], case
        assert result["gradient"] < 1e-12, (case, result)
        assert result["buffers"] < 1e-12, (case, result)
        assert result["metrics"] < 1e-6, (case, result)  # accuracy is a float32 mean
        assert result["scale"] > 1e-4, (case, result)  # a gradient that is there to compare


def test_the_model_based_learner_trains_in_step_on_two_processes(one_process_runs, two_process_runs):
    """The attention learner under torchrun: the same model as 1 process up to float32 rounding,
    which its softmax attention amplifies. Measured here: the train loss of 1 vs 2 processes differs
    by 6e-8 at step 1 and grows smoothly to 7e-6 by step 20 (no jump: nothing is computed
    differently), the largest parameter difference is ~5e-4. A sharding or averaging error would
    show at step 1 and move parameters by up to 20 steps x lr = 2e-2."""
    run_dir = two_process_runs[0]["attention"]
    differences = model_differences(one_process_runs("attention") / "last.pt", run_dir / "last.pt")
    assert max(differences.values()) < 3e-3, differences
    first = [r for r in metric_records(run_dir) if "train_loss" in r][0]
    reference = [r for r in metric_records(one_process_runs("attention")) if "train_loss" in r][0]
    assert first["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "reptile", "baseline"])
def test_two_processes_train_like_one(algorithm, one_process_runs, two_process_runs):
    """20 outer steps of 4 tasks on 2 ranks (2 tasks each) end with the parameters of 1 process
    on all 4 tasks; rank 1 writes nothing, the log has no duplicate lines and equals the
    1-process log; sharded validation and test give the 1-process numbers."""
    run_dir, (output_0, output_1) = two_process_runs[0][algorithm], two_process_runs[1][algorithm]
    one = one_process_runs(algorithm)

    differences = model_differences(one / "last.pt", run_dir / "last.pt")
    print(f"{algorithm}: largest parameter difference", max(differences.values()), differences)
    assert max(differences.values()) < TOLERANCE, differences

    # the same files, plus the learning curve that the command line (rank 0 only) draws at the end
    files = sorted(p.name for p in run_dir.iterdir())
    assert [f for f in files if not f.startswith("learning_curve.")] == sorted(p.name for p in one.iterdir())
    assert {"learning_curve.png", "learning_curve.svg"} <= set(files)
    assert_same_log(one, run_dir)
    result_one = json.loads((one / "result.json").read_text())
    result_two = json.loads((run_dir / "result.json").read_text())
    assert result_two["episodes"] == 20 and result_two["mean"] == pytest.approx(result_one["mean"], abs=1e-9)
    # both ranks printed the same result, only rank 0 wrote it
    assert "accuracy" in output_0 and "accuracy" not in output_1


@pytest.mark.slow  # two torchrun launches, a kill and a resume: about 30 s; CI runs it (-m slow)
def test_resume_under_torchrun_continues_exactly(image_folder, one_process_runs, tmp_path):
    """torchrun, 2 ranks: 10 steps, then --resume to 20, ends where 1 process's 20 steps end."""
    run_dir = tmp_path / "run"
    first = torchrun(train_args(tiny_sets(image_folder, run_dir, "maml", "train.steps=10")))
    assert first.returncode == 0, first.stderr
    resumed = torchrun(["train", "--no-progress", "--resume", str(run_dir), "--set", "train.steps=20"])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("maml on folder/test") == 1  # printed by rank 0 only
    one = one_process_runs("maml")
    differences = model_differences(one / "last.pt", run_dir / "last.pt")
    assert max(differences.values()) < TOLERANCE, differences
    assert_same_log(one, run_dir)


def test_sharded_evaluation_gives_the_one_process_result(one_process_runs, tmp_path, capsys):
    """37 test episodes in chunks of 2 x 4 (the last one split 2 / 3) give the 1-process numbers."""
    checkpoint = one_process_runs("protonet")
    args = ["eval", "--checkpoint", str(checkpoint), "--episodes", "37", "--no-progress", "--json"]
    two = torchrun([*args, str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stderr
    with one_thread():
        assert main([*args, str(tmp_path / "one.json")]) == 0
    one_result, two_result = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two_result == one_result and one_result["episodes"] == 37
    assert two.stdout.count("accuracy") == 1


def test_meta_batch_not_divisible_by_the_ranks_is_a_clear_error(image_folder, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    args = train_args(tiny_sets(image_folder, run_dir, "maml", "train.meta_batch_size=3"))
    processes = launch([metaloop_command(args)] * WORLD, logs)
    assert wait_all(processes, logs, timeout=60) == [2, 2]
    message = "train.meta_batch_size = 3 does not split evenly over 2 processes; use a multiple of 2"
    assert message in read_logs(logs, 0) and message in read_logs(logs, 1)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "how, victim, expected",
    [
        (signal.SIGKILL, 1, "Connection"),  # a dead peer: its sockets close, the next all-reduce fails
        (signal.SIGKILL, 0, "Connection"),  # rank 0, which also hosts the rendezvous store
        (signal.SIGSTOP, 1, "Timed out"),  # a hung peer: the all-reduce times out (dist_timeout_s=5)
    ],
    ids=["rank1-killed", "rank0-killed", "rank1-hung"],
)
def test_a_failed_rank_stops_the_others_with_a_clear_error(how, victim, expected, image_folder, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    sets = tiny_sets(image_folder, run_dir, "maml", "train.steps=100000", "dist_timeout_s=5")
    processes = launch([metaloop_command(train_args(sets))] * WORLD, logs)
    survivor = processes[1 - victim]
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline, read_logs(logs, 0) + read_logs(logs, 1)
            assert survivor.poll() is None, read_logs(logs, 1 - victim)
            time.sleep(0.2)
        processes[victim].send_signal(how)
        stopped = time.monotonic()
        code = survivor.wait(timeout=30)
        waited = time.monotonic() - stopped
    finally:
        for p in processes:
            p.kill()
            p.wait()
    output = read_logs(logs, 1 - victim)
    assert code == 1, output
    # e.g. "metaloop train: error: rank 0 of 2: averaging across ranks (all-reduce) failed: ..."
    assert re.search(rf"metaloop train: error: rank {1 - victim} of 2: [^\n]* failed: ", output), output
    assert expected in output and "Another rank of this run probably died" in output
    assert waited < 5 + 10  # the timeout, plus start-up slack on a loaded machine
