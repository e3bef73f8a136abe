"""The README's Python example and its commands are kept true."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METALOOP_DATA", str(tmp_path))  # glyphs are generated, never downloaded
    monkeypatch.setenv("METALOOP_CACHE", str(tmp_path / "cache"))
    (code,) = re.findall(r"## Python API\n\n```python\n(.*?)```", README, re.S)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "5-way 1-shot accuracy" in out and "600 episodes" in out
    assert namespace["logits"].shape == (75, 5)
    assert namespace["evaluate"] is not None


def test_ci_runs_the_readme_test_command():
    (command,) = re.findall(
        r"The second installs the test extras and runs the tests:\n\n```bash\n(.*?)\n```", README
    )
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert command in ci.splitlines()


@pytest.mark.parametrize("path", sorted(set(re.findall(r"configs/[\w.]+\.yaml", README))))
def test_recipes_named_in_the_readme_exist(path):
    assert (Path(__file__).parent.parent / path).is_file()
