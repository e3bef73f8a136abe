"""Ensembles of a run's best-validated models (``train.keep_top``, ``metaloop eval --top K``): the
prediction is the mean of the members' logits, checked against a task-by-task computation."""

import json

import pytest
import torch

from metaloop.algorithms import ProtoNet
from metaloop.checkpoint import CheckpointError, load_checkpoint
from metaloop.cli import main
from metaloop.config import config_from_dict
from metaloop.ensemble import Ensemble, top_checkpoints
from metaloop.learners import learner_from_checkpoint
from metaloop.tasks import EpisodeSampler
from metaloop.tasks.source import TaskSource


@pytest.fixture(scope="module")
def run_with_top_models(tiny_cli_args, image_folder, tmp_path_factory):
    """A tiny ProtoNet run validated at steps 2 and 4, both models kept (``train.keep_top=2``)."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    argv = ["train", "--no-progress", *tiny_cli_args(image_folder, run_dir, "train.keep_top=2")]
    assert main(argv) == 0
    return run_dir


def test_an_ensemble_predicts_the_mean_of_its_members_logits(class_images):
    torch.manual_seed(0)
    members = [ProtoNet(in_channels=1, hidden=8).eval(), ProtoNet(in_channels=1, hidden=8).eval()]
    batch = EpisodeSampler(class_images, ways=3, shots=1, queries=2, seed=0).sample(4)
    outputs = [member.predict(batch) for member in members]
    assert not torch.equal(outputs[0], outputs[1])
    ensemble = Ensemble(members)
    assert torch.allclose(ensemble.predict(batch), (outputs[0] + outputs[1]) / 2, atol=1e-6)
    assert torch.equal(Ensemble(members[:1]).predict(batch), outputs[0])
    with pytest.raises(ValueError, match="at least one learner"):
        Ensemble([])


def ensemble_accuracies(states, config):
    """float64 ``[episodes]``: each test episode's accuracy of the mean logits of ``states``' models,
    one task and one model at a time through ``adapt``, on the episodes ``metaloop eval`` draws."""
    learners = [learner_from_checkpoint(state).eval() for state in states]
    ev = config.eval
    sampler = TaskSource(config).sampler(config.data.test_split, ev.ways, ev.shots, ev.queries, seed=ev.seed)
    values = []
    for start in range(0, ev.episodes, ev.batch_size):
        batch = sampler.sample(min(ev.batch_size, ev.episodes - start))
        for t in range(batch.num_tasks):
            support_x, support_y, query_x = batch.support_x[t], batch.support_y[t], batch.query_x[t]
            logits = sum(learner.adapt(support_x, support_y)(query_x) for learner in learners) / len(learners)
            values.append((logits.argmax(-1) == batch.query_y[t]).double().mean())
    return torch.stack(values)


def test_eval_top_k_tests_the_ensemble_of_the_best_validated_models(run_with_top_models, tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["eval", "--checkpoint", str(run_with_top_models), "--top", "2", "--json", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "the mean logits of its 2 best-validated models (steps " in printed
    states = top_checkpoints(run_with_top_models, 2)
    assert sorted(state["step"] for state in states) == [2, 4]
    expected = ensemble_accuracies(states, config_from_dict(states[0]["config"]))
    result = json.loads(out.read_text())
    assert result["episodes"] == 10
    assert result["mean"] == pytest.approx(expected.mean().item(), abs=1e-6)  # float32 sums; a query is 1/90


def test_eval_top_1_names_the_one_model(run_with_top_models, capsys):
    assert main(["eval", "--checkpoint", str(run_with_top_models), "--top", "1", "--no-progress"]) == 0
    best_step = load_checkpoint(run_with_top_models)["step"]
    assert f", its best-validated model (step {best_step}): 3-way 1-shot accuracy" in capsys.readouterr().out


def test_top_checkpoints_are_ordered_best_first(run_with_top_models):
    states = top_checkpoints(run_with_top_models, 2)
    scores = [(state["val"]["mean"], -state["step"]) for state in states]
    assert scores == sorted(scores, reverse=True)
    assert top_checkpoints(run_with_top_models, 1)[0]["step"] == load_checkpoint(run_with_top_models)["step"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top", "3"], "holds 2 top-*.pt models, fewer than the 3 asked for"),
        (["--top", "0"], "--top K tests an ensemble of a run's K best-validated models; got K = 0"),
        (["--top", "2", "--attack", "fgsm", "--epsilon", "0.1"], "--attack attacks one model"),
    ],
)
def test_eval_top_refuses_what_it_cannot_do(run_with_top_models, capsys, extra, message):
    assert main(["eval", "--checkpoint", str(run_with_top_models), "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err


def test_eval_top_needs_a_run_folder(run_with_top_models, capsys):
    argv = ["eval", "--checkpoint", str(run_with_top_models / "best.pt"), "--top", "2", "--no-progress"]
    assert main(argv) == 2
    assert "is not a run folder" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is not a run folder"):
        top_checkpoints(run_with_top_models / "best.pt", 1)
