"""Fault injection for tests (test-only): ``SHORTENED_FAULT="RANK:STEP:MARKER[:ACTION]"`` in a worker's
environment makes that rank fail once after that step (:func:`maybe_fail`), to test resume after a lost worker
or a lost node. Unset, it does nothing."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from shortened.cluster import node_id
from shortened.io import write_text_atomic

log = logging.getLogger(__name__)


def maybe_fail(rank: int, step: int) -> None:
    """Fault injection for tests: ``SHORTENED_FAULT="RANK:STEP:MARKER[:ACTION]"`` acts once on that rank after that
    step (the marker file records that it happened). ACTION ``kill`` (default) SIGKILLs the rank; ``hold`` writes
    the rank's pid and node into the marker and waits (up to 10 min) for the test to kill its node."""
    spec = os.environ.get("SHORTENED_FAULT")
    if not spec:
        return
    fault_rank, fault_step, rest = spec.split(":", 2)
    marker, _, action = rest.partition(":")
    if rank != int(fault_rank) or step != int(fault_step) or os.path.exists(marker):
        return
    if action == "hold":
        write_text_atomic(marker, json.dumps({"pid": os.getpid(), "node": node_id(), "step": step}), parents=False)
        log.warning("fault injection: rank %d (pid %d) holds after step %d for its node to be killed", rank,
                    os.getpid(), step)
        time.sleep(600)
        return
    Path(marker).touch()
    log.warning("fault injection: killing rank %d (pid %d) after step %d", rank, os.getpid(), step)
    os.kill(os.getpid(), signal.SIGKILL)
