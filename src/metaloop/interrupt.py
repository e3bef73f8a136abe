"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM (``kill``, ``timeout``, a batch
scheduler, torchrun passing its own interrupt on to the ranks).

The first signal lets the running outer step finish; the trainer then writes ``last.pt`` at that
step (no validation, so it stops within one step) and raises :class:`TrainingInterrupted`, and
``metaloop train --resume`` continues exactly as if nothing had happened. A second signal stops
at once, as Python does by default (the steps since the last checkpoint are lost, nothing saved is
touched). Under torchrun the ranks agree on the signal before stopping, so all stop at one step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped by a signal after ``step``; ``last.pt`` in ``run_dir`` holds that step."""

    def __init__(self, signal_name: str, step: int, steps: int, run_dir: Path) -> None:
        self.signal_name, self.step, self.run_dir = signal_name, step, run_dir
        self.exit_code = 128 + int(signal.Signals[signal_name])  # what a shell reports for the signal
        super().__init__(
            f"stopped by {signal_name} after step {step} of {steps}; {run_dir}/last.pt holds that step "
            f"(nothing was tested); continue with: metaloop train --resume {run_dir}"
        )


class StopRequest:
    """Whether a stop signal has arrived: ``signal_name`` is ``None`` until then."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: remember the first signal; a second one interrupts at once."""
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "%s: finishing this step, then saving last.pt and stopping (send it again to stop at once, "
            "losing the steps since the last checkpoint)",
            self.signal_name,
        )


@contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """While the block runs, SIGINT and SIGTERM set the yielded request instead of stopping the
    process (only in the main thread, the one place Python delivers signals); the handlers that
    were there before are put back afterwards."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.signal(number, request.handle) for number in SIGNALS}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
