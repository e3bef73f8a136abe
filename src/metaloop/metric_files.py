"""The metric log's other forms: ``metrics.csv`` beside ``metrics.jsonl``, and TensorBoard.

``metrics.jsonl`` (one JSON object per line) is the record the trainer writes; the CSV holds the
same records as a table (one row per record, a column per key in first-seen order, empty where a
record lacks the key) and is rebuilt from the JSON lines whenever they are trimmed on resume, so
the two always agree.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from metaloop.config import ConfigError
from metaloop.fileio import atomic_write_bytes


class MetricsCsv:
    """``metrics.csv``: the records of ``jsonl_path`` as a table."""

    def __init__(self, path: Path, jsonl_path: Path) -> None:
        self.path, self.jsonl_path = path, jsonl_path
        self.columns: list[str] | None = None  # the header written, once known

    def append(self, record: dict[str, Any]) -> None:
        """Add ``record`` (already appended to the JSON lines) as a row; a record with a new key
        rewrites the file with the wider header."""
        if self.columns is None or not set(record) <= set(self.columns) or not self.path.exists():
            self.rebuild()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(record)

    def rebuild(self) -> None:
        """Write the whole table again from the complete lines of the JSON log."""
        records = []
        if self.jsonl_path.exists():
            for line in self.jsonl_path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
        columns = list(dict.fromkeys(key for record in records for key in record))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        atomic_write_bytes(self.path, text.getvalue().encode())
        self.columns = columns


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        return False
    return True


def check_tensorboard() -> None:
    """Refuse ``train.tensorboard: true`` where the ``tensorboard`` package is not installed."""
    if not tensorboard_available():
        raise ConfigError(
            "train.tensorboard is true but the tensorboard package is not installed: "
            "pip install 'metaloop[tensorboard]' (or pip install tensorboard), or set train.tensorboard=false"
        )


class TensorBoardLog:
    """Every number of every metric record as a TensorBoard scalar at its ``step``, in ``folder``.

    ``purge_step`` (on resume: the checkpoint's step + 1) drops events a crashed run wrote after
    its last checkpoint, as the JSON log is trimmed.
    """

    def __init__(self, folder: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def add(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()
