"""Every code block of README.md and docs/*.md is kept true.

- ```python blocks run as written, each in a fresh folder (see ``_workspace``).
- ```bash blocks run in a cheaper form: each ``metaloop`` command runs in-process with the
  overrides of ``_cheaper`` (e.g. ``--set train.steps=2``), in order, in a fresh folder; a
  ``pip install`` or ``python -m pytest`` part must be CI's own command (``.ci/run`` runs it).
- A bash block preceded by ``<!-- not run: REASON -->`` is an example the tests do not run (REASON
  says why); its ``metaloop`` commands are still parsed, and the recipes and ``--set`` keys they name
  are loaded, so a renamed flag or key fails here.
- ```text blocks are not code.
Blocks that name Omniglot need the real data (skip without it, fail in CI as the other tests do).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_class_images, write_image_folder

from metaloop import cli
from metaloop.config import Config, load_config
from metaloop.recipebook import recipe_path

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


@dataclass
class Block:
    page: str  # path relative to the repository root
    line: int
    lang: str
    code: str
    not_run: str | None  # the reason, for an example the tests do not run

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = NOT_RUN.fullmatch(before.strip())
            line = text.count("\n", 0, match.start()) + 1
            name = str(page.relative_to(ROOT))
            blocks.append(Block(name, line, match[1], match[2], marker[1] if marker else None))
    return blocks


BLOCKS = _blocks()


def _commands(code: str) -> list[list[str]]:
    """The shell lines of a block (continuations joined, comments dropped), each split at ``&&``."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1 :]
    return commands


def _metaloop_argv(words: list[str]) -> list[str] | None:
    """The arguments after ``metaloop`` (also ``torchrun ... -m metaloop``), or None for another tool."""
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # leading VAR=value settings
    if words and words[0] == "metaloop":
        return words[1:]
    if words and words[0] in ("torchrun", "python") and "-m" in words:
        at = words.index("-m")
        if words[at + 1 : at + 2] == ["metaloop"]:
            return words[at + 2 :]
    return None


def _substitute(words: list[str], variables: dict[str, str]) -> list[str]:
    return [re.sub(r"\$(\w+)", lambda m: variables.get(m[1], m[0]), w) for w in words]


def _train_config(args) -> Config:
    """The configuration a ``train`` command runs: its ``--recipe`` or ``--config`` with its ``--set``s."""
    return load_config(recipe_path(args.recipe) if args.recipe else args.config, list(args.set))


def _check_parses(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    if args.command == "train" and not args.resume:
        _train_config(args)  # the recipe exists and every --set key is valid
    if args.command == "compare":
        for source in args.learners:
            path = source.split("=", 1)[-1]
            if path.endswith(".yaml"):
                assert (ROOT / path).is_file(), f"recipe {path} does not exist"


def _is_ci_command(words: list[str]) -> bool:
    """``words`` is a part of CI's install-and-test line, or its install without the ``[dev]`` extra."""
    ci = [
        c
        for c in _commands((ROOT / ".ci" / "run").read_text())
        if c[:2] in (["pip", "install"], ["python", "-m"])
    ]
    return words in ci or words in [[w.replace(".[dev]", ".") for w in c] for c in ci]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("bash", "sh")], ids=lambda b: b.id)
def test_every_command_parses_and_names_real_recipes_and_keys(block):
    variables = {}
    for words in _commands(block.code):
        if len(words) == 1 and re.fullmatch(r"\w+=\S+", words[0]):  # R=runs/...
            name, value = words[0].split("=", 1)
            variables[name] = value
            continue
        argv = _metaloop_argv(_substitute(words, variables))
        if argv is not None:
            _check_parses(argv)


def test_every_block_is_python_bash_or_text():
    unknown = [f"{b.id} ```{b.lang}" for b in BLOCKS if b.lang not in ("python", "bash", "sh", "text")]
    assert not unknown, f"code blocks must say python, bash or text: {unknown}"


def test_not_run_markers_sit_on_shell_blocks_and_give_a_reason():
    for block in BLOCKS:
        if block.not_run is not None:
            assert block.lang in ("bash", "sh"), f"{block.id}: python blocks always run"
            assert len(block.not_run.split()) >= 2, f"{block.id}: say why it is not run"


def _cheaper(argv: list[str]) -> list[str]:
    """The same command with a budget of seconds."""
    command = argv[0]
    if command == "train" and "--resume" in argv:
        return [*argv, "--no-progress", "--set", "train.steps=4"]
    if command == "train":
        sets = [
            "train.steps=2",
            "train.val_every=2",
            "train.val_episodes=2",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "eval.episodes=2",
        ]
        return [*argv, "--no-progress", *[a for s in sets for a in ("--set", s)]]
    if command == "eval":
        return [*argv, "--no-progress", "--episodes", "2"]
    if command == "compare":
        return [*argv, "--no-progress", "--episodes", "2"]
    if command == "data" and argv[1:2] == ["prepare"]:
        return [*argv, "--no-download"]
    return argv


@pytest.fixture(scope="module")
def glyph_data(tmp_path_factory, seed_glyph_cache) -> Path:
    """One METALOOP_DATA for the blocks that use the glyphs, its cache (METALOOP_CACHE if set) holding
    the session's generated set (tests/conftest.py)."""
    data_dir = tmp_path_factory.mktemp("glyph-data")
    seed_glyph_cache(None if os.environ.get("METALOOP_CACHE") else data_dir / "cache")
    return data_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, glyph_data) -> Path:
    """The main job (``metaloop train``) in its cheaper form: the trained model a block may start from."""
    base = tmp_path_factory.mktemp("main-job")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("METALOOP_DATA", str(glyph_data))
        if not os.environ.get("METALOOP_CACHE"):
            mp.setenv("METALOOP_CACHE", str(glyph_data / "cache"))
        _run(_cheaper(["train"]), "tiny_run")
    return base / "runs" / "default"


def _workspace(path: Path, block: Block, tiny_run: Path, glyph_data: Path, monkeypatch) -> None:
    """What the pages assume a reader has: ``my_support/`` (3 classes), ``my_queries/`` and, unless
    the block trains it itself, a trained ``runs/default``; glyphs are generated, never downloaded."""
    write_image_folder(path / "my_support", make_class_images(num_classes=3, per_class=2, seed=2))
    write_image_folder(path / "my_queries", make_class_images(num_classes=3, per_class=2, seed=3))
    trains_default = any(
        (argv := _metaloop_argv(words)) is not None
        and argv[:1] == ["train"]
        and not {"--config", "--recipe"} & set(argv)
        for words in _commands(block.code)
    )
    if "runs/default" in block.code and not trains_default:
        shutil.copytree(tiny_run, path / "runs" / "default")
    (path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(path)
    if "omniglot" not in block.code.lower():
        monkeypatch.setenv("METALOOP_DATA", str(glyph_data))
        if not os.environ.get("METALOOP_CACHE"):
            monkeypatch.setenv("METALOOP_CACHE", str(glyph_data / "cache"))


def _needs_omniglot(block: Block, request) -> None:
    if "omniglot" in block.code.lower():
        request.getfixturevalue("omniglot_data_dir")  # skips, or fails in CI, without the data


# README.md's "In Python" example runs in tests/test_readme.py, which also checks what it prints.
README_EXAMPLE = re.findall(r"## In Python\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize(
    "block",
    [b for b in BLOCKS if b.lang == "python" and not (b.page == "README.md" and b.code in README_EXAMPLE)],
    ids=lambda b: b.id,
)
def test_python_block_runs(block, tmp_path, tiny_run, glyph_data, monkeypatch, request):
    _needs_omniglot(block, request)
    _workspace(tmp_path, block, tiny_run, glyph_data, monkeypatch)
    exec(compile(block.code, block.id, "exec"), {"__name__": "__docs__"})


RUN = [b for b in BLOCKS if b.lang in ("bash", "sh") and b.not_run is None]


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
def test_shell_block_runs_in_a_cheaper_form(block, tmp_path, tiny_run, glyph_data, monkeypatch, request):
    _needs_omniglot(block, request)
    _workspace(tmp_path, block, tiny_run, glyph_data, monkeypatch)
    for words in _commands(block.code):
        if words[:2] == ["pip", "install"] or words == ["python", "-m", "pytest"]:
            assert _is_ci_command(words), f"{block.id}: {' '.join(words)!r} is not CI's command"
            continue
        argv = _metaloop_argv(words)
        assert argv is not None and words[0] == "metaloop", (
            f"{block.id}: the tests cannot run {' '.join(words)!r}; mark the block <!-- not run: REASON -->"
        )
        _run(_cheaper(argv), block.id)


_TRAINED: dict[tuple[str, ...], Path] = {}  # a train command already run -> its run folder


def _run(argv: list[str], where: str) -> None:
    """Run one command in-process; a ``train`` command run before (same arguments, same result on one
    machine) has its run folder copied instead of being trained again."""
    key = tuple(argv)
    if argv[0] == "train" and "--resume" not in argv:
        args = cli.build_parser().parse_args(argv)
        run_dir = Path(_train_config(args).run_dir)
        if key in _TRAINED:
            shutil.copytree(_TRAINED[key], run_dir)
            return
        assert cli.main(argv) == 0, f"{where}: metaloop {' '.join(argv)} failed"
        _TRAINED[key] = run_dir.resolve()
        return
    assert cli.main(argv) == 0, f"{where}: metaloop {' '.join(argv)} failed"


def test_every_page_is_linked_and_links_back_to_the_index():
    index = ROOT / "docs" / "README.md"
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", index.read_text()))
    for page in (ROOT / "docs").glob("*.md"):
        if page != index:
            assert page.name in linked, f"docs/README.md does not link {page.name}"
            assert "](README.md)" in page.read_text(), f"{page.name} has no link back to the index"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings(page):
    for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)]*))?\)", page.read_text()):
        path = page.parent / target if target else page
        assert path.exists(), f"{page.name} links {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(path), f"{page.name} links {target}#{anchor}: no such heading"
