"""What the command line writes to the console besides results: metaloop's log lines, and settings
refused before any work. How it reports a failure: a user's mistake is one line and exit code 2; a bug in
metaloop shows its traceback. ``--debug`` (or ``METALOOP_DEBUG=1``) shows the traceback of a
user's mistake too.

A user's mistake is an error metaloop raises on purpose about its input: a bad setting
(:class:`ConfigError`, :class:`DeviceError`), an unreadable checkpoint, a dataset that is missing
or damaged, a file-system error (a path that does not exist, no permission), or a ``ValueError``
raised by metaloop's own code. Anything else, such as a ``KeyError`` or a ``ValueError`` escaping
from inside torch, is a bug and is reported as one.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from metaloop import distributed
from metaloop.checkpoint import CheckpointError
from metaloop.config import Config, ConfigError
from metaloop.data.download import DownloadError
from metaloop.data.omniglot import OmniglotError
from metaloop.device import check_device
from metaloop.interrupt import TrainingInterrupted

PACKAGE = Path(__file__).resolve().parent
USER_ERRORS = (ConfigError, CheckpointError, DownloadError, OmniglotError, OSError)


def diverged(error: Exception) -> bool:
    """Whether ``error`` is the trainer's :class:`metaloop.train.TrainingDiverged`, looked up without
    importing the trainer (only a command that trains can diverge; eval and predict never load it)."""
    train = sys.modules.get("metaloop.train")
    return train is not None and isinstance(error, train.TrainingDiverged)


def debug_wanted(args: argparse.Namespace) -> bool:
    """``--debug`` given, or ``METALOOP_DEBUG`` set to anything but empty or ``0``."""
    return bool(getattr(args, "debug", False)) or os.environ.get("METALOOP_DEBUG", "0") not in ("", "0")


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports a mistake in the user's input (see the module docstring)."""
    if isinstance(error, USER_ERRORS):
        return True
    if isinstance(error, ValueError):
        frames = traceback.extract_tb(error.__traceback__)
        return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE)
    return False


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``handler(args)``; report a failure as the module docstring says and return its exit code:
    2 for a user's mistake, 3 for a diverged training run, 128 + the signal's number for a training
    run stopped by SIGINT or SIGTERM (its ``last.pt`` saved) and 130 for any other Ctrl-C (one line,
    no traceback), 1 otherwise; 0, silently, when the reader of the output closed the pipe."""
    try:
        return handler(args)
    except BrokenPipeError:  # the reader went away (``metaloop zoo | head -1``): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is silent
        return 0
    except TrainingInterrupted as error:  # not a failure: the run stopped where it was asked to
        if distributed.is_main():
            print(f"metaloop {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside training's loop (an evaluation, a second Ctrl-C)
        if debug_wanted(args):
            traceback.print_exc()
        print(f"metaloop {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except distributed.DistributedError as error:  # its message names the rank
        return _one_line(args, error, 1, where="")
    except Exception as error:
        if diverged(error):
            return _one_line(args, error, 3)
        if is_user_error(error):
            return _one_line(args, error, 2)
        traceback.print_exc()
        print(
            f"metaloop {args.command}: internal error {type(error).__name__} (a bug in metaloop, not in "
            "your input); please report it with the traceback above",
            file=sys.stderr,
        )
        return 1


def _one_line(args: argparse.Namespace, error: BaseException, code: int, where: str | None = None) -> int:
    if debug_wanted(args):
        traceback.print_exception(error)
    message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever it held
    print(f"metaloop {args.command}: error: {_where() if where is None else where}{message}", file=sys.stderr)
    return code


def _where() -> str:
    """``"[rank r/W] "`` when launched as one of several processes, else nothing."""
    return f"[rank {distributed.rank()}/{distributed.world_size()}] " if distributed.launched() else ""


class ConsoleLines(logging.Handler):
    """metaloop's log lines (``run folder: ...``, one line per meta-validation) on stderr, written
    around any progress bar; only on rank 0 of a torchrun launch."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        if distributed.is_main():
            tqdm.write(self.format(record), file=sys.stderr)


def log_to_console() -> None:
    logger = logging.getLogger("metaloop")
    if not any(isinstance(h, ConsoleLines) for h in logger.handlers):
        logger.addHandler(ConsoleLines())
    logger.setLevel(logging.INFO)


def check_settings(config: Config) -> None:
    """Refuse, before any work, a device this machine lacks and a data folder that does not exist
    (a mistyped ``--data-dir`` would otherwise be created and filled with downloads and caches)."""
    check_device(config.device)
    if config.data.data_dir is not None:
        check_data_dir(config.data.data_dir)


def check_data_dir(data_dir: str | Path) -> None:
    """Refuse a data folder that does not exist, saying how to fill one."""
    if not Path(data_dir).expanduser().is_dir():
        raise ConfigError(
            f"data folder {data_dir} does not exist; check the path, or fetch Omniglot into it with "
            f"'metaloop data prepare omniglot --data-dir {data_dir}'"
        )
