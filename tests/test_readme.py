"""The front page keeps its promises: short, CI runs its test command, its example prints a result.

Every code block of README.md and docs/*.md also runs in tests/test_docs.py.
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_the_front_page_fits_on_a_few_screens():
    assert len(README.splitlines()) <= 150


def test_ci_runs_the_readme_test_command():
    (command,) = re.findall(
        r"The second installs the test extras and runs the tests:\n\n```bash\n(.*?)\n```", README
    )
    assert command == 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest'
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_first_command_installs_and_runs_the_main_job():
    (command,) = re.findall(r"runs the main job.*?```bash\n(.*?)\n```", README, re.S)
    assert command == "pip install torch==2.13.0 -e . && metaloop train"


def test_python_example_prints_an_accuracy_with_its_ci(tmp_path, monkeypatch, capsys, seed_glyph_cache):
    monkeypatch.setenv("METALOOP_DATA", str(tmp_path))  # glyphs are generated, never downloaded
    if not os.environ.get("METALOOP_CACHE"):  # else the glyphs cached there are used
        monkeypatch.setenv("METALOOP_CACHE", str(tmp_path / "cache"))
    seed_glyph_cache()  # the session's generated glyphs, read from the cache
    (code,) = re.findall(r"## In Python\n\n```python\n(.*?)```", README, re.S)
    assert len(code.splitlines()) <= 20
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"5-way 1-shot accuracy: \d+\.\d\d ± \d\.\d\d% \(95% CI, 100 episodes\)", out), out


@pytest.mark.parametrize("path", sorted(set(re.findall(r"configs/[\w.]+\.yaml", README))))
def test_recipes_named_in_the_readme_exist(path):
    assert (ROOT / path).is_file()


def test_the_learner_table_and_count_match_the_learners():
    from metaloop.algorithms import LEARNERS

    section = README.split("## Learners")[1].split("\n## ")[0]
    assert sorted(re.findall(r"^\| `(\w+)` \|", section, re.M)) == sorted(LEARNERS)
    numbers = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    (count,) = re.findall(r"few-shot learning on PyTorch: (\w+) metric", README)
    assert numbers.split().index(count) + 1 == len(LEARNERS)
