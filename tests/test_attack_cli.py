"""``metaloop eval --attack``: clean and adversarial accuracy of a trained learner over the same
episodes, in the terminal and in JSON, and clear errors for settings that cannot work."""

import json
import re

import pytest
from test_distributed import one_thread, torchrun

from metaloop.cli import main

ACCURACY = re.compile(r"3-way 1-shot accuracy: ([\d.]+) ± ([\d.]+)% \(95% CI, 10 episodes\)")


@pytest.fixture(scope="module")
def trained_run(tiny_cli_args, image_folder, tmp_path_factory):
    """A tiny ProtoNet run folder (seconds to train)."""
    run = tmp_path_factory.mktemp("attack") / "run"
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, run)]) == 0
    return run


@pytest.mark.parametrize("attack", [["--attack", "fgsm"], ["--attack", "pgd", "--attack-steps", "3"]])
def test_eval_reports_clean_and_adversarial_accuracy(trained_run, attack, tmp_path, capsys):
    capsys.readouterr()
    json_path = tmp_path / "robust.json"
    argv = ["eval", "--checkpoint", str(trained_run), "--no-progress", *attack, "--epsilon", "0.3"]
    assert main([*argv, "--json", str(json_path)]) == 0
    clean_line, adversarial_line = capsys.readouterr().out.strip().splitlines()
    assert clean_line.startswith("protonet on folder/test, clean queries: ")
    assert adversarial_line.startswith(f"protonet on folder/test, {attack[1]} (ε = 0.3")
    clean, adversarial = (float(ACCURACY.search(line).group(1)) for line in (clean_line, adversarial_line))
    assert adversarial <= clean and clean > 100 / 3  # the model learned something, and the attack hurts it
    record = json.loads(json_path.read_text())
    assert record["attack"] == {"name": attack[1], "epsilon": 0.3, "steps": 3 if attack[1] == "pgd" else 1}
    assert record["clean"]["episodes"] == record["adversarial"]["episodes"] == 10
    assert record["clean"]["mean"] == pytest.approx(clean / 100, abs=5e-5)
    assert record["adversarial"]["mean"] == pytest.approx(adversarial / 100, abs=5e-5)
    # the clean number is the plain evaluation's: the same episodes, the same adapted predictor
    assert main(["eval", "--checkpoint", str(trained_run), "--no-progress"]) == 0
    assert clean_line.split(": ", 1)[1] == capsys.readouterr().out.strip().split(": ", 1)[1]


def test_sharded_attack_evaluation_gives_the_one_process_result(trained_run, tmp_path):
    """torchrun, 2 ranks: 11 episodes split 5 / 6, PGD random starts seeded per episode, give the
    1-process numbers (both results), printed once."""
    args = ["eval", "--checkpoint", str(trained_run), "--episodes", "11", "--no-progress"]
    # at ε = 0.05 the random starts matter: another PGD seed changes the adversarial accuracy
    args += ["--attack", "pgd", "--epsilon", "0.05", "--attack-steps", "2", "--json"]
    two = torchrun([*args, str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stderr
    with one_thread():
        assert main([*args, str(tmp_path / "one.json")]) == 0
    one_result, two_result = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two_result == one_result and one_result["adversarial"]["episodes"] == 11
    assert two.stdout.count("pgd (ε = 0.05, 2 steps)") == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attack", "fgsm", "--epsilon", "0"], "epsilon must be in (0, 1]"),
        (["--attack", "pgd", "--epsilon", "1.5"], "epsilon must be in (0, 1]"),
        (["--attack", "cw", "--epsilon", "0.1"], "unknown attack 'cw'; use one of fgsm, pgd"),
        (["--attack", "fgsm"], "--attack fgsm needs --epsilon"),
        (["--epsilon", "0.1"], "add --attack fgsm or --attack pgd"),
        (["--attack", "fgsm", "--epsilon", "0.1", "--attack-steps", "5"], "--attack-steps sets the steps of"),
    ],
)
def test_bad_attack_options_are_one_clear_line(trained_run, extra, message, capsys):
    assert main(["eval", "--checkpoint", str(trained_run), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
