"""Keep glibc from handing large blocks back to the system after every step.

Meta-learning steps allocate and free the same few hundred MB each iteration. By default
glibc serves such blocks with mmap and returns them on free, so every step pays for fresh
page faults. This applies ``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_=-1`` (never trim) from
inside the process with ``mallopt``, which works at any time (for the allocations after the call),
unlike the environment variables, which glibc reads only at process start; elsewhere it does nothing.
Trimming is switched off, not just raised: with a threshold of 2**31 - 1 (the largest positive
value), evaluating 16 episodes of 20-way at once, whose activations are about 1 GB a layer, still
returned and re-faulted memory every batch.
The CLI and :class:`metaloop.train.Trainer` call it; a Python script with its own training loop
should call it once, first thing. Measured by
``benchmarks/allocator.py`` (``benchmarks/results/allocator.json``, 2-core CPU): a ProtoNet
60-way training step 1.82x faster, an evaluation batch of 16 tasks of 20-way 1-shot 2.52x; prediction
(adapt + 100 queries) unchanged (1.01x).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Apply the settings; True when glibc accepted them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))  # -1: never trim
