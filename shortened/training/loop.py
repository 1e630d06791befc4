"""The per-worker training loop, a plain function and a short recipe (:func:`run`): set up the device, the models,
the DeepSpeed ZeRO engine and this rank's packed stream, restore the latest checkpoint; fit (metrics every N steps,
DeepSpeed checkpoints plus the data cursor every N tokens, resume at the exact next token); export one Hugging Face
checkpoint at the end.

``train_worker(config)`` is what Ray Train runs on every worker; :func:`run` works with any :class:`Session`.
The parts live beside it: :mod:`~shortened.training.phase` (:class:`Phase`, the model a phase trains),
:mod:`~shortened.training.lora`, :mod:`~shortened.training.distill` (the loss),
:mod:`~shortened.training.checkpoint`, :mod:`~shortened.training.export`, and the test-only hooks
:mod:`~shortened.training.faults` and :mod:`~shortened.training.audit`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from shortened.data.batches import GlobalBatches
from shortened.data.formats import IGNORE_INDEX
from shortened.errors import ShortenedError
from shortened.training.audit import log_tokens, token_log_path
from shortened.training.checkpoint import Staging, TrainerState, load_checkpoint, save_checkpoint, staging_for
from shortened.training.config import TrainConfig
from shortened.training.deepspeed_config import deepspeed_config, phase_mmap_threshold, resolve_precision
from shortened.training.distill import distill_loss
from shortened.training.export import export
from shortened.training.faults import maybe_fail
from shortened.training.lora import with_lora  # noqa: F401 (re-export: with_lora lived here until the loop was split)
from shortened.training.phase import Phase, build_model, partitioned_init
from shortened.training.session import RaySession, Session

log = logging.getLogger(__name__)

__all__ = ["Phase", "Training", "fit", "model_inputs", "run", "train_worker", "with_lora"]


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    run(Phase.model_validate(config), RaySession())


@dataclass
class Training:
    """A phase in progress on this worker: what the setup steps of :func:`run` built, and the trainer state (step,
    metrics history, resumes) that :func:`fit` advances (restored from the latest checkpoint on a resume)."""

    phase: Phase
    session: Session
    engine: Any  # the DeepSpeed engine around the model
    scheduler: Any  # the LR schedule (its last LR is reported)
    stream: GlobalBatches  # this rank's share of the global sequence order
    teacher: torch.nn.Module | None  # distillation: the dense model, frozen, on the device
    steps_total: int
    flatten: bool  # micro-batches joined into one row (flash-attention with per-document positions)
    staging: Staging  # where checkpoints are staged, and the space they need
    state: TrainerState = field(default_factory=TrainerState)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def history(self) -> list[dict]:
        return self.state.history


def run(phase: Phase, session: Session) -> dict:
    """Train one phase on this worker: set up, fit to the phase's token budget, export. Returns the last metrics
    reported ({} when no step was taken). The global batch is fixed for the run; this worker's share of it is
    re-split for the session's world size (:meth:`TrainConfig.for_world_size`), so a resume or an elastic restart
    with another worker count trains the same steps on the same sequences."""
    phase = phase.model_copy(update={"train": _split_for(phase.train, session.world_size)})
    cfg = phase.train
    precision, mmap_threshold = _setup_device(cfg, session, phase.method)
    tokenizer, model, teacher = _setup_models(phase, session, precision)
    steps_total = cfg.total_steps(session.world_size, phase.tokens)
    engine, scheduler, zero = _setup_engine(phase, model, session, precision, steps_total)
    zero["malloc_mmap_threshold"] = mmap_threshold  # beside peak_rss_mb in retraining.json
    stream = _setup_data(cfg, tokenizer, session)
    t = Training(phase, session, engine, scheduler, stream, teacher, steps_total,
                 flatten=_one_row_batches(cfg, model, teacher),
                 staging=staging_for(cfg, engine, session, zero_stage=zero["zero_stage"], precision=precision))
    t.state = load_checkpoint(engine, stream, session, t.staging)
    fit(t)
    export(engine, phase, session.rank, t.history, session.world_size, zero, resumes=t.state.resumes)
    return t.history[-1] if t.history else {}


# -- setup --------------------------------------------------------------------------------------------------------

def _setup_device(cfg: TrainConfig, session: Session, method: str) -> tuple[str, int | None]:
    """Make the session's device current (NCCL collectives — ours, DeepSpeed's, the barriers — run on the current
    device) and seed torch; returns the precision the phase trains in on that device (bf16, fp16 or fp32), and
    the host allocator's mmap threshold in bytes (None: glibc's dynamic one), which for a ZeRO-3 or offloading
    phase ``method`` is fixed first of all so that host memory freed from here on goes back to the OS
    (:mod:`shortened.host_memory`)."""
    from shortened.host_memory import return_freed_host_memory

    mmap_threshold = return_freed_host_memory(phase_mmap_threshold(cfg, method))
    _skip_shm_comm_build()
    device = session.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg, device)
    torch.manual_seed(cfg.seed)
    return precision, mmap_threshold


def _skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed JIT-builds a shared-memory all-reduce op in ``init_distributed`` (~60 s, and a worker
    killed mid-build leaves a lock that hangs every later start). Training does not need it: gloo does the
    collectives. ``SHORTENED_DS_SHM_COMM=1`` keeps DeepSpeed's default."""
    import deepspeed.ops

    if os.environ.get("SHORTENED_DS_SHM_COMM") != "1" and not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _setup_models(phase: Phase, session: Session, precision: str) -> tuple[Any, torch.nn.Module,
                                                                          torch.nn.Module | None]:
    """The tokenizer, the model to train (on the CPU, DeepSpeed moves it; LoRA-wrapped for ``lora``:
    :func:`build_model`) and, for ``distill``, the frozen teacher on the session's device. The student is loaded in
    the training dtype (no fp32 copy of a model that trains in bf16) and, under ZeRO-3, built partitioned
    (:func:`~shortened.training.phase.partitioned_init`: no rank ever holds the whole model). The attention kernel
    is resolved for the device and precision the model trains in, not the CPU it is loaded on. The teacher is
    inference-only: loaded whole, before the student (so it is not partitioned), in bf16 when training in bf16."""
    from shortened.device import resolve_attn_implementation
    from shortened.models import load_model, load_tokenizer

    device = session.device
    tokenizer = load_tokenizer(phase.model)
    train_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    attn = resolve_attn_implementation(phase.train.attn_implementation, device, train_dtype)
    teacher = None
    if phase.method == "distill":
        teacher = load_model(phase.teacher, device=str(device), dtype="bfloat16" if precision == "bf16" else "float32",
                             attn_implementation=attn).eval().requires_grad_(False)
    ds_cfg = deepspeed_config(phase.train, session.world_size, precision, phase.method,
                              hidden_size=_hidden_size(phase.model))
    with partitioned_init(ds_cfg):
        model = build_model(phase, train_dtype, attn)
    if phase.method == "partial":  # only the last blocks, final norm and LM head train (param_groups skips the rest)
        from shortened.training.partial import freeze_for_partial

        model.shortened_partial = freeze_for_partial(model, phase.train.partial_blocks)
    return tokenizer, model, teacher


def _hidden_size(model: torch.nn.Module | str) -> int | None:
    """The width of a model (its text config's ``hidden_size``; a model folder's config is read), None if it names
    none: the ZeRO bucket sizes follow it (:func:`~shortened.training.deepspeed_config.zero_buckets`)."""
    if isinstance(model, str):
        from transformers import AutoConfig

        from shortened.models import resolve_source

        source = resolve_source(model)  # (a URL is read through the node's cache)
        config = AutoConfig.from_pretrained(source.path, **source.from_pretrained_kwargs())
    else:
        config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


def _setup_engine(phase: Phase, model: torch.nn.Module, session: Session, precision: str,
                  steps_total: int) -> tuple[Any, Any, dict]:
    """The optimizer (AdamW over :func:`param_groups`; DeepSpeed's CPU Adam when the optimizer is offloaded), the
    cosine LR schedule with warmup, and the DeepSpeed engine around ``model`` on the session's device. Returns the
    engine, the schedule, and the ZeRO stage, offloads and attention kernel the phase runs with (for
    ``retraining.json``)."""
    import deepspeed

    from shortened.models import attn_used

    cfg, device = phase.train, session.device
    warmup = int(cfg.warmup_ratio * steps_total)
    lr = cfg.lora.lr if phase.method == "lora" else cfg.lr
    groups = param_groups(model, cfg.weight_decay)
    ds_cfg = deepspeed_config(cfg, session.world_size, precision, phase.method, hidden_size=_hidden_size(model))
    zero_stage = ds_cfg["zero_optimization"]["stage"]
    zero = {"zero_stage": zero_stage, "offload_optimizer": "offload_optimizer" in ds_cfg["zero_optimization"],
            "offload_params": "offload_param" in ds_cfg["zero_optimization"], "attn_implementation": attn_used(model)}
    if getattr(model, "shortened_partial", None):  # method partial: what trained, into retraining.json's phase
        zero["partial"] = model.shortened_partial
    if "optimizer" in ds_cfg:
        ds_cfg["optimizer"]["params"]["lr"] = lr
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)
    # DeepSpeed puts the model on cuda:LOCAL_RANK unless told the device: name the session's (Ray Train assigns
    # each worker its GPU, which need not be its local rank's), so the model, the batches and the collectives meet
    ds_args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" and device.index is not None \
        else None
    engine, _, _, scheduler = deepspeed.initialize(
        args=ds_args, model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        config=ds_cfg, lr_scheduler=lambda opt: cosine_with_warmup(opt, steps_total, warmup, cfg.min_lr_ratio))
    if engine.device.type != device.type or (device.type == "cuda" and engine.device.index != device.index):
        raise ShortenedError(f"DeepSpeed placed the model on {engine.device}, the session's device is {device}")
    log.info("rank %d: %s phase, ZeRO stage %d, %s, on %s", session.rank, phase.method, zero_stage, precision, device)
    return engine, scheduler, zero


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on biases and norm weights. A parameter built partitioned (ZeRO-3's
    ``zero.Init``) is judged by its full shape (``ds_shape``): its own tensor is an empty placeholder."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_ratio`` of the peak LR at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _split_for(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` re-split for ``world_size`` workers (:meth:`TrainConfig.for_world_size`); a ShortenedError when the
    global batch cannot be split over them."""
    try:
        return cfg.for_world_size(world_size)
    except ValueError as exc:
        raise ShortenedError(str(exc)) from exc


def _setup_data(cfg: TrainConfig, tokenizer, session: Session) -> GlobalBatches:
    """This rank's share of the global sequence order (its lanes' cursors are restored with the checkpoint)."""
    return GlobalBatches(cfg.data, tokenizer, global_batch=cfg.global_batch(session.world_size),
                         micro_batch_size=cfg.micro_batch_size, rank=session.rank, world_size=session.world_size)


def _one_row_batches(cfg: TrainConfig, model: torch.nn.Module, teacher: torch.nn.Module | None) -> bool:
    """Whether micro-batches are joined into one row (:func:`model_inputs`): per-document positions, more than one
    row a micro-batch, and a flash-attention kernel in the student or the teacher."""
    return cfg.data.document_positions and cfg.micro_batch_size > 1 and _varlen_attention(model, teacher)


def _varlen_attention(*models) -> bool:
    """Whether any of the models runs a flash-attention implementation, which separates documents only within a
    one-row batch (transformers' sdpa, eager and flex build a per-document mask from position ids per row)."""
    return any("flash" in str(getattr(getattr(m, "config", None), "_attn_implementation", "") or "")
               for m in models if m is not None)


# -- fit ----------------------------------------------------------------------------------------------------------

def fit(t: Training) -> None:
    """Train from ``t.step`` to ``t.steps_total``, each step ``grad_accum`` micro-batches of this rank's share of
    the global batch. Every ``report_every_steps`` steps, and at a checkpoint, the ranks' mean loss since the last
    report goes into the metrics (appended to ``t.history`` and reported to the session); a checkpoint is saved
    each time the tokens trained cross a multiple of ``checkpoint_every_tokens``, and after the last step, and the
    seconds training stood still for it are added to that step's metrics as ``checkpoint_stall_s``. With
    ``val_every_tokens``, each crossing of a multiple of it and the last step also report ``val_loss`` and
    ``val_ppl`` on the held-out windows (:mod:`~shortened.training.validation`)."""
    cfg, session = t.phase.train, t.session
    tokens_per_step = cfg.tokens_per_step(session.world_size)
    val_windows = _validation_windows(t) if cfg.val_every_tokens else None
    token_log = token_log_path(t.phase.out) if cfg.token_log else None
    asynchronous = cfg.checkpoint_upload == "async"
    t.engine.train()
    # [sum of micro-batch losses, micro-batches] since the last report, on the device: no sync per micro-batch,
    # and the all-reduce (NCCL on GPUs) gets a tensor on its device
    window = torch.zeros(2, dtype=torch.float64, device=session.device)
    window_start = time.perf_counter()
    started_at = t.step
    while t.step < t.steps_total:
        for micro, batch in enumerate(t.stream.step_batches()):
            if token_log is not None:
                log_tokens(token_log, session.rank, t.step, micro, batch["input_ids"], sequences=batch["sequence"],
                           world_size=session.world_size, started_at=started_at)
            loss = _train_micro_batch(t, batch)
            window[0] += loss.detach().double()
            window[1] += 1
        t.state.step += 1
        tokens = t.step * tokens_per_step
        save = t.step == t.steps_total or _crosses(tokens, tokens_per_step, cfg.checkpoint_every_tokens)
        validate = val_windows is not None and (t.step == t.steps_total or _crosses(tokens, tokens_per_step,
                                                                                    cfg.val_every_tokens))
        if t.step % cfg.report_every_steps == 0 or save or validate:
            metrics = _window_metrics(t, window, time_start=window_start, tokens=tokens)
            if validate:
                from shortened.training.validation import validation_metrics

                metrics.update(validation_metrics(t.engine, val_windows, session.rank, session.world_size,
                                                  session.device))
            t.history.append(metrics)
            if save:
                stall = save_checkpoint(t.engine, t.stream, session, dict(metrics), t.state, t.staging,
                                        upload=cfg.checkpoint_upload)
                metrics["checkpoint_stall_s"] = round(stall, 4)  # in later checkpoints' history and the export
            else:
                session.report(metrics, asynchronous=asynchronous)
            if session.rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e tokens %d (%.0f tok/s)", t.step, t.steps_total,
                         metrics["loss"], metrics["lr"], tokens, metrics["tokens_per_s"])
            window.zero_()
            window_start = time.perf_counter()
        maybe_fail(session.rank, t.step)


def _validation_windows(t: Training) -> torch.Tensor:
    """The phase's held-out windows (``[val_windows, seq_len]``), the same on every rank."""
    from shortened.models import load_tokenizer
    from shortened.training.validation import validation_windows

    cfg = t.phase.train
    return validation_windows(cfg.data, load_tokenizer(t.phase.model), cfg.val_windows)


def _train_micro_batch(t: Training, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward, backward and DeepSpeed's step (an optimizer step at the gradient-accumulation boundary) on one
    micro-batch; the loss is the model's, plus the weighted distillation loss against the teacher when there is
    one. Returns the loss."""
    cfg = t.phase.train
    inputs = model_inputs(batch, t.session.device, t.flatten)
    out = t.engine(**inputs, use_cache=False)
    loss = out.loss
    if t.teacher is not None:
        with torch.no_grad():
            t_logits = t.teacher(input_ids=inputs["input_ids"], position_ids=inputs.get("position_ids"),
                                 use_cache=False).logits
        loss = loss + cfg.distill.weight * distill_loss(out.logits, t_logits, inputs["labels"],
                                                        cfg.distill.temperature, cfg.distill.chunk_tokens)
        del t_logits
    t.engine.backward(loss)
    t.engine.step()
    return loss


def _crosses(tokens: int, tokens_per_step: int, every: int | None) -> bool:
    """Whether the step that brought the count to ``tokens`` crossed a multiple of ``every`` (None: never)."""
    return every is not None and tokens // every > (tokens - tokens_per_step) // every


def _window_metrics(t: Training, window: torch.Tensor, *, time_start: float, tokens: int) -> dict:
    """The metrics of the steps since the last report: ``window`` (this rank's [loss sum, micro-batches]) summed
    over the ranks, the mean loss, the LR, the tokens trained and the throughput since ``time_start``."""
    cfg, world = t.phase.train, t.session.world_size
    torch.distributed.all_reduce(window)
    loss_sum, n = window.tolist()
    seconds = time.perf_counter() - time_start
    return {"step": t.step, "steps_total": t.steps_total, "loss": loss_sum / n,
            "lr": t.scheduler.get_last_lr()[0], "tokens": tokens, "tokens_per_s":
            n / cfg.grad_accum / world * cfg.tokens_per_step(world) / max(seconds, 1e-9),
            "epoch": t.stream.epoch,
            "phase": t.phase.method}


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, flatten: bool = False) -> dict:
    """The micro-batch (``[micro_batch, seq_len]`` CPU tensors from :func:`take`) as the model's keyword arguments
    on ``device``: ``input_ids``, ``labels`` and, when the data carries them, per-document ``position_ids``.

    ``flatten`` (with position ids and more than one row): the rows are joined into one ``[1, micro_batch ×
    seq_len]`` row, because flash-attention splits a row into documents by its position ids only when the batch
    has one row. Each row's positions start at 0, so rows stay separate; each row's first label is set to -100 so
    the loss has the same targets as the unflattened batch (a row's last token does not predict the next row)."""
    ids, labels, pos = batch["input_ids"], batch["labels"], batch.get("position_ids")
    if flatten and pos is not None and ids.shape[0] > 1:
        labels = labels.clone()
        labels[:, 0] = IGNORE_INDEX  # never a target within its row (the model shifts labels left by one)
        ids, labels, pos = ids.reshape(1, -1), labels.reshape(1, -1), pos.reshape(1, -1)
    inputs = {"input_ids": ids.to(device, non_blocking=True), "labels": labels.to(device, non_blocking=True)}
    if pos is not None:
        inputs["position_ids"] = pos.to(device, non_blocking=True)
    return inputs
