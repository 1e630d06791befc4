"""The token audit log (``train.token_log``, for tests): each rank appends a hash of every micro-batch it trains
on, and of each of its sequences with the sequence's global index, beside the phase's output folder
(:func:`log_tokens`); :func:`trained_tokens` reads back which batch each (step, micro-batch) finally trained on, and
:func:`trained_sequences` every sequence trained in the order trained, so a resumed run (also one resumed with
another worker count) can be compared with an uninterrupted one."""

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


def log_tokens(path: Path, rank: int, step: int, micro: int, ids: torch.Tensor, *,
               sequences: torch.Tensor | None = None, world_size: int | None = None,
               started_at: int | None = None) -> None:
    """Audit log: which tokens each (step, micro-batch) of this rank trained on; a redone step appends again.
    ``ids``: ``[micro_batch, seq_len]``; ``sequences``: each row's global sequence index (``[micro_batch]``),
    logged with a hash of each row (``seqs``, ``seq_sha``); ``world_size`` and ``started_at`` (the step this worker
    started or resumed at) tell the attempts of a run apart."""
    digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]
    entry = {"step": step, "micro": micro, "sha": digest, "node": _node_id()}
    if sequences is not None:
        entry.update(seqs=[int(g) for g in sequences], seq_sha=[_sha(row) for row in ids])
    if world_size is not None:
        entry.update(world_size=world_size, started_at=started_at)
    with open(f"{path}.rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def _sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]


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


def trained_sequences(out: str | Path) -> list[dict]:
    """Every micro-batch row of a run's token log, from every rank's file, in the order trained (attempt, then
    step, micro-batch and row): ``{"seq": global index, "sha", "step", "rank", "world_size", "started_at"}``. An
    attempt is a worker group's life (the same ``started_at`` and ``world_size``); a redone step appears again."""
    rows = []
    for f in sorted(Path(token_log_path(out)).parent.glob(f"{token_log_path(out).name}.rank*.jsonl")):
        rank = int(f.name.rsplit(".rank", 1)[1].split(".")[0])
        for n, line in enumerate(open(f)):
            e = json.loads(line)
            for g, sha in zip(e.get("seqs", []), e.get("seq_sha", [])):
                rows.append({"seq": g, "sha": sha, "step": e["step"], "micro": e["micro"], "rank": rank,
                             "world_size": e.get("world_size"), "started_at": e.get("started_at"), "line": n})
    return sorted(rows, key=lambda r: (r["started_at"] or 0, r["step"], r["seq"]))
