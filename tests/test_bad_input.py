"""Fault injection through the command line: every bad input a user can reach gives one clear
error line (what was wrong, what to do), and no file that existed before is changed."""

import hashlib
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaloop.cli import main


def snapshot(*folders):
    """sha256 of every file under ``folders`` (missing folders count as empty)."""
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def trained_run(tiny_cli_args, image_folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, run_dir)]) == 0
    return run_dir


def fails_cleanly(argv, message, capsys, *watched):
    """``main(argv)`` exits with code 2 and exactly one line on stderr, holding ``message``."""
    before = snapshot(*watched)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert snapshot(*watched) == before, "a file that existed before was changed"
    return err


def damaged_copy(run_dir, tmp_path, name, damage):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    path = copy / name
    path.write_bytes(damage(path.read_bytes()))
    return copy


def test_resume_from_a_truncated_checkpoint(trained_run, tmp_path, capsys):
    copy = damaged_copy(trained_run, tmp_path, "last.pt", lambda b: b[: len(b) // 2])
    fails_cleanly(
        ["train", "--resume", str(copy)],
        "last.pt is not a readable checkpoint: the file is truncated",
        capsys,
        copy,
    )


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def torch_file_holding(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"", "the file is empty (0 bytes)"),
        (lambda b: b[:1000], "the file is truncated (1000 bytes"),
        (lambda b: b"\x00" * len(b), "are not a PyTorch checkpoint (no zip archive"),
        (
            lambda b: bytes(
                torch.randint(0, 256, (len(b),), generator=torch.Generator().manual_seed(0)).tolist()
            ),
            "are not a PyTorch checkpoint (no zip archive",
        ),
        (lambda b: pickle.dumps({"model": [1, 2]}), "it is a plain Python pickle"),
        (lambda b: torch_file_holding({"model": RunsCode()}), "it refers to Python code (posix.system)"),
        (lambda b: torch_file_holding({"model": torch.nn.Linear(2, 2)}), "(torch.nn.modules.linear.Linear)"),
    ],
    ids=["empty", "truncated", "zeros", "random-bytes", "plain-pickle", "code", "module"],
)
def test_eval_of_an_unreadable_checkpoint(trained_run, tmp_path, capsys, damage, message):
    copy = damaged_copy(trained_run, tmp_path, "best.pt", damage)
    err = fails_cleanly(
        ["eval", "--checkpoint", str(copy / "best.pt")],
        "best.pt is not a readable checkpoint: ",
        capsys,
        copy,
    )
    assert message in err
    assert "weights_only" not in err and "will likely succeed" not in err  # never torch's advice


def test_eval_of_a_file_that_is_not_a_metaloop_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    fails_cleanly(["eval", "--checkpoint", str(foreign)], "is not a metaloop checkpoint", capsys, tmp_path)


def test_a_run_folder_is_never_overwritten(tiny_cli_args, trained_run, image_folder, capsys):
    argv = ["train", *tiny_cli_args(image_folder, trained_run)]
    fails_cleanly(argv, "already holds a run; continue it with --resume", capsys, trained_run)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=fast", "train.lr: expected float, got str 'fast'"),
        ("train.warmup=3", "unknown config key(s) 'warmup' in 'train'"),
        ("algorithm.inner_lr=0.4", "'protonet' takes no algorithm.inner_lr"),
        ("train.ways=40", "asked for 40-way tasks but folder"),
        ("train.shots=9", "shots + queries = 9 + 2 = 11 examples per class"),
        ("train.meta_batch_size=0", "train.meta_batch_size must be at least 1, got 0"),
    ],
)
def test_bad_configs_fail_before_anything_is_written(
    tiny_cli_args, image_folder, tmp_path, capsys, override, message
):
    run_dir = tmp_path / "run"
    fails_cleanly(["train", *tiny_cli_args(image_folder, run_dir, override)], message, capsys, image_folder)
    assert not run_dir.exists()


def make_folder(root, classes):
    for name, images in classes.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images):
            image.save(root / name / f"{i}.png")
    return root


def blank(size=28):
    return Image.new("L", (size, size), 0)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"a": [blank()] * 3, "b": []}, "no images"),
        ({"only": [blank()] * 5}, "at least 2"),
    ],
)
def test_bad_image_folders(tiny_cli_args, tmp_path, capsys, layout, message):
    root = make_folder(tmp_path / "images", layout)
    argv = ["train", *tiny_cli_args(root, tmp_path / "run", "data.train_split=all", "data.val_split=all")]
    fails_cleanly(argv, message, capsys, root)
    assert not (tmp_path / "run").exists()


def test_unreadable_image_is_named(tiny_cli_args, tmp_path, capsys):
    root = make_folder(tmp_path / "images", {"a": [blank()] * 4, "b": [blank(40)] * 4})
    (root / "b" / "broken.png").write_bytes(b"not a png")
    argv = ["train", *tiny_cli_args(root, tmp_path / "run", "data.train_split=all", "data.val_split=all")]
    err = fails_cleanly(argv, "broken.png", capsys, root)
    assert "b/broken.png" in err or "broken.png" in err


def test_truncated_omniglot_archive(omniglot_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(omniglot_data_dir / "omniglot", data / "omniglot")
    archive = data / "omniglot" / "images_evaluation.zip"
    archive.write_bytes(archive.read_bytes()[:1_000_000])
    fails_cleanly(["data", "verify", "--data-dir", str(data)], "images_evaluation.zip", capsys, data)
