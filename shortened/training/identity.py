"""What a Ray Train run is, so a name reused for something else never resumes the wrong checkpoint.

A Ray Train run resumes from the last checkpoint under ``storage_path/NAME``. Before workers start, the driver writes
``shortened-run.json`` there: the model (path and a fingerprint of its config and weight files), the method, the
teacher, the token budget, the training config (with its global batch made explicit) and the worker count. A later
run under the same name is compared with it first: anything that changes what is trained is refused with the fields
named. Another worker count is not such a change: the global batch stays the checkpoint's
(:func:`run_global_batch`), each worker's share of it is re-split, the data order is global and the optimizer state
is resharded on load (:mod:`~shortened.training.checkpoint`), so the run continues exactly; only a worker count
that cannot split the global batch evenly is refused (:func:`check_worker_split`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shortened.errors import ShortenedError
from shortened.io import write_json_atomic

if TYPE_CHECKING:
    from shortened.training.config import TrainConfig

log = logging.getLogger(__name__)

RUN_JSON = "shortened-run.json"
# TrainConfig fields that do not change what is trained: a resumed run may change them
OPERATIONAL = {"report_every_steps", "checkpoint_every_tokens", "keep_checkpoints", "token_log",
               "checkpoint_staging_dir", "save_dtype", "attn_implementation", "checkpoint_upload"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_CHUNK = 1 << 20
_SAMPLES = 17  # chunks read per weight file (first, last and evenly spaced between): cheap on 100 GB models


def model_fingerprint(path: str | Path) -> str:
    """SHA-256 over a model folder's ``config.json`` and, for every weight file, its name, size and sampled
    content (a whole file up to 17 MiB, else 17 evenly spaced MiB). Two different models of one shape differ."""
    from shortened import storage

    if storage.is_url(path):  # a folder in an object store: its content, as this node's cached copy holds it
        path = storage.local_copy(str(path))
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():  # a .gguf file
        files, root = [p], p.parent
    else:
        root = p
        cfg = p / "config.json"
        h.update(cfg.read_bytes() if cfg.is_file() else b"")
        files = sorted(f for f in p.iterdir() if f.is_file() and (f.name.endswith(WEIGHT_SUFFIXES)
                                                                   or f.name.endswith(".index.json")))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= _CHUNK * _SAMPLES:
                h.update(fh.read())
                continue
            for i in range(_SAMPLES):
                fh.seek((size - _CHUNK) * i // (_SAMPLES - 1))
                h.update(fh.read(_CHUNK))
    return h.hexdigest()


def digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(_compared(record), sort_keys=True).encode()).hexdigest()[:16]


def _compared(record: dict) -> dict:
    """The fields that say what is trained (paths are shown, contents compared)."""
    method = record.get("method")
    unused = {"lora"} if method != "lora" else set()  # a phase's method uses only its own settings
    unused |= {"distill"} if method != "distill" else set()
    train = {k: v for k, v in _with_defaults(record.get("train", {})).items() if k not in OPERATIONAL | unused}
    if train.get("global_batch_size") is None and "micro_batch_size" in train and record.get("num_workers"):
        # a record from before the global batch was explicit: it was micro x accum x the workers that wrote it
        train["global_batch_size"] = (train["micro_batch_size"] * train.get("grad_accum", 1)
                                      * _max_workers(record))
    return {"model_fingerprint": record.get("model_fingerprint"), "method": record.get("method"),
            "teacher": record.get("teacher_fingerprint") or record.get("teacher"), "tokens": record.get("tokens"),
            "train": train}


def _with_defaults(train: dict) -> dict:
    """A recorded training config with the fields added since it was written at their defaults (which is what that
    run trained with), so a newer release can resume it; a record that no longer validates is compared as it is."""
    from pydantic import ValidationError

    from shortened.training.config import TrainConfig

    try:
        return TrainConfig.model_validate(train).model_dump(mode="json")
    except (ValidationError, ValueError):
        return train


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(old: dict, new: dict) -> list[str]:
    """``field (was X, now Y)`` for each field that changes what is trained."""
    a, b = _flat(_compared(old)), _flat(_compared(new))
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if k == "model_fingerprint":
                out.append(f"model (was {old.get('model')}, now {new.get('model')}; the weights/config differ)")
            elif k == "teacher":
                out.append(f"teacher (was {old.get('teacher')}, now {new.get('teacher')})")
            else:
                out.append(f"{k} (was {a.get(k)!r}, now {b.get(k)!r})")
    return out


def has_checkpoints(run_dir: Path) -> bool:
    return run_dir.is_dir() and (any(run_dir.glob("checkpoint_*"))
                                 or (run_dir / "checkpoint_manager_snapshot.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint Ray Train would resume from (its snapshot's latest, else the newest folder)."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    if snap.is_file():
        try:
            text = snap.read_text()
            found = [c for c in sorted(run_dir.glob("checkpoint_*")) if c.is_dir() and c.name in text]
            if found:
                return found[-1]
        except OSError:
            pass
    found = sorted(c for c in run_dir.glob("checkpoint_*") if c.is_dir())
    return found[-1] if found else None


def checkpoint_world_size(run_dir: Path, record: dict | None = None) -> int | None:
    """How many workers wrote the run's latest checkpoint: its trainer state, else its per-rank data cursors, else
    the identity record."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        try:
            written = json.loads((ckpt / "trainer_state.json").read_text()).get("world_size")
        except (OSError, json.JSONDecodeError):
            written = None
        if written:
            return int(written)
        ranks = list(ckpt.glob("data_cursor_rank*.json"))
        if ranks:
            return len(ranks)
    if record and has_checkpoints(run_dir):
        return _max_workers(record)
    return None


def _max_workers(record: dict) -> int:
    """The most workers a record's run had: ``num_workers``, or MAX of an elastic ``workers: [MIN, MAX]``."""
    workers = record.get("workers")
    return int(workers[1]) if workers else int(record.get("num_workers") or 1)


def run_global_batch(run_dir: Path, cfg: TrainConfig, max_workers: int) -> int:
    """The global batch (sequences per optimizer step) of the run at ``run_dir``: ``cfg.global_batch_size`` when
    set; else, for a run with checkpoints, the one its identity record was written with (a resume with another
    worker count keeps it); else ``micro_batch_size × grad_accum × max_workers``."""
    if cfg.global_batch_size:
        return cfg.global_batch_size
    old = read_record(run_dir) if has_checkpoints(run_dir) else None
    if old is not None:
        train = old.get("train") or {}
        if train.get("global_batch_size"):
            return int(train["global_batch_size"])
        return (int(train.get("micro_batch_size", cfg.micro_batch_size)) * int(train.get("grad_accum", cfg.grad_accum))
                * _max_workers(old))
    return cfg.micro_batch_size * cfg.grad_accum * max_workers


def split_problem(global_batch: int, workers: range) -> str | None:
    """Why a global batch of ``global_batch`` sequences cannot run on every worker count in ``workers`` (each must
    divide it), or None."""
    bad = [w for w in workers if global_batch % w]
    if not bad:
        return None
    counts = ", ".join(map(str, bad))
    return (f"a global batch of {global_batch} sequences cannot be split evenly over {counts} worker(s) (each "
            f"worker trains the same number per step)")


def check_worker_split(run: str, cfg: TrainConfig, workers: range, workers_hint: str = "--workers") -> None:
    """Refuse (before workers start) a worker count, or an elastic range, that cannot split the run's global
    batch (``cfg.global_batch_size``) evenly."""
    problem = split_problem(cfg.global_batch(workers[-1]), workers)
    if problem:
        raise ShortenedError(f"Ray Train run {run!r}: {problem}; choose {workers_hint} among the divisors of "
                             f"{cfg.global_batch(workers[-1])}, or set train.global_batch_size to a multiple of "
                             f"each worker count (for a new run)")


def read_record(run_dir: Path) -> dict | None:
    f = run_dir / RUN_JSON
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShortenedError(f"Ray Train run {run_dir.name!r}: unreadable identity record {f}: {exc}") from exc


def check_run(run_dir: Path, record: dict, workers_hint: str = "--workers") -> None:
    """Refuse (before workers start) to resume a run that trained something else. Another worker count is fine
    (:func:`check_worker_split` judges it); ``workers_hint`` names the worker count's flag in messages."""
    name = run_dir.name
    if not has_checkpoints(run_dir):
        return  # nothing to resume: Ray Train starts fresh, and the record is rewritten
    old = read_record(run_dir)
    if old is None:
        raise ShortenedError(
            f"Ray Train run {name!r} at {run_dir} has checkpoints but no {RUN_JSON} saying what they are a run of, so "
            "it cannot be resumed safely: use another run name (--name), or delete that folder to start over")
    diff = differences(old, record)
    if diff:
        raise ShortenedError(
            f"Ray Train run {name!r} at {run_dir} is a run of another retraining, and its checkpoint must not be "
            f"resumed by this one: {'; '.join(diff)}. Use another run name (--name), or delete that folder to "
            "start over")
    need = checkpoint_world_size(run_dir, old)
    if need is not None and need != _max_workers(record):
        log.info("Ray Train run %r was checkpointed by %d worker(s); it resumes with %s (global batch re-split, "
                 "optimizer state resharded)", name, need, record.get("workers") or record["num_workers"])


def write_record(run_dir: Path, record: dict) -> None:
    write_json_atomic(run_dir / RUN_JSON, {**record, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
