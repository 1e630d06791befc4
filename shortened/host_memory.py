"""Host memory that goes back to the operating system when a tensor is freed, for training phases that partition
their model state to save it (ZeRO-3, CPU offload).

glibc's ``malloc`` serves a block from its heap unless it is at least ``M_MMAP_THRESHOLD`` bytes, in which case it
gets a mapping of its own that ``free`` returns to the OS. The threshold starts at 128 KiB but rises to the size
of each mapped block that is freed (up to 32 MiB on 64-bit). A training worker frees many blocks of a few MiB (a
layer's weights cast while the model loads, DeepSpeed's flat partitions built and copied, ZeRO-3's gathered
parameters), so the threshold soon sits high, and later blocks of that size are cut from the heap, where freed
ones stay resident and fragment it. Measured on the 294M-parameter Llama of ``benchmarks/memory.py`` (ZeRO-3,
bf16, 2 Ray Train workers): a worker's peak RSS 4.39 GiB with glibc's defaults, 3.20 GiB with both thresholds
fixed at 128 KiB (3.47 GiB at 4 MiB), against 2.78 GiB of model state plus an idle worker.

The price is a fresh mapping, and its page faults, for every block of 128 KiB or more: CPU training of SmolLM2
(ZeRO-0, ``benchmarks/retrain.py``) runs ~25% slower with it (174 against 230 tokens/s). So the threshold is fixed
only where the partitioned memory is the point, phases under ZeRO-3 or with CPU offload (:func:`mmap_threshold`);
``$SHORTENED_MALLOC_MMAP_THRESHOLD`` sets it for every phase (bytes) or for none (0).

The thresholds hold for the whole process only when set as it starts (glibc reads ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` when its allocator initialises; a ``mallopt`` call later does not reach the arena of a
thread that has already allocated, such as Ray Train's training thread). So :func:`allocator_env` goes into the
environment of the Ray Train workers that :func:`shortened.training.retrain.retrain` starts for a phase, and
:func:`return_freed_host_memory` (``mallopt``) covers processes started by someone else (``torchrun``) from the
training loop's first step, before any model is loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from shortened.errors import ShortenedError

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # the same two, read at process start
DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial mmap threshold, kept fixed (ZeRO-3 and offload phases)
ENV = "SHORTENED_MALLOC_MMAP_THRESHOLD"  # bytes for every phase; 0: glibc's dynamic threshold for every phase


def mmap_threshold(zero_stage: int = 0, offload: bool = False) -> int:
    """The mmap threshold, in bytes, for a phase at ``zero_stage`` (``offload``: it offloads parameters or
    optimizer state to CPU memory); 0 means glibc's dynamic default. ``$SHORTENED_MALLOC_MMAP_THRESHOLD`` when set
    (the same for every phase); else 128 KiB under ZeRO-3 or with offload, 0 otherwise. Raises
    :class:`ShortenedError` naming the variable for a value that is not an integer >= 0."""
    raw = os.environ.get(ENV)
    if raw is None:
        return DEFAULT_THRESHOLD if zero_stage == 3 or offload else 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ShortenedError(f"{ENV}: expected a number of bytes >= 0 (0: keep glibc's dynamic threshold), "
                             f"got {raw!r}")
    return value


def allocator_env(threshold: int) -> dict[str, str]:
    """Environment variables for a worker process that glibc reads as it starts: its mmap and trim thresholds
    both at ``threshold`` bytes (from :func:`mmap_threshold`). Empty when it is 0, or when this environment already
    sets either glibc variable (the user's own choice is passed on as it is)."""
    if threshold == 0 or any(name in os.environ for name in GLIBC_ENV):
        return {}
    return dict.fromkeys(GLIBC_ENV, str(threshold))


def return_freed_host_memory(threshold: int) -> int | None:
    """Fix glibc's mmap and trim thresholds at ``threshold`` bytes (from :func:`mmap_threshold`) in this process
    with ``mallopt``, which also stops the mmap threshold's rise. Takes full effect in a process that has
    allocated little so far, from its main thread; workers that :func:`allocator_env` started have it already.

    Returns the mmap threshold in effect for this process, in bytes: glibc's ``MALLOC_MMAP_THRESHOLD_`` when the
    environment sets it (it rules: nothing is changed), else the one set here; None when glibc keeps its dynamic
    threshold (``threshold`` 0, or a C library without glibc's ``mallopt``: macOS, musl). The threshold glibc
    keeps for a worker started with :func:`allocator_env` is the same one, so it is reported alike."""
    if GLIBC_ENV[0] in os.environ:
        try:
            return int(os.environ[GLIBC_ENV[0]])
        except ValueError:
            return None  # glibc ignores it too
    if threshold == 0:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here: the host allocator's defaults are kept")
        return None
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1 or mallopt(M_TRIM_THRESHOLD, threshold) != 1:  # 1: success
        log.debug("mallopt refused a threshold of %d bytes: the host allocator's defaults are kept", threshold)
        return None
    return threshold
