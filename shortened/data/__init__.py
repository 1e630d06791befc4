"""Data layer: streamed, rank-split, resumable training data (text corpora and Alpaca instructions), packed into
fixed-length blocks, and seeded calibration windows for the pruning criteria.

- :mod:`~shortened.data.config`: :class:`DataConfig`, what to read and how.
- :mod:`~shortened.data.sources`: shard files on any fsspec filesystem or a hub dataset; damaged input (bad lines,
  corrupt, truncated or empty shards) skipped and counted once, within ``max_bad_fraction``.
- :mod:`~shortened.data.stream`: one rank's documents, each with a resumable :class:`Position`.
- :mod:`~shortened.data.formats`: a record to ``(input_ids, labels)``; Alpaca prompts masked.
- :mod:`~shortened.data.packing`: :class:`PackedStream`, ``seq_len`` blocks with an exact cursor.
- :mod:`~shortened.data.batches`: :class:`GlobalBatches`, the training's global sequence order, the same for any
  number of ranks (lanes of packed streams), so a run resumes exactly on another worker count.
- :mod:`~shortened.data.calibration`: ``n_samples × seq_len`` windows for scoring.
"""

from shortened.data.batches import GlobalBatches
from shortened.data.config import DataConfig
from shortened.data.packing import PackedStream, take
from shortened.data.stream import DocumentStream, iter_texts

__all__ = ["DataConfig", "DocumentStream", "GlobalBatches", "PackedStream", "iter_texts", "take"]
