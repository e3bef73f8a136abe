"""The model zoo: trained runs shipped with the package, loadable by name.

A zoo model is a run folder under ``metaloop/models/<dataset>/<name>/`` holding what ``metaloop train``
wrote for the run (``best.pt``, ``config.yaml``, ``result.json``; for a model whose paper tests an
ensemble, the ``top-*.pt`` models it averages) and ``SHA256SUMS``, the sha256 of each of those files.
Wherever a run folder or checkpoint is accepted, ``zoo:<name>`` names one::

    metaloop eval --checkpoint zoo:siamese-omniglot-5w1s      # re-measures result.json's number
    metaloop eval --checkpoint zoo:mamlpp-omniglot-5w1s --top 5   # the ensemble of its 5 best models
    metaloop compare siamese=zoo:siamese-omniglot-5w1s protonet=runs/my_protonet

and from Python ``metaloop.zoo.load(name)`` returns the learner. Every file is checked against its
sha256 before use, so a damaged or edited model fails with an error instead of giving other numbers.
``METALOOP_ZOO`` points at another zoo folder (laid out the same way).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from metaloop.algorithms.base import MetaLearner

PREFIX = "zoo:"
CHECKSUMS = "SHA256SUMS"


class ZooError(ValueError):
    """A zoo name that is not in the zoo, or a zoo model whose files fail their checksums."""


def root() -> Path:
    """The zoo folder: ``$METALOOP_ZOO``, else the ``models`` folder shipped inside the package."""
    return Path(os.environ.get("METALOOP_ZOO") or Path(__file__).parent / "models")


def names() -> list[str]:
    """Every model in the zoo, sorted (a model is a folder holding ``SHA256SUMS``)."""
    return sorted(p.parent.name for p in root().glob(f"*/*/{CHECKSUMS}"))


def is_zoo(spec: str | Path) -> bool:
    """Whether ``spec`` names a zoo model (``zoo:<name>``)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_folder(name: str) -> Path:
    """The folder of zoo model ``name``, its files not checked (:func:`run_folder` checks them)."""
    found = [p.parent for p in root().glob(f"*/{name}/{CHECKSUMS}")]
    if len(found) != 1:
        known = ", ".join(names()) or "none"
        raise ZooError(f"no model {name!r} in the zoo at {root()}; the zoo has: {known}")
    return found[0]


def run_folder(spec: str) -> Path:
    """The verified run folder of ``zoo:<name>`` (or of ``<name>``).

    Raises:
        ZooError: no such model (the error lists the zoo), or a file whose sha256 differs from
            ``SHA256SUMS`` (or is missing).
    """
    name = spec.removeprefix(PREFIX)
    folder = model_folder(name)
    for line in (folder / CHECKSUMS).read_text().splitlines():
        expected, _, filename = line.partition("  ")
        path = folder / filename
        if not path.is_file():
            raise ZooError(f"zoo model {name}: {filename} is missing from {folder}; reinstall metaloop")
        actual = sha256(path)
        if actual != expected:
            raise ZooError(
                f"zoo model {name}: {filename} has sha256 {actual}, expected {expected} "
                f"(damaged or edited); reinstall metaloop or restore {path}"
            )
    return folder


def resolve(spec: str | Path) -> Path:
    """``spec`` as a path: the verified run folder for ``zoo:<name>``, else ``Path(spec)``."""
    return run_folder(spec) if is_zoo(spec) else Path(spec)


def write_checksums(folder: str | os.PathLike, files: Sequence[str] | None = None) -> None:
    """Write ``folder/SHA256SUMS`` for ``files`` (used when a finished run is added to the zoo); by
    default ``best.pt``, ``config.yaml``, ``result.json`` and whatever ``top-*.pt`` the folder holds."""
    folder = Path(folder)
    if files is None:
        files = ("best.pt", "config.yaml", "result.json", *_kept_models(folder))
    lines = [f"{sha256(folder / filename)}  {filename}" for filename in files]
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n")


def _kept_models(folder: Path) -> list[str]:
    """The file names of the best-validated models ``folder`` keeps for an ensemble test, sorted."""
    from metaloop.ensemble import TOP_PATTERN  # metaloop.ensemble imports this module

    return sorted(path.name for path in folder.glob(TOP_PATTERN))


def summaries(names: Sequence[str]) -> list[str]:
    """One line per model for ``metaloop zoo``, in aligned columns: name, learner, dataset (with its
    test split where that is not ``test``), test setting and the model's result.json (mean ± 95% CI
    over its test episodes, test episodes and queries, steps trained), and for a model shipped with the
    ``top-*.pt`` of its paper's ensemble test, how to run it (``--top K``). Read without checking
    sha256 sums, which every use of a model checks."""
    rows = []
    for name in names:
        folder = model_folder(name)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        result = json.loads((folder / "result.json").read_text())
        test_split = config["data"]["test_split"]
        kept = len(_kept_models(folder))
        rows.append(
            [
                name,
                config["algorithm"]["name"],
                folder.parent.name + ("" if test_split == "test" else f"/{test_split}"),
                f"{result['ways']}-way {result['shots']}-shot",
                f"{100 * result['mean']:.2f} ± {100 * result['ci95']:.2f}%",
                f"({result['episodes']} episodes, {result['queries']} queries) {result['steps']:,} steps"
                + (f"; ensemble: --top {kept}" if kept else ""),
            ]
        )
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    return [" ".join(f"{f:{w}s}" for f, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def load(name: str) -> MetaLearner:
    """The learner of zoo model ``name`` (``"siamese-omniglot-5w1s"`` or ``"zoo:..."``), in eval mode, on
    the CPU."""
    from metaloop.checkpoint import load_checkpoint
    from metaloop.learners import learner_from_checkpoint

    learner = learner_from_checkpoint(load_checkpoint(run_folder(name) / "best.pt"))
    return learner.eval()
