"""One rank's share of a document stream, with the position of every document so a read can resume exactly.

Ranks split the stream by whole shards when the shard count is a multiple of the world size (no rank reads
another's files), else by documents (every rank reads every shard and keeps every W-th good document). Hub
datasets are split by ``datasets.distributed.split_dataset_by_node``, which follows the same rule.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from shortened.data.config import DataConfig
from shortened.data.formats import is_empty, record_problem
from shortened.data.sources import BadLines, is_hub, open_hub, read_records, resolve_alias, resolve_shards
from shortened.errors import ShortenedError


@dataclass(frozen=True)
class Position:
    """Where a document starts: enough to re-open the stream at it."""

    epoch: int = 0
    shard: int = 0  # index into this rank's shard list for the epoch (file sources)
    line: int = 1  # the document's line in its shard (file sources)
    count: int = 0  # the document's index among the epoch's good documents (file) or this rank's records (hub)
    copy: int = 0  # which repetition under a mixture weight above 1
    hub_state: dict | None = None  # datasets' IterableDataset state just before this document

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        return cls(**d)


@dataclass(frozen=True)
class Document:
    record: dict
    key: str  # stable identity: ``shard-url:line`` or ``hf:name[rank]#n``
    position: Position


class DocumentStream:
    """Iterate one rank's documents (all epochs, or ``cfg.epochs``), each with its :class:`Position`.

    Construction resolves the source, so a missing path or an empty glob fails here, before any worker starts.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ShortenedError(f"rank {rank} is not in a world of size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.source = resolve_alias(cfg.source, cfg.split)
        self.bad = BadLines(self.source, cfg.max_bad_fraction)
        if is_hub(self.source):
            if cfg.shuffle_shards:
                raise ShortenedError(f"data source {self.source!r}: shuffle_shards applies to file sources only")
            self.shards, self.split_mode = None, "hub"
            return
        self.shards = resolve_shards(self.source, cfg.storage_options)
        n = len(self.shards.paths)
        mode = cfg.split_by
        if mode == "auto":
            mode = "shard" if n % world_size == 0 else "document"
        if mode == "shard" and n < world_size:
            raise ShortenedError(f"data source {self.source!r} has {n} shards, fewer than {world_size} ranks: "
                                 "use split_by: document")
        self.split_mode = mode

    def __iter__(self) -> Iterator[Document]:
        return self.iter_from(None)

    def iter_from(self, start: Position | None) -> Iterator[Document]:
        """Documents from ``start`` (inclusive) on; from the beginning when None."""
        if self.shards is None:
            return self._iter_hub(start)
        return self._iter_files(start)

    # -- file sources -------------------------------------------------------------------------------------------

    def rank_shards(self, epoch: int) -> list[str]:
        """This rank's shard paths for an epoch, in reading order."""
        paths = list(self.shards.paths)
        if self.cfg.shuffle_shards:
            paths = [paths[i] for i in np.random.default_rng([self.cfg.seed, epoch]).permutation(len(paths))]
        return paths[self.rank::self.world_size] if self.split_mode == "shard" else paths

    def _iter_files(self, start: Position | None) -> Iterator[Document]:
        cfg, w = self.cfg, self.world_size
        by_document = self.split_mode == "document"
        check = lambda record: record_problem(record, cfg)  # noqa: E731
        epoch = start.epoch if start else 0
        while cfg.epochs is None or epoch < cfg.epochs:
            paths = self.rank_shards(epoch)
            count = start.count if start else 0
            fresh, yielded = start is None, False
            for si in range(start.shard if start else 0, len(paths)):
                resume_line = start.line if start and si == start.shard else None
                for line, record in read_records(self.shards, paths[si], self.bad, start_line=resume_line or 1,
                                                 check=check, text_field=cfg.text_field):
                    if is_empty(record, cfg):
                        continue
                    index, count = count, count + 1
                    if by_document and index % w != self.rank:
                        continue
                    key = f"{self.shards.url(paths[si])}:{line}"
                    first_copy = start.copy if resume_line == line else 0
                    for copy in range(first_copy, self._copies(record, key, epoch)):
                        yielded = True
                        yield Document(record, key, Position(epoch, si, line, index, copy))
            # The bad share is checked from BadLines.min_lines lines on, and here at the end of the epoch: not at the
            # end of each shard, where a small first shard with one damaged line (or an empty shard) would stop a
            # corpus whose damage is well within max_bad_fraction.
            self.bad.check()
            if fresh and not yielded:
                raise ShortenedError(f"data source {self.source!r}: rank {self.rank} of {w} got no documents in "
                                     f"epoch {epoch} ({self._why_empty()})")
            start, epoch = None, epoch + 1

    # -- hub datasets -------------------------------------------------------------------------------------------

    def _iter_hub(self, start: Position | None) -> Iterator[Document]:
        from datasets.distributed import split_dataset_by_node

        cfg = self.cfg
        name = self.source[3:]
        epoch = start.epoch if start else 0
        while cfg.epochs is None or epoch < cfg.epochs:
            ds = open_hub(name, cfg.split, cfg.hub_options)
            if self.world_size > 1:
                ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
            count = 0
            if start is not None:
                ds.load_state_dict(start.hub_state)
                count = start.count
            fresh, yielded = start is None, False
            it = iter(ds)
            while True:
                state = ds.state_dict()
                try:
                    record = next(it)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types
                    # datasets' iterator is dead after an error, so a damaged file inside a hub dataset cannot be
                    # skipped and counted the way a file source's damage is: stop with a message, not a traceback.
                    raise ShortenedError(
                        f"hub dataset {name!r} (rank {self.rank}) failed after record #{count}: "
                        f"{type(exc).__name__}: {str(exc)[:300]}; if its files are damaged, read them as a file "
                        "source (path, glob or URL), which skips and counts damaged lines") from exc
                index, count = count, count + 1
                where = f"{self.source}[rank {self.rank}]#{index}"
                if not self.bad.accept(where, record_problem(record, cfg)) or is_empty(record, cfg):
                    continue
                first_copy = start.copy if start is not None and index == start.count else 0
                for copy in range(first_copy, self._copies(record, where, epoch)):
                    yielded = True
                    yield Document(record, where, Position(epoch, count=index, copy=copy, hub_state=state))
            self.bad.check()
            if fresh and not yielded:
                raise ShortenedError(f"data source {self.source!r}: rank {self.rank} of {self.world_size} got no "
                                     f"documents in epoch {epoch} ({self._why_empty()})")
            start, epoch = None, epoch + 1

    # -- mixture ------------------------------------------------------------------------------------------------

    def _copies(self, record: dict, key: str, epoch: int) -> int:
        """How many times this document is read this epoch: 1 without a mixture, else its set's weight, with
        the fractional part decided by a seeded hash of (seed, epoch, document) so it is the same on resume."""
        mixture = self.cfg.mixture
        if mixture is None:
            return 1
        weight = mixture.get(str(set_name(record, self.cfg.mixture_field)), 0.0)
        whole, frac = divmod(weight, 1.0)
        if frac:
            digest = hashlib.blake2b(f"{self.cfg.seed}:{epoch}:{key}".encode("utf-8", "surrogatepass"),
                                         digest_size=8).digest()
            whole += int.from_bytes(digest, "little") / 2**64 < frac
        return int(whole)

    def _why_empty(self) -> str:
        if self.cfg.mixture is not None:
            return f"does the mixture {self.cfg.mixture} name sets that exist in {self.cfg.mixture_field!r}?"
        if self.bad.lines == 0:
            return "no records"
        return f"{self.bad.bad} of {self.bad.lines} records were bad; fewer good documents than ranks?"


def set_name(record: dict, dotted: str) -> Any:
    """``record["meta"]["redpajama_set_name"]`` for ``"meta.redpajama_set_name"``; None when absent."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def iter_texts(source: str, *, split: str = "train", text_field: str = "text",
               max_bad_fraction: float = 0.01) -> Iterator[str]:
    """The text of every document of a source, once, in stream order (no ranks, no mixture)."""
    cfg = DataConfig(source=source, split=split, text_field=text_field, epochs=1, max_bad_fraction=max_bad_fraction)
    for doc in DocumentStream(cfg):
        yield doc.record[text_field]
