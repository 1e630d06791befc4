"""Training checkpoints: DeepSpeed's shards plus each rank's data cursor and the trainer state, staged on local
disk and handed to the session (:func:`save_checkpoint`) after a space check against an estimate of their size
(:func:`checkpoint_bytes`, :func:`check_staging_space`); resume at the exact next token (:func:`load_checkpoint`)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from shortened.data import PackedStream
from shortened.errors import ShortenedError
from shortened.training.config import TrainConfig
from shortened.training.session import Session

log = logging.getLogger(__name__)
CKPT_TAG = "ckpt"
# Slack over checkpoint_bytes: file headers, pickled metadata, the cursors, the trainer state
_STAGING_MARGIN, _STAGING_SLACK = 1.05, 256 << 20


def checkpoint_bytes(n_params: int, n_trainable: int, *, zero_stage: int, world_size: int, precision: str,
                     local_ranks: int = 1, has_rank0: bool = True) -> int:
    """Estimated bytes that ``local_ranks`` ranks on one node write for one DeepSpeed checkpoint (the staging
    folder must hold them all: they share the node's disk). ``n_params`` counts every parameter, ``n_trainable``
    those with gradients (LoRA: the adapters).

    DeepSpeed 0.19's layout (file sizes measured on a small model agree to within pickle overhead):

    - optimizer state per trainable parameter: 12 bytes (fp32 master copy + Adam's two fp32 moments); 8 without
      ZeRO in fp32 training, where the weights are the master copy;
    - weights in the training dtype (2 bytes in bf16/fp16, 4 in fp32);
    - ZeRO-3: each rank writes ``1/world_size`` of the optimizer state and of the frozen weights (the trainable
      weights are the fp32 master copy, no 16-bit copy is written);
    - ZeRO-1/2: each rank writes ``1/world_size`` of the optimizer state; rank 0 writes all the weights;
    - ZeRO-0: rank 0 writes everything.

    ``has_rank0``: whether this node hosts global rank 0 (ranks are numbered node by node). Example: a CPT of 6.7B
    parameters, ZeRO-3, bf16, the 8 ranks of a node: 6.7e9 × 12 ≈ 80 GB on that node. Metadata (headers, data
    cursors, trainer state) is small: the caller adds a margin."""
    weight = 2 if precision in ("bf16", "fp16") else 4
    optimizer = n_trainable * (8 if zero_stage == 0 and weight == 4 else 12)
    frozen = (n_params - n_trainable) * weight
    if zero_stage == 3:
        per_rank, rank0 = (optimizer + frozen) / world_size, 0
    elif zero_stage >= 1:
        per_rank, rank0 = optimizer / world_size, n_params * weight
    else:
        per_rank, rank0 = 0, n_params * weight + optimizer
    return int(per_rank * local_ranks + (rank0 if has_rank0 else 0))


def check_staging_space(folder: Path, need: int, session: Session) -> None:
    """Before a checkpoint is written: ``folder`` (the staging folder) must exist or be creatable and have room
    for ``need`` bytes (this node's share, :func:`checkpoint_bytes`) plus 5% and 256 MiB. Every rank learns the
    outcome through one all-reduce (on the session's device), so all raise together before anything is written
    instead of some ranks waiting in DeepSpeed's save for the one that failed. Raises :class:`ShortenedError`."""
    problem = None
    want = int(need * _STAGING_MARGIN) + _STAGING_SLACK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < want:
            problem = (f"checkpoint staging folder {folder} has {free / 1e9:.1f} GB free, but this node's ranks "
                       f"need about {want / 1e9:.1f} GB to stage a checkpoint; set train.checkpoint_staging_dir to "
                       "a folder on a larger local disk (or free space there)")
    except OSError as exc:
        problem = f"checkpoint staging folder {folder} is not usable: {exc}"
    ok = torch.tensor([0.0 if problem else 1.0], dtype=torch.float32, device=session.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if problem:
        raise ShortenedError(problem)
    if ok.item() < 1:
        raise ShortenedError("another worker's checkpoint staging folder is short of space or unusable (its own "
                             "error names the folder and the sizes); set train.checkpoint_staging_dir")


@dataclass(frozen=True)
class Staging:
    """Where this rank stages a checkpoint before the session takes it, and the bytes this node's ranks need there
    (:func:`checkpoint_bytes`)."""

    folder: Path
    need: int


def staging_for(cfg: TrainConfig, engine, session: Session, *, zero_stage: int, precision: str) -> Staging:
    """``train.checkpoint_staging_dir`` (else the system's temporary folder) and this node's share of a checkpoint
    of ``engine``'s parameters (ZeRO-3 partitions them: their whole sizes are counted)."""
    folder = Path(cfg.checkpoint_staging_dir or tempfile.gettempdir()).expanduser()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: whole size
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    need = checkpoint_bytes(n_params, n_trainable, zero_stage=zero_stage, world_size=session.world_size,
                            precision=precision, local_ranks=session.local_world_size,
                            has_rank0=session.rank == session.local_rank)
    return Staging(folder, need)


def save_checkpoint(engine, stream: PackedStream, session: Session, metrics: dict, history: list[dict],
                    staging: Staging) -> None:
    """Every rank writes its DeepSpeed shards and data cursor to a folder under ``staging.folder`` (after checking
    the space: :func:`check_staging_space`), rank 0 the trainer state (``metrics`` and ``history``); the session
    takes them to storage (merging the ranks' files) with ``metrics`` as the report."""
    rank = session.rank
    check_staging_space(staging.folder, staging.need, session)
    tmp = tempfile.mkdtemp(prefix="shortened-ckpt-", dir=staging.folder)
    try:
        engine.save_checkpoint(tmp, tag=CKPT_TAG)
        (Path(tmp) / f"data_cursor_rank{rank}.json").write_text(json.dumps(stream.state_dict()))
        if rank == 0:
            (Path(tmp) / "trainer_state.json").write_text(json.dumps({**metrics, "history": history}))
        session.report(metrics, checkpoint_dir=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(engine, stream: PackedStream, session: Session) -> tuple[int, list[dict]]:
    """Resume from the session's latest checkpoint, if there is one: the DeepSpeed state (weights, optimizer,
    scheduler) into ``engine``, this rank's data cursor into ``stream`` (the next batch is the one after the last
    trained). Returns the step reached and the metrics history so far (``0, []`` for a fresh start)."""
    step, history = 0, []
    with session.restore() as ckpt:
        if ckpt is not None:
            engine.load_checkpoint(ckpt, tag=CKPT_TAG)
            state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
            step, history = state["step"], state["history"]
            stream.load_state_dict(json.loads((Path(ckpt) / f"data_cursor_rank{session.rank}.json").read_text()))
            log.info("rank %d resumed at step %d from %s", session.rank, step, ckpt)
    return step, history
