"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked before use."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from metaloop import zoo
from metaloop.fileio import atomic_torch_save

FORMAT = "metaloop-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit what it is loaded into."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus a format tag) to ``path`` atomically: temp file + rename."""
    atomic_torch_save({"format": FORMAT, **state}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, on the CPU.

    A run folder is accepted too: its ``best.pt``, else its ``last.pt``. A file that cannot be
    read raises :class:`CheckpointError` with one line in our words (empty, truncated, not a
    PyTorch file, refused because it refers to code, not a metaloop checkpoint).
    """
    path = resolve_checkpoint(path)
    problem = _not_a_zip_checkpoint(path)
    if problem:
        raise CheckpointError(f"{path} is not a readable checkpoint: {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint: {_refused(error)}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a metaloop checkpoint (expected format {FORMAT!r}); give a best.pt or last.pt "
            "that metaloop train wrote"
        )
    return state


RETRY = "use another checkpoint of the run (best.pt, last.pt, step-*.pt) or retrain"


def _not_a_zip_checkpoint(path: Path) -> str | None:
    """What is wrong with ``path`` before torch reads it, or None for a complete zip archive.

    ``torch.save`` (and so every metaloop checkpoint) writes a zip archive; anything else is
    refused here, without handing it to torch's legacy or pickle readers.
    """
    size = path.stat().st_size
    if size == 0:
        return f"the file is empty (0 bytes), e.g. a copy or save that never completed; {RETRY}"
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        return f"the file is truncated ({size} bytes; the end of its zip archive is missing); {RETRY}"
    if head.startswith(b"\x80"):
        return "it is a plain Python pickle, not a PyTorch zip checkpoint; metaloop does not load pickles"
    return f"its {size} bytes are not a PyTorch checkpoint (no zip archive: corrupt, or another format)"


def _refused(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed on a zip archive, in one line of our words.

    torch's messages run to several lines and advise loading with ``weights_only=False``, which
    would run whatever code the file holds; none of that text is passed on. The refused object's
    name (``posix.system``, ``torch.nn.modules.linear.Linear``) is.
    """
    refused = re.search(r"GLOBAL ([\w.]+)", str(error))
    if refused:
        return (
            f"it refers to Python code ({refused.group(1)}), which metaloop never loads: a metaloop "
            "checkpoint holds only tensors and plain values. Do not load this file unless you know who "
            "made it and why"
        )
    return f"its zip archive is damaged ({type(error).__name__}); {RETRY}"


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if a file; for a run folder (or a zoo model, ``zoo:<name>``) its ``best.pt`` or
    ``last.pt``."""
    path = zoo.resolve(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"run folder {path} holds no best.pt or last.pt checkpoint")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path
