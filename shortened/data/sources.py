"""Read documents from a corpus: a file, a folder or glob of shards (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``,
``.json.gz``, ``.txt``), the offline SlimPajama sample (``slimpajama-sample``), or a hub dataset (``hf:NAME``)."""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import zstandard

from shortened.errors import ShortenedError
from shortened.paths import shared_data_dir

log = logging.getLogger(__name__)

SLIMPAJAMA_SAMPLE = "slimpajama-sample"
SLIMPAJAMA_HUB = "hf:cerebras/SlimPajama-627B"
SHARD_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.gz", ".txt", ".zst")


def resolve_alias(source: str, split: str = "train") -> str:
    """``slimpajama-sample`` is the offline sample when present, else SlimPajama-627B on the hub."""
    if source == SLIMPAJAMA_SAMPLE:
        data = shared_data_dir()
        if data is not None and (data / SLIMPAJAMA_SAMPLE / split).is_dir():
            return str(data / SLIMPAJAMA_SAMPLE / split)
        return SLIMPAJAMA_HUB
    return source


def list_shards(source: str) -> list[Path]:
    """The shard files of a local source in a stable order; a clear error when there are none."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
        if not files:
            raise ShortenedError(f"data source {source!r}: folder has no {', '.join(SHARD_SUFFIXES)} files")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise ShortenedError(f"data source {source!r}: the glob matches no file")
        return files
    raise ShortenedError(f"data source {source!r} does not exist")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(path.open("rb")), encoding="utf-8")
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open(encoding="utf-8")


def iter_file_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one shard: a JSON line's ``text_field``, or the whole of a ``.txt`` file."""
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError):
                log.warning("%s line %d: not a JSON object with %r; skipped", path, lineno, text_field)
                continue
            if isinstance(text, str) and text:
                yield text


def iter_texts(source: str, *, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Stream documents' text from any supported source, in a stable order."""
    source = resolve_alias(source, split)
    if source.startswith("hf:"):
        yield from _iter_hub(source[3:], split, text_field)
        return
    for shard in list_shards(source):
        yield from iter_file_texts(shard, text_field)


def _iter_hub(name: str, split: str, text_field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:
        raise ShortenedError(f"hub dataset {name!r} (split {split!r}) could not be opened: {exc}") from exc
    for row in ds:
        text = row.get(text_field)
        if isinstance(text, str) and text:
            yield text
