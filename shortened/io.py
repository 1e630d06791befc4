"""Small file helpers: atomic writes, so a failure never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from shortened.errors import ShortenedError


def write_json_atomic(path: str | Path, data: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output folder unless ``overwrite``; nothing is created here."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ShortenedError(f"output {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ShortenedError(f"output folder {str(path)!r} exists and is not empty (use --overwrite to replace it)")
    return path


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise ShortenedError(f"output file {str(path)!r} exists (use --overwrite to replace it)")
    if path.is_dir():
        raise ShortenedError(f"output {str(path)!r} is a folder, expected a file path")
    return path


def save_model_dir(out: str | Path, model, tokenizer=None, *, report_name: str, report: dict,
                   overwrite: bool = False, verify: Callable[[Path], None] | None = None) -> Path:
    """Write an HF model (``save_pretrained``), its tokenizer and a JSON report to a staging folder beside ``out``,
    then move it into place in one step; a failure leaves no partial folder.

    ``verify(staging)`` runs on the complete staging folder before it is published; whatever it raises removes
    the staging folder and propagates, so a folder that fails the check never appears at ``out``."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
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
