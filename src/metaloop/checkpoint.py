"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked before use."""

from __future__ import annotations

import pickle
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

    A run folder is accepted too: its ``best.pt``, else its ``last.pt``.
    """
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {error}. "
            "Use another checkpoint of the run (best.pt / last.pt) or retrain."
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metaloop checkpoint (expected format {FORMAT!r})")
    return state


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
