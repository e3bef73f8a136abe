"""The YAML recipes that ship inside the package (``metaloop/recipes/*.yaml``), found by name.

A recipe's name is its file stem with ``_`` written ``-`` (``maml_omniglot_5w1s.yaml`` is
``maml-omniglot-5w1s``). What ``metaloop recipes`` prints about each one is read from the file
itself: learner, dataset and test setting from its keys, the paper from its leading comment.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from metaloop.config import ConfigError, config_from_dict

# "Finn et al. 2017", "Raghu, Raghu, Bengio & Vinyals 2020", 'Antoniou, Edwards & Storkey, "How to
# train your MAML", ICLR 2019': authors, an optional quoted title and venue, then a year that is not
# part of an arXiv number (arXiv:1904.04232).
_CITATION = re.compile(
    r"((?:[A-Z][\w-]+(?:, | & | and ))*[A-Z][\w-]+(?: et al\.)?)"  # authors
    r'(?:, "[^"]+", [A-Za-z]+)?'  # title and venue
    r" ((?:19|20)\d\d)(?![\d.])"  # year
)


@dataclass(frozen=True)
class Recipe:
    """One shipped recipe: its name, file, and what it trains (read from the file)."""

    name: str
    path: Path
    learner: str
    dataset: str
    setting: str  # the test episodes: "5-way 1-shot", or "5-shot regression"
    paper: str  # first citation in the leading comment ("Finn et al. 2017"), or "" if none

    def line(self, name_width: int) -> str:
        """One line for ``metaloop recipes``, its name padded to ``name_width`` characters (the
        longest name's length, so that the columns align)."""
        return (
            f"{self.name:{name_width}s} {self.learner:9s} {self.dataset:13s} {self.setting:18s} "
            f"{self.paper or '-'}"
        )


def recipes_folder() -> Path:
    """The folder of shipped recipes (inside the installed package, or ``src/metaloop/recipes``)."""
    return Path(str(resources.files("metaloop") / "recipes"))


def recipe_name(path: Path) -> str:
    return path.stem.replace("_", "-")


def read_recipe(path: Path) -> Recipe:
    """A :class:`Recipe` from a YAML file: its keys (defaults filled in) and its leading comment."""
    text = path.read_text()
    config = config_from_dict(yaml.safe_load(text) or {})
    comment = " ".join(
        line.lstrip("#").strip() for line in _leading_comment(text.splitlines())
    )  # one string, so a citation broken over two lines is found
    citation = _CITATION.search(comment)
    if config.data.name == "sinusoid":
        setting = f"{config.eval.shots}-shot regression"
    else:
        setting = f"{config.eval.ways}-way {config.eval.shots}-shot"
    return Recipe(
        name=recipe_name(path),
        path=path,
        learner=config.algorithm.name,
        dataset=config.data.name,
        setting=setting,
        paper=" ".join(citation.groups()) if citation else "",
    )


def _leading_comment(lines: list[str]) -> list[str]:
    comment = []
    for line in lines:
        if not line.startswith("#"):
            break
        comment.append(line)
    return comment


def all_recipes() -> list[Recipe]:
    """Every shipped recipe, sorted by name."""
    return [read_recipe(path) for path in sorted(recipes_folder().glob("*.yaml"))]


def recipe_path(name: str) -> Path:
    """The file of the recipe called ``name`` (``maml-omniglot-5w1s``; ``_`` is accepted for ``-``).

    An unknown name raises :class:`ConfigError` naming the closest recipes.
    """
    wanted = name.removesuffix(".yaml").replace("_", "-")
    files = {recipe_name(path): path for path in recipes_folder().glob("*.yaml")}
    if wanted in files:
        return files[wanted]
    close = difflib.get_close_matches(wanted, sorted(files), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"there are {len(files)}"
    raise ConfigError(f"no recipe named {name!r}; {hint} (metaloop recipes lists them all)")
