"""Where documents come from: shard files on any fsspec filesystem (local, s3://, gs://…) or a hub dataset.

Shard files are JSON lines (``.jsonl``, optionally ``.zst``/``.gz``), JSON arrays (``.json``, e.g. Alpaca's
``alpaca_data.json``) or plain ``.txt`` (one document per file). Damaged input -- lines that are not UTF-8, not
JSON objects or hold invalid Unicode (lone surrogate escapes), corrupt or truncated compressed data, empty files --
is skipped and counted in :class:`BadLines`, which stops the read above a set share; :func:`read_records` says
exactly what each kind of damage costs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
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

    A line is a record (a JSON line, an element of a JSON array, a ``.txt`` file); blank lines are not counted. A
    damaged stretch of a shard (a corrupt or truncated compressed frame, an empty file) counts as one bad line, so
    damage is counted once and the share stays the share of input lost (see :func:`read_records`). The share is
    checked continuously from ``min_lines`` lines on, and by the reader at the end of a full pass (an epoch).
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


class DecodedStream(io.RawIOBase):
    """The decompressed bytes of a shard, decoded one frame (zstd) or member (gzip) at a time.

    A corrupt frame is skipped to the next frame's magic number and a truncated one ends the stream; either way the
    data decoded before the damage is kept and the damage is recorded in ``gaps`` as ``(offset, why)``, where
    ``offset`` is how many decompressed bytes precede it. :func:`read_records` turns each gap into exactly one bad
    line. ``raw_bytes`` counts the compressed bytes read, so an empty (0-byte) file is told apart from a valid
    stream that holds no data. Input is fed in small chunks because a decoder error discards what that call had
    decoded: the chunk bounds the good data lost next to a corrupt block.
    """

    MAGIC = b""
    NAME = ""
    CHUNK = 1 << 14
    ERRORS: tuple[type[Exception], ...] = ()

    def __init__(self, raw: io.IOBase):
        super().__init__()
        self.raw = raw
        self.dec = self._new()
        self.in_frame = False  # bytes of the current frame have been fed
        self.pending, self.out, self.pos, self.eof = b"", b"", 0, False
        self.produced = 0  # decompressed bytes so far (handed out or in ``out``)
        self.raw_bytes = 0
        self.frame_start = 0  # where the current frame starts in the file
        self.gaps: list[tuple[int, str]] = []

    # -- codec --------------------------------------------------------------------------------------------------

    def _new(self):
        raise NotImplementedError

    def _finished(self) -> bool:
        return self.dec.eof

    def _unused(self) -> bytes:
        return self.dec.unused_data

    def _between_frames(self, data: bytes) -> bytes:
        """Bytes that may sit between frames and are not data (gzip's zero padding)."""
        return data

    # -- io -----------------------------------------------------------------------------------------------------

    @property
    def errors(self) -> list[str]:
        return [why for _, why in self.gaps]

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.pos >= len(self.out) and not self.eof:
            self._step()
        n = min(len(buf), len(self.out) - self.pos)
        buf[:n] = self.out[self.pos:self.pos + n]
        self.pos += n
        return n

    def _read_raw(self) -> bytes:
        data = self.raw.read(self.CHUNK)
        self.raw_bytes += len(data)
        return data

    def _step(self) -> None:
        data, self.pending = self.pending or self._read_raw(), b""
        if not self.in_frame and data:
            data = self._between_frames(data)
            if not data:
                return
        if not data:
            if self.in_frame:  # the file ends inside a frame; another may start inside it (a cut write, then more)
                self.gaps.append((self.produced, f"truncated {self.NAME} at the end of the file"))
                if self._rescan(self.frame_start + 1):
                    self.gaps[-1] = (self.produced, f"truncated {self.NAME} (the next one starts inside it)")
                    return
            self.eof = True
            return
        if not self.in_frame:
            self.frame_start = self.raw_bytes - len(data)  # ``data`` is always the tail of the bytes read so far
        try:
            out = self.dec.decompress(data)
        except self.ERRORS as exc:
            self.gaps.append((self.produced, f"corrupt {self.NAME} ({exc})"))
            self._resync(data)
            return
        self.in_frame = True
        self.out, self.pos = out, 0
        self.produced += len(out)
        if self._finished():
            self.pending, self.dec, self.in_frame = self._unused(), self._new(), False

    def _resync(self, data: bytes) -> bool:
        """Drop bytes up to the next frame magic (not the one the failing chunk may start with); False at the end."""
        self.dec, self.in_frame = self._new(), False
        data = data[1:] or self._read_raw()
        while data:
            at = data.find(self.MAGIC)
            if at >= 0:
                self.pending = data[at:]
                return True
            tail = data[-(len(self.MAGIC) - 1):]
            more = self._read_raw()
            data = tail + more if more else b""
        self.eof = True
        return False

    def _rescan(self, offset: int) -> bool:
        """Look for a frame magic from ``offset`` of the file on (seekable files only); True when one is found.
        Decoding resumes there, after the frame that ran to the end of the file."""
        try:
            self.raw.seek(offset)
        except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
            return False
        self.raw_bytes = offset
        return self._resync(b"\0")

    def close(self) -> None:
        self.raw.close()
        super().close()


class ZstdFrames(DecodedStream):
    """A zstd stream of one or more frames (skippable frames included), with any window size zstd allows: frames
    written with a long window (``--long``, window_log up to 31) are valid and need the decoder's limit raised."""

    MAGIC = b"\x28\xb5\x2f\xfd"
    NAME = "zstd frame"
    ERRORS = (zstandard.ZstdError,)

    def _new(self):
        # One decompressor per stream: a decompressobj works in its decompressor's context, so two shards open at
        # once (interleaved streams) must not share one.
        if not hasattr(self, "dctx"):
            self.dctx = zstandard.ZstdDecompressor(max_window_size=1 << zstandard.WINDOWLOG_MAX)
        return self.dctx.decompressobj()


class GzipMembers(DecodedStream):
    """A gzip stream of one or more members (as ``cat a.gz b.gz`` writes), zero padding between them allowed."""

    MAGIC = b"\x1f\x8b\x08"
    NAME = "gzip member"
    ERRORS = (zlib.error,)

    def _new(self):
        return zlib.decompressobj(wbits=31)

    def _between_frames(self, data: bytes) -> bytes:
        return data.lstrip(b"\0")


def _open_binary(fs, path: str) -> tuple[io.IOBase, DecodedStream | None]:
    """The shard's (decompressed) bytes, and the decoder whose ``gaps`` and ``raw_bytes`` tell its damage."""
    raw = fs.open(path, "rb")
    name = path.lower()
    for suffix, codec in ((".zst", ZstdFrames), (".gz", GzipMembers)):
        if name.endswith(suffix):
            dec = codec(raw)
            return io.BufferedReader(dec, buffer_size=1 << 16), dec
    return raw, None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
EMPTY_FILE = "empty file (0 bytes)"


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where a parsed JSON value holds a lone UTF-16 surrogate (``"\\ud83d"`` without its pair: valid JSON, but not
    Unicode, so no UTF-8 encoder or tokenizer takes it), as a path like ``text`` or ``meta.title``; None if nowhere."""
    if isinstance(value, str):
        return (path or "the value") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _SURROGATE.search(key):
                return f"a key of {path or 'the object'}"
            found = lone_surrogate(item, f"{path}.{key}" if path else key)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, f"{path}[{i}]")
            if found:
                return found
    return None


def parse_line(line: bytes) -> tuple[Any, str | None]:
    """``(record, None)`` for a JSON line of valid UTF-8 and valid Unicode; ``(None, why)`` otherwise."""
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc})"
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, f"not JSON ({exc.__class__.__name__}: {str(exc)[:80]})"
    if _SURROGATE_ESCAPE.search(line):  # only an escape can put a surrogate in a str decoded from strict UTF-8
        try:
            where = lone_surrogate(record)
        except RecursionError:
            return None, "not JSON (nested too deeply)"
        if where:
            return None, f"invalid Unicode (a lone UTF-16 surrogate escape in {where!r})"
    return record, None


Check = Callable[[dict], "str | None"]


def read_records(shards: ShardSet, path: str, bad: BadLines, *, start_line: int = 1,
                 check: Check | None = None, text_field: str = "text") -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for the good records of one shard, from ``start_line`` on (1-based).

    Lines before ``start_line`` are skipped without parsing (to resume). ``check`` says why a JSON object is
    unusable (counted as bad) or returns None. A ``.txt`` file is one record ``{text_field: ...}`` at line 1; a
    ``.json`` file is an array of records numbered from 1.

    Damage costs exactly what it destroys, and is counted once in ``bad``, so the share checked against
    ``max_bad_fraction`` is the share of input lost:

    - a line that is not UTF-8, not JSON, holds a lone surrogate escape (``"\\ud83d"``: valid JSON, invalid Unicode
      that no tokenizer takes) or fails ``check``: that line; the lines after it are read;
    - a corrupt zstd frame or gzip member: one bad line where the data is missing; the lines decoded before it are
      kept and reading resumes at the next frame or member (a line cut in two by the gap is that one bad line);
    - a truncated ``.zst``/``.gz`` shard: one bad line; every line decoded before the cut is kept;
    - an empty (0-byte) shard of any kind, a ``.txt`` file that is not UTF-8, a ``.json`` file that does not parse:
      one bad line, the file being the unit of damage (a valid compressed stream always has a header, so 0 bytes
      is a failed write or copy, not an empty corpus). In a ``.json`` array that parses, a record holding invalid
      Unicode or non-UTF-8 bytes costs that record.

    Only the lines wholly inside a corrupt frame cannot be counted (their number is unknown): the frame counts as
    one bad line, so a corrupt frame of many lines weighs less in the share than the lines it lost.

    A valid shard is never counted as damage: zstd frames with long windows (up to zstd's maximum), several
    concatenated frames or gzip members, skippable frames and gzip zero padding are all read in full.
    """
    url = shards.url(path)
    name = path.lower()
    if name.endswith(".txt"):
        if start_line <= 1:
            with shards.fs.open(path, "rb") as f:
                data = f.read()
            where = f"{url}:1"
            if not data:
                bad.skip(where, EMPTY_FILE)
                return
            try:
                record = {text_field: data.decode("utf-8")}
            except UnicodeDecodeError as exc:
                bad.skip(where, f"not UTF-8 ({exc}); the whole .txt document is skipped")
                return
            if bad.accept(where, _problem(record, check)):
                yield 1, record
        return
    if name.endswith((".json", ".json.gz", ".json.zst")):
        yield from _read_json_array(shards, path, url, bad, start_line, check)
        return
    f, dec = _open_binary(shards.fs, path)
    with f:
        gaps = dec.gaps if dec is not None else []
        gi, start, lineno = 0, 0, 0  # next gap, the line's offset in the decompressed bytes

        def take_gaps(until: Callable[[int], bool]) -> str:
            """The reason of the next gaps that ``until`` their offset (one place of damage: counted once)."""
            nonlocal gi
            first, n = gaps[gi][1], 0
            while gi < len(gaps) and until(gaps[gi][0]):
                gi, n = gi + 1, n + 1
            return first if n == 1 else f"{first} (and {n - 1} more there)"

        for lineno, line in enumerate(f, 1):
            end = start + len(line)
            here = lineno >= start_line  # damage before a resume point was counted by the run that read it
            where = f"{url}:{lineno}"
            lost = take_gaps(lambda at: at <= start) if gi < len(gaps) and gaps[gi][0] <= start else None
            cut_at = lambda at: at < end or (at == end and not line.endswith(b"\n"))  # noqa: E731
            if gi < len(gaps) and cut_at(gaps[gi][0]):  # data is missing inside this line: the line is the damage
                why = take_gaps(cut_at)
                if here:
                    bad.skip(where, f"{lost + '; ' if lost else ''}{why}; this line is cut by it, skipped")
                start = end
                continue
            start = end
            if not here:
                continue
            if not line.strip():
                if lost:
                    bad.skip(where, f"{lost}; skipped to the next frame")
                continue
            record, why = parse_line(line)
            if why is not None:
                # right after lost data, an unreadable line is the tail of a lost line: the same damage
                bad.skip(where, f"{lost}; the line after it is cut, skipped" if lost else why)
                continue
            if lost:
                bad.skip(where, f"{lost}; skipped to the next frame")
            if bad.accept(where, _problem(record, check)):
                yield lineno, record
        if lineno + 1 >= start_line:
            if gi < len(gaps):
                bad.skip(f"{url}:{lineno + 1}", take_gaps(lambda at: True))
            elif lineno == 0 and (dec is None or dec.raw_bytes == 0):
                bad.skip(f"{url}:1", EMPTY_FILE)


def _problem(record: Any, check: Check | None) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    return check(record) if check else None


def _read_json_array(shards: ShardSet, path: str, url: str, bad: BadLines, start: int,
                     check: Check | None) -> Iterator[tuple[int, dict]]:
    """The records of a JSON array file.

    Bytes that are not UTF-8 are decoded to lone surrogates (``surrogateescape``), so inside a string they cost
    only the record holding them, like a lone surrogate escape. Otherwise the file parses as a whole or not at all:
    a damaged one (empty, truncated, not JSON) is one bad line and is skipped. A file that parses to something
    other than an array is the wrong kind of file, not damage: a clear error."""
    f, dec = _open_binary(shards.fs, path)
    with f:
        data = f.read()
    gaps = [why for _, why in dec.gaps] if dec is not None else []
    if start > 1:  # resuming inside the array: its damage was counted when it was first read
        gaps = []
    if not data and not gaps and (dec is None or dec.raw_bytes == 0):
        if start <= 1:
            bad.skip(f"{url}:[1]", EMPTY_FILE)
        return
    try:
        records = json.loads(data.decode("utf-8-sig", "surrogateescape"))
    except (ValueError, RecursionError) as exc:
        if start <= 1:
            why = "; ".join(gaps) or f"not a JSON array of records ({exc.__class__.__name__}: {str(exc)[:80]})"
            bad.skip(f"{url}:[1]", f"{why}; the whole file is skipped")
        return
    if not isinstance(records, list):
        raise ShortenedError(f"{url}: expected a JSON array of records, got a {type(records).__name__}")
    for why in gaps:
        bad.skip(f"{url}:[1]", why)
    for i, record in enumerate(records, 1):
        if i < start:
            continue
        problem = _problem(record, check)
        if problem is None:
            try:
                where = lone_surrogate(record)
            except RecursionError:
                where = "a value nested too deeply to check"
            problem = (f"invalid Unicode (non-UTF-8 bytes or a lone UTF-16 surrogate escape in {where!r})"
                       if where else None)
        if bad.accept(f"{url}:[{i}]", problem):
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
