"""The recipes ship inside the package: listed by ``metaloop recipes``, run by name, and present
in a wheel installed where no checkout is near."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

from metaloop.cli import main
from metaloop.recipebook import recipe_path, recipes_folder

ROOT = Path(__file__).resolve().parents[1]


def recipe_files():
    return sorted(recipes_folder().glob("*.yaml"))


def test_configs_is_the_recipes_folder():
    """Every documented ``--config configs/x.yaml`` path reads the shipped recipe."""
    assert (ROOT / "configs").resolve() == recipes_folder().resolve()
    assert len(recipe_files()) >= 30


def test_recipes_lists_every_file_with_what_it_trains(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(recipe_files())
    listed = {line.split()[0]: line for line in lines}
    for path in recipe_files():
        data = yaml.safe_load(path.read_text())
        line = listed[path.stem.replace("_", "-")]
        assert line.split()[1] == data["algorithm"]["name"]
        assert line.split()[2] == data["data"]["name"]
    assert "maml      omniglot      5-way 1-shot       Finn et al. 2017" in listed["maml-omniglot-5w1s"]
    assert listed["anil-omniglot-5w1s"].endswith("Raghu, Raghu, Bengio & Vinyals 2020")
    assert listed["protonet-omniglot-20w5s"].split()[3:5] == ["20-way", "5-shot"]
    assert "5-shot regression" in listed["maml-sinusoid"]
    learner_columns = {line.index(f" {line.split()[1]} ") for line in lines}
    assert len(learner_columns) == 1, "the columns stay aligned however long a recipe's name"
    no_paper = sorted(name for name, line in listed.items() if line.endswith(" -"))
    assert no_paper == ["study-scarce-tasks"], "every paper's recipe names its paper"
    assert listed["mamlpp-omniglot-5w1s"].endswith("Antoniou, Edwards & Storkey 2019")  # titled citation


def test_a_recipe_by_name(tmp_path, capsys):
    assert recipe_path("maml-omniglot-5w1s") == recipes_folder() / "maml_omniglot_5w1s.yaml"
    assert recipe_path("maml_omniglot_5w1s") == recipe_path("maml-omniglot-5w1s")
    argv = ["train", "--no-progress", "--recipe", "maml-sinusoid", "--set", f"run_dir={tmp_path / 'run'}"]
    sets = ["train.steps=2", "train.meta_batch_size=2", "train.val_episodes=2", "eval.episodes=2"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    assert "maml on sinusoid/test: 5-shot MSE" in capsys.readouterr().out


def test_an_unknown_recipe_names_the_close_ones(capsys):
    assert main(["train", "--recipe", "maml-omniglot-5w2s"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "no recipe named 'maml-omniglot-5w2s'; did you mean maml-omniglot-5w5s, maml-omniglot-5w1s" in err


def test_recipe_and_config_together_are_refused(capsys):
    assert main(["train", "--recipe", "maml-sinusoid", "--config", "configs/maml_sinusoid.yaml"]) == 2
    assert "not both" in capsys.readouterr().err


def build_wheel(out: Path) -> Path:
    """``pip wheel`` of a copy of this checkout's package files (the build leaves its ``build/``
    there, not here), without build isolation where setuptools >= 77 is at hand (no index needed),
    else with it."""
    source = out / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    try:
        import setuptools

        isolated = int(setuptools.__version__.split(".")[0]) < 77
    except ImportError:
        isolated = True
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    subprocess.run(command + ([] if isolated else ["--no-build-isolation"]), check=True, timeout=300)
    (wheel,) = out.glob("metaloop-*.whl")
    return wheel


def test_the_wheel_runs_a_recipe_in_a_fresh_environment(tmp_path):
    """Build the wheel, install it (no dependencies) into a new virtual environment that sees this
    one's packages (torch, numpy, ...) but not the checkout, and run recipes from it by name."""
    wheel = build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    new_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
        "-q",
    ]
    subprocess.run([*pip, str(wheel)], check=True, timeout=300)
    # Then this environment's packages as plain path entries (after the install, so pip cannot see
    # an installed metaloop there): torch & co. are found, but an editable
    # install of the checkout (a .pth hook there) is not run.
    own = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(new_site) / "parent_env.pth").write_text("\n".join(own) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "METALOOP_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    home = tmp_path / "elsewhere"  # no checkout here or above
    home.mkdir()
    metaloop = venv / ("Scripts/metaloop.exe" if os.name == "nt" else "bin/metaloop")

    def run(*argv):
        done = subprocess.run(
            [metaloop, *argv], cwd=home, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = run("recipes", "--paths").splitlines()
    names = sorted(p.stem.replace("_", "-") for p in recipe_files())
    assert sorted(line.split()[0] for line in listed) == names
    assert all(line.split()[-1].startswith(str(venv)) for line in listed), listed  # the wheel's own files
    sets = [
        "train.steps=2",
        "train.meta_batch_size=2",
        "train.val_episodes=2",
        "eval.episodes=2",
        "run_dir=run",
    ]
    out = run("train", "--no-progress", "--recipe", "maml-sinusoid", *[a for s in sets for a in ("--set", s)])
    assert "maml on sinusoid/test: 5-shot MSE" in out
    assert (home / "run" / "result.json").is_file()
