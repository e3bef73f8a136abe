"""Device names a user may give (``--device``, ``device:`` in a recipe), checked before use."""

from __future__ import annotations

import re
import sys

import torch

from metaloop.config import ConfigError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N (the N-th visible GPU), mps"


class DeviceError(ConfigError):
    """A device name that is not one of :data:`DEVICE_NAMES`, or a device this machine lacks."""


def check_device(name: str | torch.device) -> torch.device | None:
    """``name`` as a ``torch.device`` (``None`` for ``"auto"``) if this machine has it.

    Raises :class:`DeviceError` for a misspelt name (``gpu``), for ``cuda`` with a torch built
    without CUDA or with no GPU visible, for a GPU index past the visible ones, and for ``mps``
    where Apple's Metal backend is not available.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return None
    elif not isinstance(name, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise DeviceError(f"unknown device {name!r}; valid: {DEVICE_NAMES}")
    else:
        device = torch.device(name)
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise DeviceError(
                f"device {name!r} asks for CUDA, but this torch ({torch.__version__}) was built without "
                "CUDA; use --device cpu, or install a CUDA build of torch (pytorch.org/get-started)"
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise DeviceError(
                f"device {name!r} asks for a GPU, but none is visible (check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES); use --device cpu"
            )
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {name!r}: only {count} GPU(s) visible, numbered 0 to {count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r}: Apple's Metal (MPS) backend is not available on this machine")
    return device


def saved_device_or_cpu(name: str) -> str:
    """The device a saved run names (its ``device`` setting), or ``"cpu"`` where this machine lacks it.

    For evaluating a checkpoint elsewhere than it was trained (a model trained on a GPU, evaluated on a
    laptop): with no ``--device`` given, a GPU the run used but this machine lacks falls back to the
    CPU, saying so on stderr. A misspelt name still raises :class:`DeviceError`.
    """
    try:
        check_device(name)
    except DeviceError:
        if not re.fullmatch(r"mps|cuda(:\d+)?", name):  # a misspelt name, not a missing device
            raise
        print(
            f"metaloop: the run was trained on {name!r}, which this machine lacks; evaluating on the CPU",
            file=sys.stderr,
        )
        return "cpu"
    return name
