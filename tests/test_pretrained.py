"""Pretrained networks: a small encoder pretrained here on glyph classes, loaded by
``algorithm.backbone_weights``, kept fixed by ``freeze_backbone``, and used with no meta-training at
all (``metaloop export``, then ``eval`` and ``predict``)."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import write_image_folder
from user_networks import Encoder

from metaloop.checkpoint import load_checkpoint
from metaloop.cli import main
from metaloop.config import load_config
from metaloop.data import load_dataset
from metaloop.data.base import ClassImages
from metaloop.train import Trainer

WIDTH = 16


def glyph_sets(*extra):
    return [
        "data.name=glyphs",
        "algorithm.name=protonet",
        "algorithm.backbone=user_networks:encoder",
        f"algorithm.backbone_args={{width: {WIDTH}}}",
        "eval.ways=5",
        "eval.queries=5",
        "eval.episodes=40",
        *extra,
    ]


def as_args(sets):
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, seed_glyph_cache):
    """An :class:`Encoder` and a linear head trained as an ordinary classifier of 50 glyph train
    classes (150 Adam steps of 64 images); the encoder's state dict saved to a file."""
    seed_glyph_cache()  # the session's generated glyphs in METALOOP_CACHE, if one is set
    train = load_dataset("glyphs", "train", image_size=28)
    classes = list(range(50))
    images = torch.cat([train.class_images(k) for k in classes]).float() / 255
    labels = torch.arange(50).repeat_interleave(20)
    torch.manual_seed(0)
    encoder, head = Encoder(1, WIDTH), torch.nn.Linear(WIDTH, 50)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        rows = torch.randint(len(labels), (64,), generator=generator)
        loss = F.cross_entropy(head(encoder(images[rows])), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("pretrained") / "encoder.pt"
    torch.save(encoder.state_dict(), path)
    return path


def test_a_pretrained_encoder_serves_eval_and_predict_without_meta_training(pretrained, tmp_path, capsys):
    accuracy = {}
    for name, weights in (("pretrained", [f"algorithm.backbone_weights={pretrained}"]), ("random", [])):
        out = tmp_path / f"{name}.pt"
        assert main(["export", *as_args(glyph_sets(*weights)), "--out", str(out)]) == 0
        result = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(out), "--no-progress", "--json", str(result)]) == 0
        accuracy[name] = json.loads(result.read_text())["mean"]
    # the pretrained embedding is what makes ProtoNet work here: far above a random one, and chance (0.2)
    # (measured: 0.635 ± 0.043 pretrained, 0.381 ± 0.037 random)
    assert accuracy["pretrained"] > 0.5 and accuracy["pretrained"] > accuracy["random"] + 0.15, accuracy
    state = load_checkpoint(tmp_path / "pretrained.pt")
    assert state["hparams"]["backbone"] == "user_networks:encoder"
    assert state["hparams"]["backbone_args"] == {"width": WIDTH}
    saved = torch.load(pretrained, weights_only=True)
    assert all(torch.equal(saved[k], state["model"]["encoder." + k]) for k in saved)

    test = load_dataset("glyphs", "test", image_size=28).subset([0, 1, 2])
    support = write_image_folder(
        tmp_path / "support", ClassImages(test.images, test.offsets, ["a", "b", "c"], "three")
    )
    for k, name in enumerate("abc"):  # keep one image per class as a query
        (support / name / "000.png").rename(tmp_path / f"query_{k}.png")
    queries = [str(tmp_path / f"query_{k}.png") for k in range(3)]
    capsys.readouterr()
    argv = ["predict", "--checkpoint", str(tmp_path / "pretrained.pt"), "--support", str(support)]
    assert main([*argv, "--query", *queries]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 3 and all(row.split(",")[0].endswith(f"query_{k}.png") for k, row in enumerate(rows))


def test_freeze_backbone_keeps_the_pretrained_weights_and_statistics(pretrained, tmp_path):
    sets = glyph_sets(
        "algorithm.name=siamese",
        f"algorithm.backbone_weights={pretrained}",
        "algorithm.freeze_backbone=true",
        "train.ways=5",
        "train.steps=3",
        "train.val_every=3",
        "train.val_episodes=4",
        f"run_dir={tmp_path / 'run'}",
    )
    trainer = Trainer(load_config(overrides=sets), progress=False)
    trainer.start()
    trainer.fit()
    saved = torch.load(pretrained, weights_only=True)
    weights = trainer.learner.encoder.state_dict()
    assert all(torch.equal(saved[k], weights[k]) for k in saved)  # running statistics included


def test_freeze_backbone_without_weights_and_weights_that_do_not_fit_are_one_line_errors(
    pretrained, tmp_path, capsys
):
    cases = [
        (
            ["algorithm.freeze_backbone=true"],
            "freeze_backbone keeps pretrained weights fixed: set algorithm.backbone_weights",
        ),
        (
            [f"algorithm.backbone_weights={pretrained}", "algorithm.backbone_args={width: 8}"],
            r"do not fit the Encoder backbone \(shapes: body.block.0.bias \[16\] vs \[8\]",
        ),
        (
            [f"algorithm.backbone_weights={pretrained}", "algorithm.backbone=resnet12"],
            "do not fit the ResNet12 backbone \\(missing keys: blocks.0.bn1.bias",
        ),
        (
            [f"algorithm.backbone_weights={tmp_path / 'none.pt'}"],
            "backbone_weights '.*none.pt' does not exist",
        ),
    ]
    frozen_protonet = [f"algorithm.backbone_weights={pretrained}", "algorithm.freeze_backbone=true"]
    cases.append((frozen_protonet, "protonet has no parameter left to meta-train.*'metaloop export'"))
    for extra, message in cases:
        sets = glyph_sets(*extra, f"run_dir={tmp_path / 'run'}")
        if "algorithm.backbone=resnet12" in extra:
            sets = [s for s in sets if not s.startswith("algorithm.backbone_args")]
        assert main(["train", "--no-progress", *as_args(sets)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # the error alone, no "run folder:" line
        assert re.search(message, err), err
        assert not (tmp_path / "run").exists()
