"""Training checkpoints: DeepSpeed's shards plus each rank's data cursors and the trainer state, staged on local
disk and handed to the session (:func:`save_checkpoint`: uploaded in the background by default) after a space check
against an estimate of their size (:func:`checkpoint_bytes`, :func:`check_staging_space`); resume at the exact next
sequence of the global order, with the same or another worker count (:func:`load_checkpoint`: a checkpoint of
another world size is converted to DeepSpeed's universal format first, which reshards the optimizer state)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shortened.data.batches import CURSOR_FILE, GlobalBatches
from shortened.errors import ShortenedError
from shortened.training.config import TrainConfig
from shortened.training.session import Session, barrier

log = logging.getLogger(__name__)
CKPT_TAG = "ckpt"
TRAINER_STATE = "trainer_state.json"  # rank 0's part of a checkpoint: step, metrics history, world size, resumes
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
    """Where this rank stages a checkpoint before the session takes it, the bytes this node's ranks need there
    (:func:`checkpoint_bytes`), and this rank's staged checkpoints still waiting for their background upload (each
    holds its share of the space until the session has uploaded and deleted it)."""

    folder: Path
    need: int
    pending: list[Path] = field(default_factory=list, compare=False)

    def need_now(self) -> int:
        """``need`` for the next checkpoint plus one more for each upload still pending."""
        self.pending[:] = [p for p in self.pending if p.exists()]
        return self.need * (1 + len(self.pending))


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


@dataclass
class TrainerState:
    """What a checkpoint says about the run besides DeepSpeed's state: the step reached, the metrics history, the
    worker count that wrote it, and every resume so far (``{"step", "tokens", "workers_before",
    "workers_after"}``, oldest first)."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    world_size: int | None = None
    resumes: list[dict] = field(default_factory=list)


def save_checkpoint(engine, batches: GlobalBatches, session: Session, metrics: dict, state: TrainerState,
                    staging: Staging, *, upload: str = "async") -> float:
    """Every rank writes its DeepSpeed shards and its lanes' data cursors to a fresh folder under
    ``staging.folder`` (after checking the space: :func:`check_staging_space`), rank 0 the trainer state; the
    session takes the folder to storage with ``metrics`` as the report: in the background (``upload="async"``:
    the session deletes the folder once uploaded) or while every worker waits (``"sync"``). Returns the seconds
    training stood still for it (the stall)."""
    start = time.perf_counter()
    rank = session.rank
    check_staging_space(staging.folder, staging.need_now(), session)
    tmp = Path(tempfile.mkdtemp(prefix="shortened-ckpt-", dir=staging.folder))
    taken = False
    try:
        engine.save_checkpoint(str(tmp), tag=CKPT_TAG)
        (tmp / CURSOR_FILE.format(rank=rank)).write_text(json.dumps(batches.state_dict()))
        if rank == 0:
            (tmp / TRAINER_STATE).write_text(json.dumps({
                **metrics, "history": state.history, "world_size": session.world_size,
                "global_batch": batches.global_batch, "resumes": state.resumes}))
        taken = session.report(metrics, checkpoint_dir=str(tmp), asynchronous=upload == "async")
        if taken:
            staging.pending.append(tmp)
    finally:
        if not taken:
            shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - start


def load_checkpoint(engine, batches: GlobalBatches, session: Session, staging: Staging) -> TrainerState:
    """Resume from the session's latest checkpoint, if there is one: the DeepSpeed state (weights, optimizer,
    scheduler) into ``engine``, this rank's lanes' data cursors into ``batches`` (the next step's batch is the one
    after the last trained, for any worker count). A checkpoint written by another worker count is converted to
    DeepSpeed's universal checkpoint first (:func:`universal_checkpoint`), which reshards the ZeRO optimizer
    state. The resume is appended to the returned state's ``resumes``. Returns an empty state for a fresh start."""
    with session.restore() as ckpt:
        if ckpt is None:
            return TrainerState(world_size=session.world_size)
        ckpt = Path(ckpt)
        raw = (ckpt / TRAINER_STATE).read_bytes()
        saved = json.loads(raw)
        before = int(saved.get("world_size") or len(list(ckpt.glob(CURSOR_FILE.format(rank="*")))))
        if before != session.world_size and _partitioned(engine):
            with universal_checkpoint(ckpt, staging.folder, session, key=hashlib.sha256(raw).hexdigest()[:16]) as u:
                _load_universal(engine, u)
        else:
            engine.load_checkpoint(str(ckpt), tag=CKPT_TAG)
        batches.load_state_dict([json.loads(f.read_text()) for f in sorted(ckpt.glob(CURSOR_FILE.format(rank="*")))])
    step = int(saved["step"])
    if batches.steps != step:
        raise ShortenedError(f"checkpoint {ckpt}: the data cursors are at step {batches.steps}, the trainer state at "
                             f"step {step}")
    resumes = list(saved.get("resumes", [])) + [{"step": step, "tokens": int(saved.get("tokens", 0)),
                                                  "workers_before": before, "workers_after": session.world_size}]
    log.info("rank %d resumed at step %d from %s (%d worker(s) wrote it, %d now)", session.rank, step, ckpt, before,
             session.world_size)
    return TrainerState(step, saved["history"], session.world_size, resumes)


def _partitioned(engine) -> bool:
    """Whether the engine's optimizer state is split across ranks (ZeRO 1-3) or kept by DeepSpeed's bf16
    optimizer, whose checkpoints load only at the world size that wrote them; a plain optimizer (ZeRO-0 in fp32)
    saves one whole copy that any world size loads."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()


@contextlib.contextmanager
def universal_checkpoint(ckpt: Path, staging: Path, session: Session, *, key: str):
    """A DeepSpeed checkpoint (``ckpt/CKPT_TAG``) converted to the universal format
    (``deepspeed.checkpoint.ds_to_universal``: every parameter's fp32 weights and Adam moments whole, one folder
    each), which loads at any world size. Converted once per node (by its local rank 0, into
    ``staging/shortened-universal-KEY``; the other ranks wait at a barrier) and removed after loading. Yields the
    folder to load from with ``tag=CKPT_TAG``."""
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = staging / f"shortened-universal-{key}"
    if session.local_rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        with contextlib.redirect_stdout(_LogWriter()):
            ds_to_universal(SimpleNamespace(input_folder=str(ckpt / CKPT_TAG), output_folder=str(out / CKPT_TAG),
                                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                            strict=True, inject_missing_state=True))
        log.info("converted %s to a universal checkpoint in %.1f s", ckpt, time.perf_counter() - started)
    barrier(session.device)
    try:
        yield out
    finally:
        barrier(session.device)
        if session.local_rank == 0:
            shutil.rmtree(out, ignore_errors=True)


def _load_universal(engine, folder: Path) -> None:
    """Load a universal checkpoint: DeepSpeed reads one when its config says ``checkpoint.load_universal``, which
    the engine was built without (it is a property of the checkpoint, known only now), so it is set for this
    load.

    Two faults of DeepSpeed's ZeRO-3 loader (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) are undone
    after the load, without which the resumed run drifts from the uninterrupted one: it copies the first parameter
    group's hyperparameters into every group, which gives the norm weights and biases the matrices' weight decay
    (:func:`~shortened.training.loop.param_groups`), so each group's own are put back (all but the learning rate,
    which the schedule sets, the same in every group); and it gives every optimizer sub-group the same AdamW
    ``step`` tensor, which torch increments in place, so with several sub-groups (``sub_group_size``) the step
    count, and with it Adam's bias correction, would advance once per sub-group at every step: each gets its
    own. The hyperparameters put back are the fresh optimizer's, which are the checkpoint's: a resume with another
    config is refused before workers start (:func:`~shortened.training.identity.check_run`)."""
    optimizer = _torch_optimizer(engine)
    groups = optimizer.param_groups if optimizer is not None else []
    own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        engine.load_checkpoint(str(folder), tag=CKPT_TAG)
    finally:
        config.load_universal_checkpoint = before
    if optimizer is None:
        return
    for group, kept in zip(optimizer.param_groups, own, strict=True):
        group.update(kept)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _torch_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch optimizer under DeepSpeed's wrappers (``engine.optimizer.optimizer…``), or None."""
    opt, seen = getattr(engine, "optimizer", None), set()
    while opt is not None and id(opt) not in seen and not isinstance(opt, torch.optim.Optimizer):
        seen.add(id(opt))
        opt = getattr(opt, "optimizer", None)
    return opt if isinstance(opt, torch.optim.Optimizer) else None


class _LogWriter:
    """stdout of DeepSpeed's converter (its progress prints) as debug log lines."""

    def write(self, text: str) -> None:
        if text.strip():
            log.debug("ds_to_universal: %s", text.rstrip())

    def flush(self) -> None:
        pass
