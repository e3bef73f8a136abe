"""The model zoo: ``zoo:<name>`` wherever a run is accepted, checked against its sha256 sums, and every
shipped model re-measured on 100 of its test episodes."""

import json
import shutil

import pytest

from metaloop import zoo
from metaloop.cli import main


@pytest.fixture
def tiny_zoo(image_folder, tmp_path, tiny_cli_args, monkeypatch):
    """A zoo folder (``METALOOP_ZOO``) holding one tiny trained ProtoNet, ``folder/tiny-protonet``."""
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, tmp_path / "run")]) == 0
    model = tmp_path / "zoo" / "folder" / "tiny-protonet"
    model.mkdir(parents=True)
    for name in ("best.pt", "config.yaml", "result.json"):
        shutil.copy(tmp_path / "run" / name, model / name)
    zoo.write_checksums(str(model))  # a str as in docs/zoo.md
    monkeypatch.setenv("METALOOP_ZOO", str(tmp_path / "zoo"))
    return model


def flip_a_byte(path):
    """Change one byte of ``path`` (byte 200), as damage or an edit would."""
    with open(path, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))


def test_a_zoo_model_is_evaluated_loaded_and_compared_by_name(tiny_zoo, tmp_path, capsys):
    assert zoo.names() == ["tiny-protonet"]
    capsys.readouterr()
    argv = ["eval", "--checkpoint", "zoo:tiny-protonet", "--no-progress", "--json", str(tmp_path / "e.json")]
    assert main(argv) == 0
    measured = json.loads((tmp_path / "e.json").read_text())
    shipped = json.loads((tiny_zoo / "result.json").read_text())
    assert measured["mean"] == shipped["mean"] and measured["episodes"] == shipped["episodes"]
    assert zoo.load("tiny-protonet").name == "protonet"
    out = tmp_path / "cmp"
    argv = ["compare", "tiny=zoo:tiny-protonet", "--out", str(out), "--ways", "3", "--shots", "1"]
    assert main([*argv, "--queries", "3", "--episodes", "10", "--no-progress"]) == 0
    report = (out / "comparison.md").read_text()
    assert "tiny" in report and str(tiny_zoo) not in report  # the model named, not its install folder
    (learner,) = json.loads((out / "comparison.json").read_text())["learners"]
    assert learner["run_dir"] == "zoo:tiny-protonet" and learner["validation"]["validations"] is None
    assert "no learning curve for tiny-protonet (zoo:tiny-protonet): no metrics.jsonl" in report
    assert not (out / "learning_curves.png").exists()


def test_metaloop_zoo_lists_each_model_with_its_shipped_result(tiny_zoo, capsys):
    capsys.readouterr()
    assert main(["zoo", "--paths"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    result = json.loads((tiny_zoo / "result.json").read_text())
    assert line.split()[:4] == ["tiny-protonet", "protonet", "folder", f"{result['ways']}-way"]
    assert f"{100 * result['mean']:.2f} ± {100 * result['ci95']:.2f}%" in line
    assert f"{result['steps']:,} steps" in line and line.endswith(str(tiny_zoo))


def test_the_listing_aligns_its_columns_and_names_a_test_split_other_than_test(tiny_zoo, capsys):
    """A model tested on another split (``reptile-omniglot-5w5s-nichol-split`` is tested on
    ``nichol-test``) says so in the dataset column, and a longer name widens the name column."""
    other = tiny_zoo.parent / "tiny-protonet-on-another-split"
    shutil.copytree(tiny_zoo, other)
    config = (other / "config.yaml").read_text()
    assert "test_split: test\n" in config
    (other / "config.yaml").write_text(config.replace("test_split: test\n", "test_split: val\n"))
    capsys.readouterr()
    assert main(["zoo"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.split()[:3] == ["tiny-protonet", "protonet", "folder"]
    assert second.split()[:3] == ["tiny-protonet-on-another-split", "protonet", "folder/val"]
    assert first.index(" protonet ") == second.index(" protonet ")
    assert first.index("-way") == second.index("-way")


def test_a_damaged_or_unknown_model_is_refused_in_one_line(tiny_zoo, capsys):
    flip_a_byte(tiny_zoo / "best.pt")  # the weights are no longer the shipped ones
    assert main(["eval", "--checkpoint", "zoo:tiny-protonet", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "zoo model tiny-protonet: best.pt has sha256" in err and "damaged or edited" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(zoo.ZooError, match=r"no model 'nope' in the zoo .*the zoo has: tiny-protonet"):
        zoo.load("nope")


def test_a_zoo_model_shipped_with_its_top_models_is_tested_as_their_ensemble(
    image_folder, tmp_path, tiny_cli_args, monkeypatch, capsys
):
    """``eval --checkpoint zoo:NAME --top K`` (MAML++'s ensemble test) reads the model's shipped
    ``top-*.pt``, which ``write_checksums`` lists by default and every use checks."""
    run = tmp_path / "run"
    assert main(["train", "--no-progress", *tiny_cli_args(image_folder, run, "train.keep_top=2")]) == 0
    model = tmp_path / "zoo" / "folder" / "tiny-ensemble"
    shutil.copytree(run, model, ignore=shutil.ignore_patterns("last.pt", "step-*.pt", "metrics.*"))
    zoo.write_checksums(model)
    tops = sorted(path.name for path in run.glob("top-*.pt"))
    listed = [line.split("  ")[1] for line in (model / "SHA256SUMS").read_text().splitlines()]
    assert len(tops) == 2 and listed == ["best.pt", "config.yaml", "result.json", *tops]
    monkeypatch.setenv("METALOOP_ZOO", str(tmp_path / "zoo"))
    results = []
    for checkpoint in (str(run), "zoo:tiny-ensemble"):
        out = tmp_path / f"{len(results)}.json"
        argv = ["eval", "--checkpoint", checkpoint, "--top", "2", "--no-progress", "--json", str(out)]
        assert main(argv) == 0
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1]
    capsys.readouterr()
    assert main(["zoo"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("steps; ensemble: --top 2")
    flip_a_byte(model / tops[0])  # a damaged member is refused, not averaged in
    capsys.readouterr()
    assert main(["eval", "--checkpoint", "zoo:tiny-ensemble", "--top", "2", "--no-progress"]) == 2
    assert f"zoo model tiny-ensemble: {tops[0]} has sha256" in capsys.readouterr().err


@pytest.mark.parametrize("name", zoo.names())
def test_every_shipped_model_reproduces_its_result_on_100_episodes(name, omniglot_data_dir, tmp_path):
    """The first 100 of the model's seeded test episodes: their mean lies within the 95% CIs of the two
    estimates (the stated 1,000-episode one and this 100-episode one) of the shipped number. Four episodes
    at a time: a quarter of the memory of the recipes' 16."""
    shipped = json.loads((zoo.run_folder(name) / "result.json").read_text())
    argv = ["eval", "--checkpoint", f"zoo:{name}", "--episodes", "100", "--batch-size", "4", "--no-progress"]
    assert main([*argv, "--data-dir", str(omniglot_data_dir), "--json", str(tmp_path / "e.json")]) == 0
    measured = json.loads((tmp_path / "e.json").read_text())
    assert abs(measured["mean"] - shipped["mean"]) <= measured["ci95"] + shipped["ci95"], (measured, shipped)
