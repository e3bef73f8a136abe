import json
import math
import os
import signal

import pytest
import torch
from conftest import episode_accuracies

from metaloop.checkpoint import CheckpointError, load_checkpoint
from metaloop.config import ConfigError, load_config
from metaloop.interrupt import StopRequest, TrainingInterrupted
from metaloop.learners import learner_from_checkpoint
from metaloop.tasks.source import TaskSource
from metaloop.train import Trainer, run


def tiny_config(root, run_dir, *extra):
    return load_config(
        overrides=[
            "data.name=folder",
            f"data.root={root}",
            "algorithm.hidden=8",
            "train.ways=3",
            "train.shots=1",
            "train.queries=2",
            "train.steps=12",
            "train.log_every=3",
            "train.val_every=6",
            "train.val_episodes=10",
            "train.checkpoint_every=6",
            "eval.ways=3",
            "eval.queries=3",
            "eval.episodes=20",
            f"run_dir={run_dir}",
            *extra,
        ]
    )


def metric_lines(run_dir):
    """The metrics log without wall-clock times, which differ between runs."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def test_run_writes_its_files_and_a_sane_result(image_folder, tmp_path):
    result = run(tiny_config(image_folder, tmp_path / "run"), progress=False)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "result.json"} <= files
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["mean"] == pytest.approx(result.mean) and saved["episodes"] == 20
    # the result is the best model's, on the test episodes: recomputed without metaloop.evaluate
    # (to 1e-6: evaluate averages float32 accuracies)
    best = learner_from_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt"))
    config = tiny_config(image_folder, tmp_path / "run")
    values = episode_accuracies(best, TaskSource(config).dataset(config.data.test_split), config.eval)
    assert result.mean == pytest.approx(values.mean().item(), abs=1e-6)
    assert result.ci95 == pytest.approx(1.96 * values.std().item() / math.sqrt(20), abs=1e-6)
    steps = [r["step"] for r in metric_lines(tmp_path / "run")]
    assert steps == [3, 6, 6, 9, 12, 12]  # train lines every 3 steps, validation at 6 and 12
    records = metric_lines(tmp_path / "run")
    for before, val in zip(records, records[1:], strict=False):
        if "val_accuracy" in val:  # the meta-overfitting gap: last train accuracy minus val accuracy
            assert val["gap"] == pytest.approx(before["train_accuracy"] - val["val_accuracy"])


def test_same_seed_same_numbers(image_folder, tmp_path):
    first = run(tiny_config(image_folder, tmp_path / "a"), progress=False)
    second = run(tiny_config(image_folder, tmp_path / "b"), progress=False)
    assert first.mean == second.mean
    assert metric_lines(tmp_path / "a") == metric_lines(tmp_path / "b")


def test_resumed_run_ends_like_an_uninterrupted_one(image_folder, tmp_path):
    run(tiny_config(image_folder, tmp_path / "whole"), progress=False)
    run(tiny_config(image_folder, tmp_path / "split", "train.steps=6"), progress=False)
    # a crash after the checkpoint leaves lines the resumed run will write again, and a cut line
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "train_loss": 123.0}) + "\n" + '{"step": 1')
    run(tiny_config(image_folder, tmp_path / "split"), resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "last.pt")
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    assert metric_lines(tmp_path / "whole") == metric_lines(tmp_path / "split")


def test_settings_changed_on_resume_are_named_and_written_to_config_yaml(image_folder, tmp_path, caplog):
    run(tiny_config(image_folder, tmp_path / "run", "train.steps=6"), progress=False)
    with caplog.at_level("INFO", logger="metaloop.train"):
        run(tiny_config(image_folder, tmp_path / "run", "train.max_minutes=60"), resume=True, progress=False)
    assert "settings changed on resume" in caplog.text
    assert "train.max_minutes: None -> 60.0" in caplog.text and "train.steps: 6 -> 12" in caplog.text
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.train.steps == 12 and saved.train.max_minutes == 60.0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["train"]["max_minutes"] == 60.0


def test_a_signal_stops_training_after_its_step_with_last_pt_saved_and_resume_is_exact(
    image_folder, tmp_path, monkeypatch
):
    """SIGINT during step 4 (checkpoints every 6): the step finishes, last.pt holds step 4, nothing
    is tested, and the resumed run ends exactly like an uninterrupted one."""
    run(tiny_config(image_folder, tmp_path / "whole"), progress=False)
    original = Trainer.train_step
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs in the background

    def signalling(self):
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", signalling)
    with pytest.raises(TrainingInterrupted, match=r"SIGINT after step 4 of 12.*--resume") as stopped:
        run(tiny_config(image_folder, tmp_path / "split"), progress=False)
    assert stopped.value.exit_code == 130 and stopped.value.step == 4
    assert load_checkpoint(tmp_path / "split" / "last.pt")["run_state"]["step"] == 4
    assert not (tmp_path / "split" / "result.json").exists()
    assert metric_lines(tmp_path / "split")[-1] == {"step": 4, "event": "interrupted", "signal": "SIGINT"}
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is put back
    monkeypatch.setattr(Trainer, "train_step", original)
    run(tiny_config(image_folder, tmp_path / "split"), resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "last.pt")
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    events = [r for r in metric_lines(tmp_path / "split") if "event" in r]
    assert events == [{"step": 4, "event": "interrupted", "signal": "SIGINT"}]
    steps = [r for r in metric_lines(tmp_path / "split") if "event" not in r]
    assert steps == metric_lines(tmp_path / "whole")


def test_a_second_signal_stops_at_once():
    request = StopRequest()
    request.handle(signal.SIGTERM, None)
    assert request.signal_name == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
        request.handle(signal.SIGINT, None)


def test_a_run_resumed_without_its_best_pt_selects_its_model_again(image_folder, tmp_path, caplog):
    """A run folder carried with only last.pt: resuming says the earlier best model is lost and
    the next validation writes best.pt, so the run still ends with a tested model."""
    run(tiny_config(image_folder, tmp_path / "run", "train.steps=6"), progress=False)
    (tmp_path / "run" / "best.pt").unlink()
    with caplog.at_level("WARNING", logger="metaloop.train"):
        run(tiny_config(image_folder, tmp_path / "run"), resume=True, progress=False)
    assert "best.pt is missing" in caplog.text and "model selection starts again" in caplog.text
    assert load_checkpoint(tmp_path / "run" / "best.pt")["step"] == 12
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    missing = [r for r in records if r.get("event") == "best_missing"]
    assert len(missing) == 1 and missing[0]["step"] == 6 and missing[0]["lost_best_val"] > 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["best_step"] == 12


def test_checkpoint_round_trip(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path / "run")
    run(config, progress=False)
    state = load_checkpoint(tmp_path / "run")  # a run folder resolves to best.pt
    assert state["algorithm"] == "protonet" and state["config"]["run_dir"] == str(tmp_path / "run")
    learner = learner_from_checkpoint(state)
    for name, tensor in learner.state_dict().items():
        assert torch.equal(tensor, state["model"][name])


def test_a_started_run_is_never_overwritten(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path / "run")
    run(config, progress=False)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        run(config, progress=False)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    truncated = tmp_path / "cut.pt"
    torch.save({"format": "metaloop-checkpoint-1", "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a metaloop checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="holds no best.pt or last.pt"):
        load_checkpoint(tmp_path)


def test_architecture_mismatch_is_a_clear_error(image_folder, tmp_path):
    run(tiny_config(image_folder, tmp_path / "run"), progress=False)
    state = load_checkpoint(tmp_path / "run")
    state["hparams"] = {**state["hparams"], "hidden": 16}
    with pytest.raises(CheckpointError, match="do not fit a protonet learner"):
        learner_from_checkpoint(state)


def test_hyper_parameters_a_learner_does_not_take_are_rejected(image_folder, tmp_path):
    from metaloop.config import ConfigError
    from metaloop.train import Trainer

    with pytest.raises(ConfigError, match=r"'protonet' takes no algorithm.inner_lr"):
        Trainer(tiny_config(image_folder, tmp_path / "run", "algorithm.inner_lr=0.4"), progress=False)
    assert not (tmp_path / "run").exists()


def test_keep_last_k_checkpoints(image_folder, tmp_path):
    run(
        tiny_config(image_folder, tmp_path / "run", "train.checkpoint_every=3", "train.keep_checkpoints=2"),
        False,
    )
    kept = sorted(p.name for p in (tmp_path / "run").glob("step-*.pt"))
    assert kept == ["step-0000009.pt", "step-0000012.pt"]
    assert load_checkpoint(tmp_path / "run" / "step-0000009.pt")["run_state"]["step"] == 9
    assert (tmp_path / "run" / "step-0000012.pt").read_bytes() == (tmp_path / "run" / "last.pt").read_bytes()


def poison_step(trainer, bad_step):
    """Make the learner's loss NaN at outer step ``bad_step`` (1-based)."""
    original, calls = trainer.learner.meta_loss, []

    def meta_loss(batch):
        calls.append(1)
        loss, metrics = original(batch)
        if len(calls) == bad_step:
            loss = loss * float("nan")
            metrics = {**metrics, "loss": float("nan")}
        return loss, metrics

    trainer.learner.meta_loss = meta_loss


def nonfinite_trainer(image_folder, run_dir, action):
    from metaloop.train import Trainer

    trainer = Trainer(tiny_config(image_folder, run_dir, f"train.on_nonfinite={action}"), progress=False)
    poison_step(trainer, bad_step=8)
    trainer.start()
    return trainer


def test_nonfinite_loss_stops_with_the_last_good_checkpoint_intact(image_folder, tmp_path):
    from metaloop.train import TrainingDiverged

    trainer = nonfinite_trainer(image_folder, tmp_path / "run", "stop")
    with pytest.raises(
        TrainingDiverged, match="step 8: non-finite loss; training stopped .* last good checkpoint"
    ):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["run_state"]["step"] == 6
    for tensor in trainer.learner.state_dict().values():
        assert torch.isfinite(tensor.float()).all()  # the bad update was never applied
    assert {"step": 8, "event": "nonfinite", "what": "loss", "action": "stop"} in metric_lines(
        tmp_path / "run"
    )


def test_nonfinite_batches_can_be_skipped_or_lower_the_learning_rate(image_folder, tmp_path):
    skip = nonfinite_trainer(image_folder, tmp_path / "skip", "skip")
    skip.fit()
    assert skip.state.step == 12
    assert all(torch.isfinite(t.float()).all() for t in skip.learner.state_dict().values())
    lines = metric_lines(tmp_path / "skip")
    assert {"step": 8, "event": "nonfinite", "what": "loss", "action": "skip"} in lines
    assert all(
        line.get("train_loss", 0.0) == line.get("train_loss", 0.0) for line in lines
    )  # no NaN averages

    lower = nonfinite_trainer(image_folder, tmp_path / "lower", "lower_lr")
    lower.fit()
    event = next(line for line in metric_lines(tmp_path / "lower") if line.get("event") == "nonfinite")
    assert event["lr"] == pytest.approx(0.0005)
    assert lower.optimizer.param_groups[0]["lr"] == pytest.approx(0.0005)


def test_nonfinite_gradient_is_named(image_folder, tmp_path):
    from metaloop.train import Trainer

    trainer = Trainer(tiny_config(image_folder, tmp_path / "run"), progress=False)
    trainer.start()
    loss, metrics = trainer.learner.meta_loss(trainer.sampler.sample(1))
    loss.backward()
    name, parameter = next((n, p) for n, p in trainer.learner.named_parameters() if p.grad is not None)
    parameter.grad.view(-1)[0] = float("inf")
    assert trainer.nonfinite(metrics) == f"gradient of {name}"


def test_unknown_nonfinite_action_is_rejected(image_folder, tmp_path):
    from metaloop.config import ConfigError
    from metaloop.train import Trainer

    with pytest.raises(ConfigError, match="train.on_nonfinite must be one of stop, skip, lower_lr"):
        Trainer(tiny_config(image_folder, tmp_path / "run", "train.on_nonfinite=ignore"), progress=False)


def test_sgd_with_a_linear_schedule_is_reptiles_annealed_outer_step(image_folder, tmp_path):
    """train.optimizer=sgd, train.lr_schedule=linear: ε = lr (1 − step / steps); the logged rate
    follows it, and a run stopped after one step and resumed ends with the same weights."""
    extra = ("train.optimizer=sgd", "train.lr=1.0", "train.lr_schedule=linear")
    trainer = Trainer(tiny_config(image_folder, tmp_path / "run", *extra), progress=False)
    assert type(trainer.optimizer) is torch.optim.SGD
    rates = []
    for _ in range(12):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert rates == pytest.approx([1 - k / 12 for k in range(12)])
    run(tiny_config(image_folder, tmp_path / "whole", *extra), progress=False)
    logged = [r["lr"] for r in metric_lines(tmp_path / "whole") if "lr" in r]
    assert logged == pytest.approx([1 - 3 / 12, 1 - 6 / 12, 1 - 9 / 12, 0.0])
    run(tiny_config(image_folder, tmp_path / "split", *extra, "train.max_minutes=0.00001"), progress=False)
    run(tiny_config(image_folder, tmp_path / "split", *extra), resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    split = load_checkpoint(tmp_path / "split" / "last.pt")["model"]
    for name, tensor in whole.items():
        assert torch.equal(tensor, split[name]), name


def test_mamlpp_with_a_cosine_schedule_anneals_and_resumes_exactly(image_folder, tmp_path):
    """train.lr_schedule=cosine: β_s = min_lr + (lr − min_lr)(1 + cos(π s / steps)) / 2. MAML++'s
    multi-step loss and derivative order follow the trainer's outer step, so a run stopped after one
    step and resumed ends with the same weights as one run straight through."""
    extra = (
        "algorithm.name=mamlpp",
        "algorithm.inner_steps=2",
        "algorithm.eval_inner_steps=2",
        "algorithm.msl_steps=6",
        "algorithm.second_order_after=3",
        "train.lr_schedule=cosine",
        "train.lr=0.01",
        "train.min_lr=0.001",
    )
    run(tiny_config(image_folder, tmp_path / "whole", *extra), progress=False)
    logged = [r["lr"] for r in metric_lines(tmp_path / "whole") if "lr" in r]
    expected = [0.001 + 0.009 * (1 + math.cos(math.pi * s / 12)) / 2 for s in (3, 6, 9, 12)]
    assert logged == pytest.approx(expected)
    run(tiny_config(image_folder, tmp_path / "split", *extra, "train.max_minutes=0.00001"), progress=False)
    run(tiny_config(image_folder, tmp_path / "split", *extra), resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    split = load_checkpoint(tmp_path / "split" / "last.pt")["model"]
    for name, tensor in whole.items():
        assert torch.equal(tensor, split[name]), name


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.optimizer=rmsprop", "train.optimizer must be one of adam, sgd, got 'rmsprop'"),
        ("train.lr_schedule=exp", "train.lr_schedule must be one of step, linear, cosine, got 'exp'"),
    ],
)
def test_unknown_optimizer_or_schedule_is_rejected(image_folder, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(tiny_config(image_folder, tmp_path / "run", setting), progress=False)


def test_time_budget_stops_early_validates_and_resumes_within_it(image_folder, tmp_path):
    """train.max_minutes: a budget too small for one step stops after it, validated and saved."""
    config = tiny_config(image_folder, tmp_path / "run", "train.max_minutes=0.00001")
    run(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 1]  # train line, validation, budget event
    assert "val_accuracy" in records[1] and records[2]["event"] == "time_budget"
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 1 and result["wall_seconds"] >= result["train_seconds"] > 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["run_state"]["step"] == 1


@pytest.mark.parametrize("name", ["protonet", "baseline", "siamese"])
def test_training_never_sees_a_meta_test_image(image_folder, tmp_path, tiny_cli_args, monkeypatch, name):
    """Every image a training step receives is one of the meta-train split's, with its class
    (the transfer baseline's pretraining and the Siamese pairs included)."""
    args = tiny_cli_args(image_folder, tmp_path / "run", f"algorithm.name={name}", "train.steps=6")
    config = load_config(overrides=args[1::2])
    trainer = Trainer(config, progress=False)
    seen = []
    original = trainer.learner.meta_loss

    def recording(batch):
        seen.append(batch)
        return original(batch)

    monkeypatch.setattr(trainer.learner, "meta_loss", recording)
    trainer.start()
    trainer.fit()
    assert len(seen) == 6
    tasks = TaskSource(config)
    train, test = tasks.dataset("train"), tasks.dataset("test")
    train_flat = train.images.float().div(255).flatten(1)
    test_flat = test.images.float().div(255).flatten(1)
    row_class = torch.repeat_interleave(torch.arange(train.num_classes), train.class_sizes)
    for batch in seen:
        images = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1).flatten(1)  # [B, pixels]
        labels = batch.classes.gather(1, torch.cat([batch.support_y, batch.query_y], 1)).flatten()
        matches = (images[:, None] == train_flat[None]).all(-1)  # [B, train rows]
        assert matches.any(1).all()  # every image is a meta-train image ...
        assert (row_class[matches.float().argmax(1)] == labels).all()  # ... labelled with its class
        assert not (images[:, None] == test_flat[None]).all(-1).any()  # and none is a meta-test image


@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_variable_way_shot_episodes_from_a_mixture_train(image_folder, tmp_path, tiny_cli_args, name):
    """2..4-way 1..2-shot tasks, each from the image folder or the generated glyphs."""
    extra = [f"algorithm.name={name}", "data.name=folder+glyphs", f"data.data_dir={tmp_path / 'data'}"]
    extra += ["train.ways=2", "train.max_ways=4", "train.max_shots=2", "train.meta_batch_size=4"]
    config = load_config(overrides=tiny_cli_args(image_folder, tmp_path / "run", *extra)[1::2])
    trainer = Trainer(config, progress=False)
    shapes = set()
    original = trainer.learner.meta_loss

    def recording(batch):
        shapes.add((batch.ways, batch.support_y.shape[1] // batch.ways))
        return original(batch)

    trainer.learner.meta_loss = recording
    trainer.start()
    trainer.fit()
    assert len(shapes) > 2 and all(2 <= w <= 4 and 1 <= s <= 2 for w, s in shapes)
    losses = [r["train_loss"] for r in metric_lines(tmp_path / "run") if "train_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert trainer.learner.hparams.get("ways", 4) == 4  # MAML's head has max_ways outputs


def test_train_classes_keeps_a_seeded_pick_of_meta_train_classes_only(image_folder, tmp_path, tiny_cli_args):
    args = tiny_cli_args(image_folder, tmp_path / "run", "data.train_classes=5")[1::2]
    tasks = TaskSource(load_config(overrides=args))
    full = TaskSource(load_config(overrides=args[:-1]))
    picked = tasks.dataset("train")
    assert picked.num_classes == 5 and set(picked.class_names) <= set(full.dataset("train").class_names)
    assert tasks.dataset("test").class_names == full.dataset("test").class_names  # other splits untouched
    assert TaskSource(load_config(overrides=args)).dataset("train").class_names == picked.class_names
    with pytest.raises(ConfigError, match="data.train_classes must be between 2 and the 21 classes"):
        TaskSource(load_config(overrides=[*args, "data.train_classes=22"])).dataset("train")


def validations(run_dir):
    """``(step, val_accuracy)`` of every meta-validation in a run's metrics log."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]


def top_steps(run_dir):
    return sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("top-*.pt"))


def test_keep_top_keeps_the_k_best_validated_models(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_config(image_folder, run_dir, "train.val_every=2", "train.keep_top=3"), progress=False)
    vals = validations(run_dir)
    assert len(vals) == 6
    best_three = sorted(vals, key=lambda v: (-v[1], v[0]))[:3]  # ties: the earlier step stays
    assert top_steps(run_dir) == sorted(step for step, _ in best_three)
    for step, accuracy in best_three:
        state = load_checkpoint(run_dir / f"top-{step:07d}.pt")
        assert state["step"] == step and state["val"]["mean"] == accuracy
    best = load_checkpoint(run_dir / "best.pt")
    first = load_checkpoint(run_dir / f"top-{best_three[0][0]:07d}.pt")
    assert best["step"] == first["step"]
    for name, tensor in best["model"].items():
        assert torch.equal(tensor, first["model"][name]), name
    saved = load_checkpoint(run_dir / "last.pt")["run_state"]["top"]
    assert saved == [[accuracy, step] for step, accuracy in best_three]


def test_keep_top_resumes_exactly_and_forgets_the_models_it_lost(image_folder, tmp_path, caplog):
    settings = ("train.val_every=2", "train.keep_top=3")
    run(tiny_config(image_folder, tmp_path / "whole", *settings), progress=False)
    run(tiny_config(image_folder, tmp_path / "split", *settings, "train.steps=6"), progress=False)
    run(tiny_config(image_folder, tmp_path / "split", *settings), resume=True, progress=False)
    assert top_steps(tmp_path / "split") == top_steps(tmp_path / "whole")

    lost = tmp_path / "lost"
    run(tiny_config(image_folder, lost, *settings, "train.steps=6"), progress=False)
    gone = top_steps(lost)[0]
    (lost / f"top-{gone:07d}.pt").unlink()
    with caplog.at_level("WARNING", logger="metaloop.train"):
        run(tiny_config(image_folder, lost, *settings), resume=True, progress=False)
    assert f"lacks the top-K models validated at steps {gone}" in caplog.text
    kept = top_steps(lost)
    assert len(kept) == 3 and gone not in kept
    # the 3 validations up to step 6 were all kept, so only the lost one is out of the running
    others = [v for v in validations(lost) if v[0] != gone]
    expected = [step for step, _ in sorted(others, key=lambda v: (-v[1], v[0]))[:3]]
    assert [step for _, step in load_checkpoint(lost / "last.pt")["run_state"]["top"]] == expected


def test_keep_top_must_not_be_negative(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="train.keep_top must be at least 0, got -1"):
        tiny_config(image_folder, tmp_path / "run", "train.keep_top=-1")
