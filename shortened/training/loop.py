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
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from shortened.cluster import node_id
from shortened.data import PackedStream, take
from shortened.data.formats import IGNORE_INDEX
from shortened.errors import ShortenedError
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
    run: str = ""  # the Ray Train run's name
    earlier: list[str] = []  # output folders of the phases before this one (cpt+lora: the CPT export)


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


def build_model(phase: Phase, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
                ) -> torch.nn.Module:
    """The model a phase trains, on the CPU (DeepSpeed moves and casts it): LoRA-wrapped for ``lora``."""
    from shortened.models import load_model

    model = load_model(phase.model, device="cpu", dtype=str(dtype).removeprefix("torch."),
                       attn_implementation=attn_implementation)
    if phase.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if phase.method == "lora":
        model = with_lora(model, phase.train)
    return model


# The paper's LoRA targets are roles: q, k, v, o in attention; gate, up, down in the MLP. Each architecture names the
# modules that play them differently, and some fuse several roles into one module (qkv_proj, c_attn,
# query_key_value: q+k+v; gate_up_proj: gate+up). Llama's names (q_proj, …) stand for their roles.
ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ROLE_OF_NAME = {f"{r}_proj": r for r in ROLES}
_NAME_ROLES = {
    **{n: ["q"] for n in ("q_proj", "query", "wq", "q", "query_proj")},
    **{n: ["k"] for n in ("k_proj", "key", "wk", "k", "key_proj")},
    **{n: ["v"] for n in ("v_proj", "value", "wv", "v", "value_proj")},
    **{n: ["q", "k", "v"] for n in ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "qkv", "W_pack", "in_proj",
                                    "att_proj")},
    **{n: ["o"] for n in ("o_proj", "out_proj", "wo", "o", "attn_out")},
    **{n: ["gate"] for n in ("gate_proj", "w1")},
    **{n: ["up"] for n in ("up_proj", "w3", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "ff_proj")},
    **{n: ["gate", "up"] for n in ("gate_up_proj",)},
    **{n: ["down"] for n in ("down_proj", "w2", "fc2", "fc_out", "dense_4h_to_h", "ff_out")},
}
_CONTEXT_ROLES = ("c_proj", "dense", "proj", "out", "out_proj")  # o in attention, down in the MLP
_ROUTERS = ("gate", "router", "shared_expert_gate", "switch")  # MoE routing layers: not adapted


@dataclass
class LoraTargets:
    """The block modules LoRA adapts: their names relative to a block, the roles each plays, and the requested
    targets that matched nothing."""

    block_path: str
    modules: dict[str, list[str]]  # relative name (expert indices as '*') -> roles
    unmatched: list[str]

    def regex(self) -> str:
        alts = "|".join(re.escape(n).replace(r"\*", r"\d+") for n in self.modules)
        return rf"(?:.*\.)?{re.escape(self.block_path)}\.\d+\.(?:{alts})"

    def to_json(self) -> dict:
        by_role = {r: [n for n, roles in self.modules.items() if r in roles] for r in ROLES}
        return {"modules": list(self.modules), "roles": {r: v for r, v in by_role.items() if v},
                "unmatched": self.unmatched}


def _linear_out(mod: torch.nn.Module) -> int | None:
    return getattr(mod, "out_features", None) or getattr(mod, "nf", None)


def block_linears(model: torch.nn.Module) -> tuple[str, dict[str, list[str]]]:
    """Every Linear/Conv1D inside the decoder blocks (names relative to a block, expert indices as '*'), with the
    LoRA roles it plays: by its name where the name says it, else by where it sits and its shape."""
    from transformers.pytorch_utils import Conv1D

    from shortened.blocks import find_blocks, text_config

    blocks = find_blocks(model)
    hidden = getattr(text_config(model.config), "hidden_size", None)
    found: dict[str, list[str]] = {}
    for block in blocks.blocks:
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
        for i, (name, mod) in enumerate(linears):
            rel = re.sub(r"\.\d+\.", ".*.", f".{name}.")[1:-1]
            if rel in found:
                continue
            parent, _, leaf = name.rpartition(".")
            where = parent.lower()
            in_attn = "attn" in where or "attention" in where
            in_mlp = any(w in where for w in ("mlp", "ffn", "feed_forward", "expert"))
            if leaf in _ROUTERS and not in_attn:
                continue
            if leaf in _CONTEXT_ROLES and (in_attn or in_mlp):
                roles = ["o"] if in_attn else ["down"]
            elif leaf in _NAME_ROLES:
                roles = _NAME_ROLES[leaf]
            elif in_attn:  # unknown name: the projection back to the hidden size is o, the others q/k/v
                later = [m for n, m in linears[i + 1:] if n.rpartition(".")[0] == parent]
                roles = ["o"] if _linear_out(mod) == hidden and not later else ["q", "k", "v"]
            elif in_mlp:
                roles = ["down"] if _linear_out(mod) == hidden else ["up"]
            else:
                continue
            found[rel] = roles
    return blocks.path, found


def resolve_lora_targets(model: torch.nn.Module, requested: list[str]) -> LoraTargets:
    """Map the requested targets to this architecture's block modules: a name that is a module of the blocks (its
    last part, or its path within a block) is taken as is; a role (q, k, v, o, gate, up, down) or Llama's name for
    it (q_proj, …, down_proj) takes every module that plays that role, fused ones included."""
    path, linears = block_linears(model)
    chosen: dict[str, list[str]] = {}
    unmatched = []
    for t in requested:
        literal = [n for n in linears if n == t or n.endswith(f".{t}")]
        role = t if t in ROLES else ROLE_OF_NAME.get(t)
        by_role = [n for n, roles in linears.items() if role in roles] if role else []
        hits = literal or by_role
        if not hits:
            unmatched.append(t)
        for n in hits:
            chosen[n] = linears[n]
    return LoraTargets(block_path=path, modules=chosen, unmatched=unmatched)


def with_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """peft LoRA on the blocks' modules that play the requested roles (see :func:`resolve_lora_targets`). A target
    that matches nothing is a warning naming it; none at all is an error. The resolution is kept on the returned
    model as ``shortened_lora_targets`` (and recorded in ``retraining.json``)."""
    from peft import LoraConfig, get_peft_model

    from shortened.errors import ShortenedError

    targets = resolve_lora_targets(model, cfg.lora.target_modules)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if not targets.modules:
        raise ShortenedError(f"LoRA target modules {cfg.lora.target_modules} match no module of the {model_type} "
                             f"blocks (their linear modules: {', '.join(block_linears(model)[1]) or 'none'})")
    if targets.unmatched:
        log.warning("LoRA target(s) %s match no module of the %s blocks and are not adapted (adapted: %s)",
                    ", ".join(targets.unmatched), model_type, ", ".join(targets.modules))
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                  lora_dropout=cfg.lora.dropout, target_modules=targets.regex(),
                                                  task_type="CAUSAL_LM"))
    peft_model.shortened_lora_targets = targets.to_json()
    return peft_model


class _ChunkedKL(torch.autograd.Function):
    """``T² / n · Σ_rows KL(softmax(t/T) ‖ softmax(s/T))`` over the rows ``rows`` (n of them) of ``s`` and ``t``
    (``[N, V]``, any float dtype), computed ``chunk`` rows at a time in fp32, forward and backward.

    Autograd through the plain expression would keep the fp32 log-softmaxes of every row for the backward pass;
    here only the inputs are kept and the gradient is recomputed per chunk: d/ds = T/n · (softmax(s/T) −
    softmax(t/T)), written into a gradient of ``s``'s dtype. The teacher ``t`` is a constant (no gradient)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, temperature: float,
                chunk: int) -> torch.Tensor:
        total = s.new_zeros((), dtype=torch.float32)
        for i in range(0, rows.numel(), chunk):
            idx = rows[i:i + chunk]
            log_s = torch.log_softmax(s.index_select(0, idx).float().div_(temperature), -1)
            log_t = torch.log_softmax(t.index_select(0, idx).float().div_(temperature), -1)
            log_s.neg_().add_(log_t)  # log p_t − log p_s
            total += torch.dot(log_t.exp_().view(-1), log_s.view(-1))  # Σ p_t (log p_t − log p_s)
            del log_s, log_t
        ctx.save_for_backward(s, t, rows)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total * (temperature**2 / max(rows.numel(), 1))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        s, t, rows = ctx.saved_tensors
        grad = torch.zeros_like(s)
        scale = grad_out * (ctx.temperature / max(rows.numel(), 1))
        for i in range(0, rows.numel(), ctx.chunk):
            idx = rows[i:i + ctx.chunk]
            p_s = torch.softmax(s.index_select(0, idx).float().div_(ctx.temperature), -1)
            p_t = torch.softmax(t.index_select(0, idx).float().div_(ctx.temperature), -1)
            grad.index_copy_(0, idx, p_s.sub_(p_t).mul_(scale).to(grad.dtype))
            del p_s, p_t
        return grad, None, None, None, None


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float, chunk_tokens: int = 1024) -> torch.Tensor:
    """T² · KL(teacher ‖ student) over the predicted positions (position i predicts ``labels[:, i + 1]``, counted
    where that label is not -100), mean per predicted position; 0 when there is none.

    ``student_logits`` and ``teacher_logits`` are ``[batch, seq, vocab]`` (any float dtype; the teacher's carry no
    gradient), ``labels`` ``[batch, seq]``. The KL is taken ``chunk_tokens`` positions at a time, each chunk
    upcast to fp32 on its own, so a 128k vocabulary never has a full-size fp32 copy of either tensor: the extra
    memory is a few ``chunk_tokens × vocab × 4`` bytes, forward and backward. Same value for every chunk size."""
    vocab = student_logits.shape[-1]
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    rows = valid.reshape(-1).nonzero().squeeze(1)
    return _ChunkedKL.apply(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), rows,
                            float(temperature), int(chunk_tokens))


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


def _varlen_attention(*models) -> bool:
    """Whether any of the models runs a flash-attention implementation, which separates documents only within a
    one-row batch (transformers' sdpa, eager and flex build a per-document mask from position ids per row)."""
    return any("flash" in str(getattr(getattr(m, "config", None), "_attn_implementation", "") or "")
               for m in models if m is not None)


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

    from shortened.device import resolve_attn_implementation
    from shortened.models import attn_used, load_model, load_tokenizer

    cfg = phase.train
    rank, world = session.rank, session.world_size
    device = session.device
    if device.type == "cuda":  # NCCL collectives (ours, DeepSpeed's, the barriers) run on the current device
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg, device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(phase.model)
    # resolved for the device and precision the model trains in, not the CPU it is loaded on; flash-attention
    # loads in the training dtype (DeepSpeed casts the module to it anyway)
    train_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    attn = resolve_attn_implementation(cfg.attn_implementation, device, train_dtype)
    model = build_model(phase, train_dtype if attn.startswith("flash") else torch.float32, attn)
    teacher = None
    if phase.method == "distill":
        teacher = load_model(phase.teacher, device=str(device), dtype="bfloat16" if precision == "bf16" else "float32",
                             attn_implementation=attn).eval().requires_grad_(False)

    steps_total = cfg.total_steps(world, phase.tokens)
    warmup = int(cfg.warmup_ratio * steps_total)
    lr = cfg.lora.lr if phase.method == "lora" else cfg.lr
    groups = param_groups(model, cfg.weight_decay)
    ds_cfg = deepspeed_config(cfg, world, precision, phase.method)
    zero_stage = ds_cfg["zero_optimization"]["stage"]
    zero = {"zero_stage": zero_stage, "offload_optimizer": "offload_optimizer" in ds_cfg["zero_optimization"],
            "offload_params": "offload_param" in ds_cfg["zero_optimization"], "attn_implementation": attn_used(model)}
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
    log.info("rank %d: %s phase, ZeRO stage %d, %s, on %s", rank, phase.method, zero_stage, precision, device)

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
    staging = Path(cfg.checkpoint_staging_dir or tempfile.gettempdir()).expanduser()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: whole size
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    staging_need = checkpoint_bytes(n_params, n_trainable, zero_stage=zero_stage, world_size=world,
                                    precision=precision, local_ranks=session.local_world_size,
                                    has_rank0=rank == session.local_rank)
    flatten = cfg.data.document_positions and cfg.micro_batch_size > 1 and _varlen_attention(model, teacher)
    it = iter(stream)
    engine.train()
    # [sum of micro-batch losses, micro-batches] since the last report, on the device: no sync per micro-batch,
    # and the all-reduce (NCCL on GPUs) gets a tensor on its device
    window = torch.zeros(2, dtype=torch.float64, device=device)
    window_start = time.perf_counter()
    metrics: dict = {}
    while step < steps_total:
        for micro in range(cfg.grad_accum):
            batch = take(it, cfg.micro_batch_size)
            if token_log is not None:
                _log_tokens(token_log, rank, step, micro, batch["input_ids"])
            inputs = model_inputs(batch, device, flatten)
            out = engine(**inputs, use_cache=False)
            loss = out.loss
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=inputs["input_ids"], position_ids=inputs.get("position_ids"),
                                       use_cache=False).logits
                loss = loss + cfg.distill.weight * distill_loss(out.logits, t_logits, inputs["labels"],
                                                                cfg.distill.temperature, cfg.distill.chunk_tokens)
                del t_logits
            engine.backward(loss)
            engine.step()
            window[0] += loss.detach().double()
            window[1] += 1
        step += 1
        tokens = step * tokens_per_step
        save = step == steps_total or (ckpt_every is not None and tokens // ckpt_every
                                       > (tokens - tokens_per_step) // ckpt_every)
        if step % cfg.report_every_steps == 0 or save:
            torch.distributed.all_reduce(window)
            loss_sum, n = window.tolist()
            seconds = time.perf_counter() - window_start
            metrics = {"step": step, "steps_total": steps_total, "loss": loss_sum / n,
                       "lr": scheduler.get_last_lr()[0], "tokens": tokens, "tokens_per_s":
                       n / cfg.grad_accum / world * tokens_per_step / max(seconds, 1e-9),
                       "epoch": stream.cursor.position.epoch if stream.cursor.position else 0,
                       "phase": phase.method}
            history.append(metrics)
            if save:
                _checkpoint(engine, stream, session, metrics, history, rank, staging, staging_need)
            else:
                session.report(metrics)
            if rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e tokens %d (%.0f tok/s)", step, steps_total, metrics["loss"],
                         metrics["lr"], tokens, metrics["tokens_per_s"])
            window.zero_()
            window_start = time.perf_counter()
        _maybe_fail(rank, step)
    export(engine, phase, rank, history, world, zero)
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


# Slack over checkpoint_bytes: file headers, pickled metadata, the cursors, the trainer state
_STAGING_MARGIN, _STAGING_SLACK = 1.05, 256 << 20


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


def _checkpoint(engine, stream: PackedStream, session: Session, metrics: dict, history: list[dict],
                rank: int, staging: Path, need: int) -> None:
    """Every rank writes its DeepSpeed shards and data cursor to a folder under ``staging`` (after checking the
    space: :func:`check_staging_space`); the session takes them to storage (merging the ranks' files)."""
    check_staging_space(staging, need, session)
    tmp = tempfile.mkdtemp(prefix="shortened-ckpt-", dir=staging)
    try:
        engine.save_checkpoint(tmp, tag=CKPT_TAG)
        (Path(tmp) / f"data_cursor_rank{rank}.json").write_text(json.dumps(stream.state_dict()))
        if rank == 0:
            (Path(tmp) / "trainer_state.json").write_text(json.dumps({**metrics, "history": history}))
        session.report(metrics, checkpoint_dir=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(engine, phase: Phase, rank: int, history: list[dict], world_size: int = 1,
           zero: dict | None = None) -> None:
    """One Hugging Face checkpoint on rank 0 (ZeRO-3 shards gathered; LoRA merged), pruning plan beside it;
    ``zero`` (the ZeRO stage and offloads the phase ran with) goes into ``retraining.json``."""
    from shortened.io import publish_dir, resolve_save_dtype, save_pretrained_as
    from shortened.models import load_tokenizer

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    out = Path(phase.out)
    model = build_model(phase)  # a fresh fp32 CPU copy, same structure, to load the trained weights into
    trained_in = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    # (copying into the fp32 parameters upcasts exactly: no fp32 copy of the whole state is needed)
    missing, unexpected = model.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if unexpected or missing:
        raise RuntimeError(f"exported state does not fit the model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    targets = getattr(model, "shortened_lora_targets", None)
    if phase.method == "lora":
        model = model.merge_and_unload()
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    # in the --model folder's dtype (a pruned bf16 model is exported in bf16), else the training dtype; LoRA is
    # merged in fp32 above and cast once here, in place (the copy is thrown away)
    saved = save_pretrained_as(model, staging, resolve_save_dtype(phase.train.save_dtype, phase.model,
                                                                  fallback=trained_in), in_place=True)
    load_tokenizer(phase.model).save_pretrained(staging)
    plan = Path(phase.model) / "pruning.json"
    if plan.is_file():
        shutil.copy(plan, staging / "pruning.json")
    (staging / "retraining.json").write_text(json.dumps({**retraining_record(phase, history, world_size, targets,
                                                                             zero), "saved_dtype": saved}, indent=2))
    publish_dir(staging, out)


def retraining_record(phase: Phase, history: list[dict], world_size: int, lora_targets: dict | None = None,
                      zero: dict | None = None) -> dict:
    """``retraining.json``: what this phase actually ran (tokens requested and trained, workers, the ZeRO stage and
    offloads it ran with, the LoRA modules resolved for this architecture), and every phase of the run
    (``cpt+lora``: the CPT phase first). ``zero``: ``{"zero_stage", "offload_optimizer", "offload_params",
    "attn_implementation"}``."""
    trained = int(history[-1]["tokens"]) if history else 0
    this = {"method": phase.method, "run": phase.run, "base_model": phase.model, "teacher": phase.teacher,
            "tokens_requested": phase.tokens, "tokens_trained": trained, "world_size": world_size,
            "steps": int(history[-1]["step"]) if history else 0, **(zero or {})}
    lora = lora_targets if phase.method == "lora" else None
    if lora is not None:
        this["lora_targets"] = lora
    phases = []
    for folder in phase.earlier:
        earlier = Path(folder) / "retraining.json"
        if earlier.is_file():
            phases += json.loads(earlier.read_text()).get("phases", [])
    phases.append(this)
    return {"method": phase.method, "base_model": phase.model, "tokens": phase.tokens, "tokens_trained": trained,
            "world_size": world_size, "teacher": phase.teacher, "lora_targets": lora,
            "zero_stage": (zero or {}).get("zero_stage"), "phases": phases,
            "tokens_trained_total": sum(p["tokens_trained"] for p in phases),
            "config": phase.train.model_dump(mode="json"), "history": history}
