"""Small file helpers: atomic writes, so a failure never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from shortened.errors import ShortenedError


def umask() -> int:
    """The process umask: from /proc on Linux (no change to it, so safe beside other threads), else set and reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less the umask (0o644 under umask 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0o777 less the umask (0o755 under umask 022)."""
    return 0o777 & ~umask()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text through a temporary file beside ``path``, renamed into place, so an interruption leaves the old
    file or the new one, never half of one; the file gets the umask's mode (``mkstemp`` alone would leave it
    0600, unreadable by the rest of a team on shared storage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: object) -> None:
    """JSON (indented, newline-terminated) through :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def make_staging_dir(final: Path) -> Path:
    """A hidden staging folder beside ``final`` with the umask's mode (``mkdtemp`` alone makes it 0700)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(staging, dir_mode())
    return staging


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as anything)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path) -> None:
    """Create and remove a hidden file in ``folder``: the one check that also holds for root, ACLs and read-only
    mounts. Raises OSError when the folder cannot take new files."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".shortened-write-check-")
    os.close(fd)
    os.unlink(probe)


# Folders check_output created for the work at hand: removed again when the work fails (remove_created_if_empty).
CREATED: list[Path] = []


def remove_created_if_empty() -> None:
    """Remove the folders :func:`check_output` created that are still empty (deepest first): a refused or
    interrupted command leaves nothing behind."""
    for folder in sorted(set(CREATED), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only succeeds on an empty folder
        except OSError:
            pass
    CREATED.clear()


def check_output(path: str | Path, *, kind: str, overwrite: bool = False, flag: str = "output",
                 create: bool = True) -> Path:
    """Check an output location before any work starts, so a bad ``--out`` fails in a second instead of after
    scoring, evaluation or training; then create the folders above it (``create``).

    ``kind`` is ``"file"`` (written atomically beside itself), ``"dir"`` (a model folder, staged beside itself
    and moved into place: must not exist or be empty, unless ``overwrite``) or ``"folder"`` (files are written
    into it, existing or not: a cache or report folder). Refused, with ``flag`` and the path named: a file where
    a folder is needed (or a folder where a file is), an existing result without ``overwrite``, a path below a
    file, and a folder that cannot take new files. The message is a :class:`ShortenedError`; nothing is created
    unless every check passes."""
    if kind not in ("file", "dir", "folder"):
        raise ValueError(f"kind {kind!r}: choose file, dir or folder")
    raw = str(path)
    if not raw.strip():
        raise ShortenedError(f"{flag}: an empty path")
    path = Path(raw).expanduser()
    where = f"{flag} {raw}"
    if kind == "file":
        if raw.endswith(("/", "\\")):
            raise ShortenedError(f"{where}: ends with a slash (a folder), expected a file path")
        if path.is_dir():
            raise ShortenedError(f"{where}: is a folder, expected a file path")
        if path.exists() and not overwrite:
            raise ShortenedError(f"{where}: the file exists (use --overwrite to replace it)")
    else:
        if path.exists() and not path.is_dir():
            raise ShortenedError(f"{where}: exists and is not a folder")
        if kind == "dir" and path.is_dir() and any(path.iterdir()) and not overwrite:
            raise ShortenedError(f"{where}: the folder exists and is not empty (use --overwrite to replace it)")
    anchor = _first_existing(path.parent.absolute())
    if not anchor.is_dir():
        raise ShortenedError(f"{where}: {anchor} is a file, not a folder, so nothing can be written below it")
    probes = [anchor] + ([path] if kind == "folder" and path.is_dir() else [])
    for folder in probes:
        try:
            _probe_writable(folder)
        except OSError as exc:
            raise ShortenedError(f"{where}: cannot write in {folder} ({exc.strerror or exc})") from exc
    if create:
        missing = [p for p in [*([path] if kind == "folder" else []), path.parent, *path.parent.parents]
                   if not p.exists()]
        CREATED.extend(reversed(missing))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "folder":
                path.mkdir(exist_ok=True)
        except OSError as exc:
            raise ShortenedError(f"{where}: cannot create {exc.filename or path.parent} "
                                 f"({exc.strerror or exc})") from exc
    return path


def save_model_dir(out: str | Path, model, tokenizer=None, *, report_name: str, report: dict,
                   overwrite: bool = False, verify: Callable[[Path], None] | None = None) -> Path:
    """Write an HF model (``save_pretrained``), its tokenizer and a JSON report to a staging folder beside ``out``,
    then move it into place in one step; a failure leaves no partial folder.

    ``verify(staging)`` runs on the complete staging folder before it is published; whatever it raises removes
    the staging folder and propagates, so a folder that fails the check never appears at ``out``."""
    out = check_output(out, kind="dir", overwrite=overwrite, create=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(out)
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_json_atomic(staging / report_name, report)
        if verify is not None:
            verify(staging)
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written staging folder into place, replacing ``final`` only once the new one is complete."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
