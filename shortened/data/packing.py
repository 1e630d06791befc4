"""Tokenize a rank's documents and pack them into fixed ``seq_len`` blocks (EOS between documents, no padding),
with a cursor that restores the stream at exactly the next token."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shortened.data.config import DataConfig
from shortened.data.formats import encode
from shortened.data.stream import DocumentStream, Position
from shortened.errors import ShortenedError

CURSOR_VERSION = 1
# A cursor only fits the stream it came from: these must match on restore.
_IDENTITY = ("source", "format", "seq_len", "rank", "world_size", "split_mode", "mixture", "shuffle_shards", "seed")


@dataclass(frozen=True)
class Cursor:
    """The next token: ``offset`` tokens into the document at ``position`` (None: the stream's start)."""

    position: Position | None = None
    offset: int = 0


class PackedStream(torch.utils.data.IterableDataset):
    """Blocks ``{"input_ids", "labels"}`` (LongTensor ``[seq_len]``) of one rank's share of ``cfg``'s stream;
    with ``cfg.document_positions`` also ``position_ids`` (LongTensor ``[seq_len]``: 0 at each document's first
    token and at the block's first token, counting up by one within a document; see :func:`document_positions`).

    :meth:`state_dict` after taking a block from the iterator is the cursor that a new stream, given it with
    :meth:`load_state_dict`, continues from with exactly the next block. Iterate it in the process that saves
    the cursor (``DataLoader(num_workers=0)`` or plain ``next``), so no block is read ahead.
    """

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.docs = DocumentStream(cfg, rank, world_size)
        self.cursor = Cursor()
        self.blocks = 0  # blocks emitted since the stream's start (restored from the cursor)

    @property
    def bad(self):
        return self.docs.bad

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        seq = self.cfg.seq_len
        start = self.cursor
        carry_ids = carry_labels = np.empty(0, dtype=np.int64)
        carry_starts = np.empty(0, dtype=np.int64)  # where documents start in the carry (indices into it)
        first = True
        for doc in self.docs.iter_from(start.position):
            ids, labels = encode(doc.record, self.cfg, self.tokenizer)
            skip = 0
            if first and start.position is not None:
                if _where(doc.position) != _where(start.position):
                    raise ShortenedError(f"data source {self.docs.source!r} changed since the cursor was saved: "
                                         f"expected a document at {_where(start.position)}, found "
                                         f"{_where(doc.position)}")
                skip = start.offset
            first = False
            doc_len = len(ids)
            buf_ids = np.concatenate([carry_ids, np.asarray(ids[skip:], dtype=np.int64)])
            buf_labels = (buf_ids if labels is ids and not len(carry_labels) else
                          np.concatenate([carry_labels, np.asarray(labels[skip:], dtype=np.int64)]))
            # a resumed document (skip > 0) continues one that started before the cursor: no start here
            starts = carry_starts if skip else np.append(carry_starts, len(carry_ids))
            n = len(buf_ids) // seq
            for b in range(n):
                block = slice(b * seq, (b + 1) * seq)
                left = len(buf_ids) - (b + 1) * seq  # all from this document: the carry is shorter than a block
                self.cursor = Cursor(doc.position, doc_len - left)
                self.blocks += 1
                item = {"input_ids": torch.from_numpy(buf_ids[block].copy()),
                        "labels": torch.from_numpy(buf_labels[block].copy())}
                if self.cfg.document_positions:
                    item["position_ids"] = torch.from_numpy(document_positions(starts - b * seq, seq))
                yield item
            carry_ids, carry_labels = buf_ids[n * seq:], buf_labels[n * seq:]
            carry_starts = starts[starts >= n * seq] - n * seq

    # -- cursor -------------------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        c, d = self.cfg, self.docs
        return {"source": d.source, "format": c.format, "seq_len": c.seq_len, "rank": d.rank,
                "world_size": d.world_size, "split_mode": d.split_mode, "mixture": c.mixture,
                "shuffle_shards": c.shuffle_shards, "seed": c.seed}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable cursor: the stream's identity, the next token's position, and blocks emitted."""
        pos = self.cursor.position
        return {"version": CURSOR_VERSION, **self._identity(), "position": pos.to_dict() if pos else None,
                "offset": self.cursor.offset, "blocks": self.blocks, "tokens": self.blocks * self.cfg.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved cursor; a clear error when it belongs to another stream."""
        if state.get("version") != CURSOR_VERSION:
            raise ShortenedError(f"data cursor version {state.get('version')!r} is not {CURSOR_VERSION}")
        mine = self._identity()
        for key in _IDENTITY:
            if state.get(key) != mine[key]:
                raise ShortenedError(f"data cursor was saved for {key}={state.get(key)!r}, but this stream has "
                                     f"{key}={mine[key]!r}; a cursor only resumes the same stream")
        pos = state["position"]
        self.cursor = Cursor(Position.from_dict(pos) if pos else None, int(state["offset"]))
        self.blocks = int(state["blocks"])


def document_positions(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Position ids ``[seq_len]`` (int64) of one block: ``starts`` are the indices (relative to the block; those
    outside ``[0, seq_len)`` are ignored) where documents begin. Positions count 0, 1, 2, … from each start and
    from the block's first token, which always restarts at 0 even mid-document: the earlier part of that document
    lies in another block the model cannot attend to, and flash-attention's varlen split needs every segment of
    the row (the first included) to begin at 0. Example: starts [3, 5], seq_len 7 -> [0, 1, 2, 0, 1, 0, 1]."""
    mark = np.zeros(seq_len, dtype=bool)
    mark[starts[(starts >= 0) & (starts < seq_len)]] = True
    mark[0] = True
    idx = np.arange(seq_len, dtype=np.int64)
    return idx - np.maximum.accumulate(np.where(mark, idx, 0))


def _where(p: Position) -> tuple:
    return p.epoch, p.shard, p.line, p.count, p.copy


def take(it: Iterator[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    """The next ``n`` blocks stacked into a batch ``[n, seq_len]``."""
    items = [next(it) for _ in range(n)]
    return {k: torch.stack([x[k] for x in items]) for k in items[0]}
