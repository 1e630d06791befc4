"""The training data as one global sequence order that does not depend on the number of data-parallel ranks, so a
run resumed with another worker count continues exactly (:class:`GlobalBatches`).

The order is defined by the global batch ``G`` (sequences per optimizer step, fixed for a run): the data is split
into ``G`` *lanes*, lane ``l`` being the packed stream :class:`~shortened.data.packing.PackedStream` with
``rank=l, world_size=G`` (lanes split the source as ranks did: by shard when the shard count is a multiple of
``G``, else by document). Global sequence ``g`` is block ``g // G`` of lane ``g % G``, so optimizer step ``s``
trains sequences ``s·G … s·G + G − 1``: one block of every lane. Data-parallel rank ``r`` of ``W`` (``W`` divides
``G``) holds the ``G / W`` lanes ``r·G/W … (r+1)·G/W − 1`` and feeds them as ``grad_accum`` micro-batches of
``micro_batch_size`` rows. The cursor is per lane, so it does not care which rank held a lane: a checkpoint written
by ``W`` ranks restores on ``W'`` ranks (each reads the cursors of the lanes it now holds).

Cost: each lane is its own reader. Split by shard, a rank reads only its lanes' shards; split by document, every
lane reads every shard and keeps every ``G``-th document, so a rank parses the corpus ``G / W`` times (it tokenizes
only its own documents).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from shortened.data.config import DataConfig
from shortened.data.packing import PackedStream
from shortened.errors import ShortenedError

BATCHES_VERSION = 1
CURSOR_FILE = "data_cursor_rank{rank}.json"  # each rank's lanes, in a checkpoint


class GlobalBatches:
    """This rank's share of the global sequence order (see the module docstring).

    ``global_batch``: sequences per optimizer step across all ranks (``G``); ``micro_batch_size`` rows per
    micro-batch; ``world_size`` must divide ``G`` and ``micro_batch_size`` must divide ``G / world_size`` (else a
    :class:`ShortenedError` naming the numbers). :meth:`step_batches` gives one optimizer step's micro-batches:
    dicts of ``input_ids``, ``labels`` (and ``position_ids`` with ``cfg.document_positions``), LongTensor
    ``[micro_batch_size, seq_len]``, plus ``sequence`` (LongTensor ``[micro_batch_size]``: each row's global
    sequence index).
    """

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, global_batch: int,
                 micro_batch_size: int, rank: int = 0, world_size: int = 1):
        if global_batch < 1 or world_size < 1 or micro_batch_size < 1:
            raise ShortenedError(f"global batch {global_batch}, world size {world_size} and micro-batch size "
                                 f"{micro_batch_size} must each be at least 1")
        if global_batch % world_size:
            raise ShortenedError(f"a global batch of {global_batch} sequences cannot be split evenly over "
                                 f"{world_size} workers")
        per_rank = global_batch // world_size
        if per_rank % micro_batch_size:
            raise ShortenedError(f"{per_rank} sequences per worker per step are not a whole number of micro-batches "
                                 f"of {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ShortenedError(f"rank {rank} is not in a world of size {world_size}")
        self.cfg, self.global_batch, self.micro_batch_size = cfg, global_batch, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.lanes = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.streams = {lane: PackedStream(cfg, tokenizer, rank=lane, world_size=global_batch) for lane in self.lanes}
        self._iters: dict[int, Iterator[dict[str, torch.Tensor]]] | None = None

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on this rank."""
        return len(self.lanes) // self.micro_batch_size

    @property
    def steps(self) -> int:
        """Optimizer steps' worth of data taken so far (every lane advances one block per step)."""
        return self.streams[self.lanes[0]].blocks

    @property
    def epoch(self) -> int:
        """The furthest epoch any of this rank's lanes has reached."""
        return max((s.cursor.position.epoch if s.cursor.position else 0) for s in self.streams.values())

    def step_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The next optimizer step's ``grad_accum`` micro-batches, lazily (a lane's block is read when its
        micro-batch is asked for, so :meth:`state_dict` after the last one is the cursor of the next step)."""
        if self._iters is None:
            self._iters = {lane: iter(s) for lane, s in self.streams.items()}
        step = self.steps
        for first in range(0, len(self.lanes), self.micro_batch_size):
            lanes = self.lanes[first:first + self.micro_batch_size]
            items = [next(self._iters[lane]) for lane in lanes]
            batch = {k: torch.stack([x[k] for x in items]) for k in items[0]}
            batch["sequence"] = torch.tensor([step * self.global_batch + lane for lane in lanes], dtype=torch.long)
            yield batch

    # -- cursor -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON: this rank's lanes' cursors (each a :meth:`PackedStream.state_dict`), keyed by lane."""
        return {"version": BATCHES_VERSION, "global_batch": self.global_batch,
                "lanes": {str(lane): s.state_dict() for lane, s in self.streams.items()}}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from the cursors that the ranks of a checkpoint saved (one :meth:`state_dict` each, from any
        number of ranks): each lane of this rank takes its own. A cursor of a release before lanes (one
        :class:`PackedStream` cursor per rank) is the cursor of lane ``rank`` when its world size was ``G``.
        Raises :class:`ShortenedError` when the checkpoint's global batch differs or a lane is missing."""
        lanes: dict[int, dict] = {}
        for state in states:
            if "lanes" not in state:  # a per-rank PackedStream cursor
                lanes[int(state.get("rank", -1))] = state
                continue
            if state.get("global_batch") != self.global_batch:
                raise ShortenedError(f"data cursor was saved for a global batch of {state.get('global_batch')} "
                                     f"sequences, this run has {self.global_batch}; the data order is defined by it")
            lanes.update({int(k): v for k, v in state["lanes"].items()})
        missing = [lane for lane in self.lanes if lane not in lanes]
        if missing:
            raise ShortenedError(f"the checkpoint's data cursors hold lanes {sorted(lanes)}, not lanes {missing} "
                                 f"that rank {self.rank} of {self.world_size} reads (global batch "
                                 f"{self.global_batch})")
        for lane in self.lanes:
            self.streams[lane].load_state_dict(lanes[lane])
        steps = {self.streams[lane].blocks for lane in self.lanes}
        if len(steps) != 1:
            raise ShortenedError(f"the checkpoint's data cursors are at different steps ({sorted(steps)}): lanes "
                                 "advance together, one block per step")
        self._iters = None
