"""Where documents come from: shard files on any fsspec filesystem (local, s3://, gs://…) or a hub dataset.

Shard files are JSON lines (``.jsonl``, optionally ``.zst``/``.gz``), JSON arrays (``.json``, e.g. Alpaca's
``alpaca_data.json``) or plain ``.txt`` (one document per file). Lines that are not JSON objects, and corrupt
compressed data, are skipped and counted in :class:`BadLines`, which stops the read above a set share.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import zstandard
from fsspec.implementations.local import LocalFileSystem

from shortened.data.config import SLIMPAJAMA_HUB, SLIMPAJAMA_SAMPLE
from shortened.errors import ShortenedError
from shortened.paths import shared_data_dir

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json", ".json.gz", ".json.zst", ".txt", ".zst")
_GLOB_CHARS = "*?["


def resolve_alias(source: str, split: str = "train") -> str:
    """``slimpajama-sample`` is the offline sample's ``split`` folder when present, else SlimPajama-627B."""
    if source == SLIMPAJAMA_SAMPLE:
        data = shared_data_dir()
        if data is not None and (data / SLIMPAJAMA_SAMPLE / split).is_dir():
            return str(data / SLIMPAJAMA_SAMPLE / split)
        return SLIMPAJAMA_HUB
    return source


def is_hub(source: str) -> bool:
    return source.startswith("hf:")


@dataclass(frozen=True)
class ShardSet:
    """The shard files of a source, in a stable (sorted) order, on one filesystem."""

    source: str
    fs: Any
    paths: tuple[str, ...]

    def url(self, path: str) -> str:
        return path if isinstance(self.fs, LocalFileSystem) else self.fs.unstrip_protocol(path)


def resolve_shards(source: str, storage_options: dict | None = None) -> ShardSet:
    """List a local or remote source's shards; a clear error for a missing path, an empty glob or folder."""
    url = source if "://" in source else os.path.expanduser(source)
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:  # e.g. "Install s3fs to access S3"
        raise ShortenedError(f"data source {source!r}: {exc} (pip install s3fs / gcsfs / adlfs)") from exc
    except ValueError as exc:
        raise ShortenedError(f"data source {source!r}: {exc}") from exc
    try:
        if any(ch in path for ch in _GLOB_CHARS):
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not paths:
                raise ShortenedError(f"data source {source!r}: the glob matches no file")
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if p.endswith(SHARD_SUFFIXES))
            if not paths:
                raise ShortenedError(f"data source {source!r}: folder has no {', '.join(SHARD_SUFFIXES)} files")
        elif fs.isfile(path):
            paths = [path]
        else:
            raise ShortenedError(f"data source {source!r} does not exist")
    except (PermissionError, OSError) as exc:
        raise ShortenedError(f"data source {source!r} cannot be listed: {exc}") from exc
    return ShardSet(source, fs, tuple(paths))


@dataclass
class BadLines:
    """Counts the lines read and the bad ones skipped; raises once the bad share exceeds ``max_fraction``.

    The share is checked continuously from ``min_lines`` lines on, and at the end of every shard.
    """

    source: str
    max_fraction: float
    min_lines: int = 1000
    max_warnings: int = 20
    lines: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)

    def ok(self) -> None:
        self.lines += 1

    def skip(self, where: str, why: str) -> None:
        self.lines += 1
        self.bad += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {why}")
        if self.bad <= self.max_warnings:
            log.warning("%s: %s; skipped (%d bad so far)", where, why, self.bad)
        elif self.bad % 1000 == 0:
            log.warning("%s: %d bad lines skipped so far", self.source, self.bad)
        if self.lines >= self.min_lines:
            self.check()

    def accept(self, where: str, problem: str | None) -> bool:
        """Count a record: bad (skipped, with ``problem`` as the reason) or good."""
        if problem:
            self.skip(where, problem)
            return False
        self.ok()
        return True

    def check(self) -> None:
        if self.lines and self.bad / self.lines > self.max_fraction:
            raise ShortenedError(
                f"data source {self.source!r}: {self.bad} of {self.lines} lines read were bad "
                f"({100 * self.bad / self.lines:.1f}%), above max_bad_fraction={self.max_fraction}; "
                f"first: {'; '.join(self.examples)}")


class ZstdFrames(io.RawIOBase):
    """Decompress a zstd stream frame by frame; a corrupt or truncated frame is skipped to the next frame's magic
    number and recorded in ``errors``, so one bad frame costs its own lines, not the rest of the shard."""

    MAGIC = b"\x28\xb5\x2f\xfd"
    CHUNK = 1 << 20

    def __init__(self, raw: io.IOBase):
        super().__init__()
        self.raw, self.dctx = raw, zstandard.ZstdDecompressor()
        self.frame = self.dctx.decompressobj()
        self.in_frame = False  # bytes of the current frame have been fed
        self.pending, self.out, self.eof = b"", b"", False
        self.errors: list[str] = []

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self.out and not self.eof:
            self._step()
        n = min(len(buf), len(self.out))
        buf[:n] = self.out[:n]
        self.out = self.out[n:]
        return n

    def _step(self) -> None:
        data, self.pending = self.pending or self.raw.read(self.CHUNK), b""
        if not data:
            if self.in_frame:
                self.errors.append("truncated zstd frame at the end of the file")
            self.eof = True
            return
        try:
            self.out = self.frame.decompress(data)
            self.in_frame = True
        except zstandard.ZstdError as exc:
            self.errors.append(f"corrupt zstd frame ({exc})")
            self._resync(data)
            return
        if self.frame.eof:
            self.pending, self.frame, self.in_frame = self.frame.unused_data, self.dctx.decompressobj(), False

    def _resync(self, data: bytes) -> None:
        """Drop bytes up to the next frame magic (not the one the failing chunk may start with)."""
        self.frame, self.in_frame = self.dctx.decompressobj(), False
        data = data[1:]
        while data:
            at = data.find(self.MAGIC)
            if at >= 0:
                self.pending = data[at:]
                return
            tail = data[-(len(self.MAGIC) - 1):]
            more = self.raw.read(self.CHUNK)
            data = tail + more if more else b""
        self.eof = True

    def close(self) -> None:
        self.raw.close()
        super().close()


_CORRUPT = (zstandard.ZstdError, gzip.BadGzipFile, EOFError, zlib.error)


def _open_binary(fs, path: str):
    raw = fs.open(path, "rb")
    name = path.lower()
    if name.endswith(".zst"):
        return io.BufferedReader(ZstdFrames(raw), buffer_size=1 << 16)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def read_records(shards: ShardSet, path: str, bad: BadLines, *, start_line: int = 1,
                 check: Check | None = None, text_field: str = "text") -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for the good records of one shard, from ``start_line`` on (1-based).

    Lines before ``start_line`` are skipped without parsing (to resume). ``check`` says why a JSON object is
    unusable (counted as bad) or returns None. A ``.txt`` file is one record ``{text_field: ...}`` at line 1; a
    ``.json`` file is an array of records numbered from 1.
    """
    url = shards.url(path)
    name = path.lower()
    if name.endswith(".txt"):
        if start_line <= 1:
            with shards.fs.open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
            bad.ok()
            yield 1, {text_field: text}
        return
    if name.endswith((".json", ".json.gz", ".json.zst")):
        yield from _read_json_array(shards, path, url, bad, start_line, check)
        return
    lineno = 0
    try:
        with _open_binary(shards.fs, path) as f:
            frames = getattr(f, "raw", None)
            errors = frames.errors if isinstance(frames, ZstdFrames) else []
            seen = 0
            for lineno, line in enumerate(f, 1):
                for err in errors[seen:]:  # the skipped frame's lines are gone; the line joining it is bad JSON
                    if lineno >= start_line:  # (already counted before a resume point)
                        bad.skip(f"{url}:{lineno}", f"{err}, skipped to the next frame")
                seen = len(errors)
                if lineno < start_line or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    bad.skip(f"{url}:{lineno}", f"not JSON ({exc.__class__.__name__}: {str(exc)[:80]})")
                    continue
                if bad.accept(f"{url}:{lineno}", _problem(record, check)):
                    yield lineno, record
            for err in errors[seen:]:
                bad.skip(f"{url}:{lineno + 1}", err)
    except _CORRUPT as exc:
        bad.skip(f"{url}:{lineno + 1}", f"corrupt compressed data ({exc}); the rest of this shard is skipped")


def _problem(record: Any, check: Check | None) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    return check(record) if check else None


def _read_json_array(shards: ShardSet, path: str, url: str, bad: BadLines, start: int,
                     check: Check | None) -> Iterator[tuple[int, dict]]:
    try:
        with _open_binary(shards.fs, path) as f:
            data = json.load(f)
    except (ValueError, *_CORRUPT) as exc:
        raise ShortenedError(f"{url}: not a JSON array of records ({exc})") from exc
    if not isinstance(data, list):
        raise ShortenedError(f"{url}: expected a JSON array of records, got a {type(data).__name__}")
    for i, record in enumerate(data, 1):
        if i < start:
            continue
        if bad.accept(f"{url}:[{i}]", _problem(record, check)):
            yield i, record


def open_hub(name: str, split: str, options: dict | None = None):
    """A streaming ``datasets.IterableDataset`` (``NAME`` or ``NAME:CONFIG``); a clear error when it can't open."""
    import datasets

    options = dict(options or {})
    if ":" in name and "name" not in options:
        name, options["name"] = name.split(":", 1)
    try:
        return datasets.load_dataset(name, split=split, streaming=True, **options)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise ShortenedError(f"hub dataset {name!r} (split {split!r}) could not be opened: {exc}") from exc
