"""The token audit log (``train.token_log``, for tests): each rank appends a hash of every micro-batch it trains
on, beside the phase's output folder (:func:`log_tokens`); :func:`trained_tokens` reads back which batch each
(step, micro-batch) finally trained on, so a resumed run can be compared with an uninterrupted one."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from shortened import cluster

_node_id = functools.lru_cache(maxsize=1)(cluster.node_id)  # asked once per micro-batch by the token log


def token_log_path(out: str | Path) -> Path:
    """The log's path prefix for the phase exported to ``out``: ``.NAME.tokens`` beside it (one
    ``.rankR.jsonl`` file per rank)."""
    out = Path(out)
    return out.parent / f".{out.name}.tokens"


def log_tokens(path: Path, rank: int, step: int, micro: int, ids: torch.Tensor) -> None:
    """Audit log: which tokens each (step, micro-batch) of this rank trained on; a redone step appends again."""
    digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]
    with open(f"{path}.rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "micro": micro, "sha": digest, "node": _node_id()}) + "\n")


def trained_tokens(out: str | Path, world_size: int) -> dict[int, dict[tuple[int, int], str]]:
    """From a run's token log: per rank, the batch each (step, micro) finally trained on (last attempt wins)."""
    result = {}
    for rank in range(world_size):
        final: dict[tuple[int, int], str] = {}
        for line in open(f"{token_log_path(out)}.rank{rank}.jsonl"):
            e = json.loads(line)
            final[(e["step"], e["micro"])] = e["sha"]
        result[rank] = final
    return result
