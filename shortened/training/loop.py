"""The per-worker training loop: a plain function. DeepSpeed ZeRO over a causal LM fed by this rank's packed
stream; metrics every N steps; DeepSpeed checkpoints plus the data cursor every N tokens; resume at the exact next
token; a consolidated Hugging Face checkpoint at the end.

``train_worker(config)`` is what Ray Train runs on every worker; :func:`run` works with any :class:`Session`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from shortened.cluster import node_id
from shortened.data import PackedStream, take
from shortened.training.config import TrainConfig
from shortened.training.deepspeed_config import deepspeed_config, resolve_precision
from shortened.training.session import RaySession, Session

log = logging.getLogger(__name__)
CKPT_TAG = "ckpt"


class Phase(BaseModel):
    """One TorchTrainer run: train ``model`` with ``method`` for ``tokens``, export to ``out``."""

    model_config = ConfigDict(extra="forbid")

    method: str  # cpt | lora | distill
    model: str
    out: str
    tokens: int
    train: TrainConfig
    teacher: str | None = None


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    run(Phase.model_validate(config), RaySession())


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on biases and norm weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(phase: Phase, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from shortened.models import load_model

    model = load_model(phase.model, device="cpu", dtype=str(dtype).removeprefix("torch."))
    if phase.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if phase.method == "lora":
        model = with_lora(model, phase.train)
    return model


def with_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.lora.target_modules if t in names]
    if not targets:
        from shortened.errors import ShortenedError

        raise ShortenedError(f"LoRA target modules {cfg.lora.target_modules} match no module of this model")
    return get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) over the predicted positions (labels != -100), mean per token."""
    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def _skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed JIT-builds a shared-memory all-reduce op in ``init_distributed`` (~60 s, and a worker
    killed mid-build leaves a lock that hangs every later start). Training does not need it: gloo does the
    collectives. ``SHORTENED_DS_SHM_COMM=1`` keeps DeepSpeed's default."""
    import deepspeed.ops

    if os.environ.get("SHORTENED_DS_SHM_COMM") != "1" and not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def run(phase: Phase, session: Session) -> dict:
    import deepspeed

    _skip_shm_comm_build()

    from shortened.models import load_model, load_tokenizer

    cfg = phase.train
    rank, world = session.rank, session.world_size
    device = session.device
    precision = resolve_precision(cfg, device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(phase.model)
    model = build_model(phase)
    teacher = None
    if phase.method == "distill":
        teacher = load_model(phase.teacher, device=str(device),
                             dtype="bfloat16" if precision == "bf16" else "float32").eval().requires_grad_(False)

    steps_total = cfg.total_steps(world, phase.tokens)
    warmup = int(cfg.warmup_ratio * steps_total)
    lr = cfg.lora.lr if phase.method == "lora" else cfg.lr
    groups = param_groups(model, cfg.weight_decay)
    ds_cfg = deepspeed_config(cfg, world, precision)
    if "optimizer" in ds_cfg:
        ds_cfg["optimizer"]["params"]["lr"] = lr
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None, config=ds_cfg,
        lr_scheduler=lambda opt: cosine_with_warmup(opt, steps_total, warmup, cfg.min_lr_ratio))

    stream = PackedStream(cfg.data, tokenizer, rank=rank, world_size=world)
    step, history = 0, []
    with session.restore() as ckpt:
        if ckpt is not None:
            engine.load_checkpoint(ckpt, tag=CKPT_TAG)
            state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
            step, history = state["step"], state["history"]
            stream.load_state_dict(json.loads((Path(ckpt) / f"data_cursor_rank{rank}.json").read_text()))
            log.info("rank %d resumed at step %d from %s", rank, step, ckpt)
    tokens_per_step = cfg.tokens_per_step(world)
    ckpt_every = cfg.checkpoint_every_tokens
    token_log = Path(phase.out).parent / f".{Path(phase.out).name}.tokens" if cfg.token_log else None
    it = iter(stream)
    engine.train()
    window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
    metrics: dict = {}
    while step < steps_total:
        for micro in range(cfg.grad_accum):
            batch = take(it, cfg.micro_batch_size)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            if token_log is not None:
                _log_tokens(token_log, rank, step, micro, ids)
            out = engine(input_ids=ids, labels=labels, use_cache=False)
            loss = out.loss
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, use_cache=False).logits
                loss = loss + cfg.distill.weight * distill_loss(out.logits, t_logits, labels, cfg.distill.temperature)
            engine.backward(loss)
            engine.step()
            window_loss += loss.item()
            window_n += 1
        step += 1
        tokens = step * tokens_per_step
        save = step == steps_total or (ckpt_every is not None and tokens // ckpt_every
                                       > (tokens - tokens_per_step) // ckpt_every)
        if step % cfg.report_every_steps == 0 or save:
            mean = torch.tensor([window_loss, window_n], dtype=torch.float64)
            torch.distributed.all_reduce(mean)
            seconds = time.perf_counter() - window_start
            metrics = {"step": step, "steps_total": steps_total, "loss": mean[0].item() / mean[1].item(),
                       "lr": scheduler.get_last_lr()[0], "tokens": tokens, "tokens_per_s":
                       mean[1].item() / cfg.grad_accum / world * tokens_per_step / max(seconds, 1e-9),
                       "epoch": stream.cursor.position.epoch if stream.cursor.position else 0,
                       "phase": phase.method}
            history.append(metrics)
            if save:
                _checkpoint(engine, stream, session, metrics, history, rank)
            else:
                session.report(metrics)
            if rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e tokens %d (%.0f tok/s)", step, steps_total, metrics["loss"],
                         metrics["lr"], tokens, metrics["tokens_per_s"])
            window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
        _maybe_fail(rank, step)
    export(engine, phase, rank, history)
    return history[-1] if history else {}


def _maybe_fail(rank: int, step: int) -> None:
    """Fault injection for tests: ``SHORTENED_FAULT="RANK:STEP:MARKER[:ACTION]"`` acts once on that rank after that
    step (the marker file records that it happened). ACTION ``kill`` (default) SIGKILLs the rank; ``hold`` writes
    the rank's pid and node into the marker and waits (up to 10 min) for the test to kill its node."""
    spec = os.environ.get("SHORTENED_FAULT")
    if not spec:
        return
    fault_rank, fault_step, rest = spec.split(":", 2)
    marker, _, action = rest.partition(":")
    if rank != int(fault_rank) or step != int(fault_step) or os.path.exists(marker):
        return
    if action == "hold":
        tmp = f"{marker}.tmp"
        Path(tmp).write_text(json.dumps({"pid": os.getpid(), "node": _node_id(), "step": step}))
        os.replace(tmp, marker)
        log.warning("fault injection: rank %d (pid %d) holds after step %d for its node to be killed", rank,
                    os.getpid(), step)
        time.sleep(600)
        return
    Path(marker).touch()
    log.warning("fault injection: killing rank %d (pid %d) after step %d", rank, os.getpid(), step)
    os.kill(os.getpid(), signal.SIGKILL)


_node_id = functools.lru_cache(maxsize=1)(node_id)  # asked once per micro-batch by the token log


def _log_tokens(path: Path, rank: int, step: int, micro: int, ids: torch.Tensor) -> None:
    """Audit log: which tokens each (step, micro-batch) of this rank trained on; a redone step appends again."""
    digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]
    with open(f"{path}.rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "micro": micro, "sha": digest, "node": _node_id()}) + "\n")


def trained_tokens(out: str | Path, world_size: int) -> dict[int, dict[tuple[int, int], str]]:
    """From a run's token log: per rank, the batch each (step, micro) finally trained on (last attempt wins)."""
    out = Path(out)
    result = {}
    for rank in range(world_size):
        final: dict[tuple[int, int], str] = {}
        for line in open(out.parent / f".{out.name}.tokens.rank{rank}.jsonl"):
            e = json.loads(line)
            final[(e["step"], e["micro"])] = e["sha"]
        result[rank] = final
    return result


def _checkpoint(engine, stream: PackedStream, session: Session, metrics: dict, history: list[dict],
                rank: int) -> None:
    """Every rank writes its DeepSpeed shards and data cursor to a local folder; the session merges them."""
    tmp = tempfile.mkdtemp(prefix="shortened-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=CKPT_TAG)
        (Path(tmp) / f"data_cursor_rank{rank}.json").write_text(json.dumps(stream.state_dict()))
        if rank == 0:
            (Path(tmp) / "trainer_state.json").write_text(json.dumps({**metrics, "history": history}))
        session.report(metrics, checkpoint_dir=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(engine, phase: Phase, rank: int, history: list[dict]) -> None:
    """One Hugging Face checkpoint on rank 0 (ZeRO-3 shards gathered; LoRA merged), pruning plan beside it."""
    from shortened.io import publish_dir
    from shortened.models import load_tokenizer

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    out = Path(phase.out)
    model = build_model(phase)  # a fresh CPU copy, same structure, to load the trained weights into
    missing, unexpected = model.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if unexpected or missing:
        raise RuntimeError(f"exported state does not fit the model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    if phase.method == "lora":
        model = model.merge_and_unload()
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    load_tokenizer(phase.model).save_pretrained(staging)
    plan = Path(phase.model) / "pruning.json"
    if plan.is_file():
        shutil.copy(plan, staging / "pruning.json")
    (staging / "retraining.json").write_text(json.dumps({"method": phase.method, "base_model": phase.model,
                                                         "tokens": phase.tokens, "teacher": phase.teacher,
                                                         "config": phase.train.model_dump(mode="json"),
                                                         "history": history}, indent=2))
    publish_dir(staging, out)
