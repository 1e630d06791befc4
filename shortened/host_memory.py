"""Host memory that goes back to the operating system when a tensor is freed, for training phases that partition
their model state to save it (ZeRO-3, CPU offload).

glibc's ``malloc`` serves a block from its heap unless it is at least ``M_MMAP_THRESHOLD`` bytes, in which case it
gets a mapping of its own that ``free`` returns to the OS. The threshold starts at 128 KiB but rises to the size
of each mapped block that is freed (up to 32 MiB on 64-bit). A training worker frees many blocks of a few MiB (a
layer's weights cast while the model loads, DeepSpeed's flat partitions built and copied, ZeRO-3's gathered
parameters), so the threshold soon sits high, and later blocks of that size are cut from the heap, where freed
ones stay resident and fragment it. Measured on the 294M-parameter Llama of ``benchmarks/memory.py`` (ZeRO-3,
bf16, 2 Ray Train workers): a worker's peak RSS 4.46 GiB with glibc's defaults, 3.21 GiB with both thresholds
fixed at 128 KiB (3.49 GiB at 4 MiB), against 2.78 GiB of model state plus an idle worker.

The price is a fresh mapping, and its page faults, for every block of 128 KiB or more: CPU training of SmolLM2
(ZeRO-0, ``benchmarks/retrain.py --skip-heal``) runs 20-25% slower with it (174 against 219-230 tokens/s). So the threshold is fixed
only where the partitioned memory is the point, phases under ZeRO-3 or with CPU offload (:func:`mmap_threshold`);
``$SHORTENED_MALLOC_MMAP_THRESHOLD`` sets it for every phase (bytes) or for none (0).

The driver decides each phase's threshold once (:func:`mmap_threshold`, from its environment and the phase) and
hands it to the Ray Train workers it starts (:func:`allocator_env`): glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_``, read as the worker process starts, so they hold from its first allocation, and
``$SHORTENED_MALLOC_MMAP_THRESHOLD`` set to the decision, which the training loop reads again. Measured in a Ray Train
worker (a profile of the same run), the variables at process start gave a 3.20 GiB peak where a ``mallopt`` call at
the start of the training loop left 4.50 GiB (the worker had allocated for a while by then). The loop's :func:`return_freed_host_memory`
(``mallopt``) is for processes started by someone else (``torchrun``). glibc cannot go back to its dynamic
threshold once it is fixed, so a process keeps the first threshold set in it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Mapping

from shortened.errors import ShortenedError

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # the same two, read at process start
FIXED_THRESHOLD = 128 * 1024  # glibc's initial mmap threshold, kept fixed (ZeRO-3 and offload phases)
MAX_THRESHOLD = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
ENV = "SHORTENED_MALLOC_MMAP_THRESHOLD"  # bytes for every phase; 0: glibc's dynamic threshold for every phase
_fixed_here: int | None = None  # what return_freed_host_memory set in this process (it cannot be undone)


def is_glibc() -> bool:
    """Whether this process runs on glibc, whose allocator these settings are for."""
    return platform.libc_ver()[0] == "glibc"


def mmap_threshold(zero_stage: int = 0, offload: bool = False, env: Mapping[str, str] | None = None) -> int:
    """The mmap threshold, in bytes, for a phase at ``zero_stage`` (``offload``: it offloads parameters or
    optimizer state to CPU memory); 0 means glibc's dynamic default. ``$SHORTENED_MALLOC_MMAP_THRESHOLD`` in
    ``env`` (default: this process's environment) when set, the same for every phase; else 128 KiB under ZeRO-3 or
    with offload, 0 otherwise. Raises :class:`ShortenedError` naming the variable for a value that is not an
    integer from 0 to 32 MiB (glibc's largest)."""
    raw = (os.environ if env is None else env).get(ENV, "").strip()
    if not raw:
        return FIXED_THRESHOLD if zero_stage == 3 or offload else 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_THRESHOLD:
        raise ShortenedError(f"{ENV}: expected a number of bytes from 0 (keep glibc's dynamic threshold) to "
                             f"{MAX_THRESHOLD} (glibc's largest), got {raw!r}")
    return value


def forwarded_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The host-memory variables of ``env`` (default: this process's environment) that the processes a driver
    starts must see for it to decide as it would (a sweep's trials): ``$SHORTENED_MALLOC_MMAP_THRESHOLD`` (checked
    here) and glibc's two. Empty when none is set."""
    env = os.environ if env is None else env
    mmap_threshold(env=env)
    return {name: env[name] for name in (ENV, *GLIBC_ENV) if name in env}


def allocator_env(threshold: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a phase's worker processes, with the ``threshold`` the driver decided
    (:func:`mmap_threshold`): ``$SHORTENED_MALLOC_MMAP_THRESHOLD`` set to it (the training loop reads it again), and
    glibc's mmap and trim thresholds at it, read as the process starts. glibc's variables the driver's ``env``
    (default: its environment) sets itself are passed on as they are instead; none are set for 0 or off glibc."""
    env = os.environ if env is None else env
    own = {name: env[name] for name in GLIBC_ENV if name in env}
    if own or threshold == 0 or not is_glibc():
        return {ENV: str(threshold), **own}
    return {ENV: str(threshold), **dict.fromkeys(GLIBC_ENV, str(threshold))}


def return_freed_host_memory(threshold: int) -> int | None:
    """Fix glibc's mmap and trim thresholds at ``threshold`` bytes (from :func:`mmap_threshold`) in this process
    with ``mallopt``, which also stops the mmap threshold's rise. Full effect only in a process that has allocated
    little so far; workers started with :func:`allocator_env` have it from their start.

    Returns the mmap threshold in effect for this process, in bytes: glibc's ``MALLOC_MMAP_THRESHOLD_`` when the
    environment sets it, or either glibc variable is set (they rule: nothing is changed); the one an earlier call
    fixed (it stays); else the one set here. None when glibc keeps its dynamic threshold: ``threshold`` 0, or not
    glibc (macOS, musl)."""
    global _fixed_here
    if not is_glibc():
        return None
    if any(name in os.environ for name in GLIBC_ENV):
        try:
            return int(os.environ.get(GLIBC_ENV[0], ""))
        except ValueError:
            return None  # only the trim threshold is set: the mmap threshold stays dynamic
    if _fixed_here is not None or threshold == 0:
        return _fixed_here
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: the host allocator's defaults are kept")
        return None
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1 or mallopt(M_TRIM_THRESHOLD, threshold) != 1:  # 1: success
        log.debug("mallopt refused a threshold of %d bytes: the host allocator's defaults are kept", threshold)
        return None
    _fixed_here = threshold
    return threshold
