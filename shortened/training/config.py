"""What a retraining run does: method, data, token budget, optimizer, DeepSpeed ZeRO, checkpoints, scale.

Defaults are the paper's CPT settings (AdamW, betas 0.9/0.95, weight decay 0.1, lr 1e-4, warmup then cosine) and
its LoRA settings (r 8, alpha 16, dropout 0.05 on q,k,v,o,gate,up,down).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shortened.data.config import DataConfig

# The retraining methods, defined here once: TrainConfig.method, the CLI's --method choices, a sweep's methods
# (which add "none") and every message that lists them come from this.
Method = Literal["cpt", "lora", "cpt+lora", "distill", "partial"]
METHODS: tuple[str, ...] = get_args(Method)
# What one phase (one TorchTrainer run) trains: cpt+lora runs a CPT phase, then a LoRA phase (PHASES).
PhaseMethod = Literal["cpt", "lora", "distill", "partial"]
PHASE_METHODS: tuple[str, ...] = get_args(PhaseMethod)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(BaseModel):
    """LoRA adapters (methods ``lora`` and ``cpt+lora``): each architecture's modules that play the
    ``target_modules`` roles are adapted, fused ones included (see :func:`shortened.training.lora.resolve_lora_targets`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

    r: int = Field(8, ge=1, le=4096)
    """LoRA rank (paper: 8)."""
    alpha: int = Field(16, ge=1, le=65536)
    """LoRA scaling alpha (paper: 16)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input (paper: 0.05)."""
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)
    """Roles (q, k, v, o, gate, up, down; Llama's names q_proj … down_proj stand for them) or module names of the
    blocks to adapt."""
    lr: float = Field(1e-4, gt=0, le=1)
    """LoRA's own learning rate (paper: 1e-4)."""
    train_tokens: int | None = Field(None, ge=1)
    """For cpt+lora: the LoRA phase's token budget (default: train_tokens)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """The LoRA phase's DeepSpeed ZeRO stage (``lora`` and the second phase of ``cpt+lora``; the full-parameter
    phases use zero_stage). LoRA trains ~0.1-1% of the weights, so partitioning their gradients and optimizer state
    saves next to nothing, while ZeRO-3 would also partition the frozen base weights and all-gather every one of
    them in each forward and backward pass (for an 8B model ~16 GB moved per pass). Stage 2 keeps the frozen weights
    whole on each GPU (bf16: 2 bytes/parameter, 16 GB for 8B) with no per-step gather; it is the default rather
    than 0 because CPU optimizer offload (offload_optimizer) needs a stage >= 1 and it costs no more than 0 here.
    Set 3 when the frozen model does not fit on one GPU."""


class DistillSettings(BaseModel):
    """Distillation from the unpruned model (method ``distill``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

    teacher: str | None = None
    """The unpruned model (default: the ``model`` that pruning.json beside the student names)."""
    weight: float = Field(1.0, ge=0, le=1e6)
    """Weight of the KL term: loss = CE + weight * T^2 * KL(teacher || student)."""
    temperature: float = Field(2.0, gt=0, le=1e3)
    """Softmax temperature T of the KL term."""
    chunk_tokens: int = Field(1024, ge=1, le=1 << 24)
    """Positions per chunk of the KL term: only one chunk of the student and teacher logits is upcast to fp32 at a
    time (forward and backward), so its extra memory is a few chunk_tokens x vocab x 4 bytes (1024 positions x
    128k vocabulary: ~0.5 GB per fp32 copy) instead of several copies of both [batch, seq, vocab] tensors. The
    value is the same for any chunk size (up to fp32 summation order)."""


# the phases (TorchTrainer runs) of each method
PHASES: dict[Method, tuple[PhaseMethod, ...]] = {"cpt": ("cpt",), "lora": ("lora",), "cpt+lora": ("cpt", "lora"),
                                                 "distill": ("distill",), "partial": ("partial",)}
STAGE_FIELD: dict[PhaseMethod, str] = {"cpt": "zero_stage", "distill": "zero_stage", "partial": "zero_stage",
                                       "lora": "lora.zero_stage"}


def phase_zero_stage(cfg: TrainConfig, phase_method: str) -> int:
    """The ZeRO stage a phase runs with: ``lora.zero_stage`` for a LoRA phase, ``zero_stage`` for the
    full-parameter ones (cpt, distill, partial)."""
    return cfg.lora.zero_stage if phase_method == "lora" else cfg.zero_stage


class TrainConfig(BaseModel):
    """One retraining run. Budgeted in tokens: ``train_tokens`` across all workers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

    method: Method = "cpt"
    """cpt: all parameters (continued pretraining); lora: LoRA adapters, merged on export; cpt+lora: CPT, then LoRA
    on the result; distill: CPT with a KL term towards the unpruned model; partial: full-parameter training of the
    last partial_blocks blocks, the final norm and the LM head only, everything else frozen (Lu et al., "Reassessing
    Layer Pruning in LLMs", 2024)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The training data."""
    train_tokens: int = Field(..., ge=1)
    """Token budget across all workers."""
    micro_batch_size: int = Field(1, ge=1, le=1 << 20)
    """Sequences per worker per micro-step."""
    grad_accum: int = Field(1, ge=1, le=1 << 20)
    """Micro-steps per optimizer step."""
    global_batch_size: int | None = Field(None, ge=1)
    """Sequences per optimizer step across all workers, fixed for the run: the data order and the number of steps
    follow it, so a run resumed (or elastically resized) with another worker count trains the same batches. None:
    micro_batch_size x grad_accum x the worker count at the run's first start (the most workers, with an elastic
    range); a resume keeps the checkpoint's. Each worker count must divide it: a worker trains global_batch_size /
    workers sequences per step, as grad_accum micro-batches of at most micro_batch_size (re-split when the worker
    count differs from the one micro_batch_size and grad_accum were set for)."""
    lr: float = Field(1e-4, gt=0, le=1)
    """Peak learning rate (paper: 1e-4)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of the steps spent warming up linearly."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = Field(0.1, ge=0, le=1)
    """AdamW weight decay (on matrices)."""
    grad_clip: float = Field(1.0, gt=0)
    """Maximum gradient norm (clipped to it)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage of the full-parameter phases (cpt, distill, partial, and the CPT phase of cpt+lora); the
    LoRA phase uses lora.zero_stage (see :func:`phase_zero_stage`)."""
    offload_optimizer: bool = False
    """ZeRO optimizer state in CPU memory (DeepSpeed CPU Adam, JIT-built once). Offload applies to the phases whose
    stage allows it, and is dropped (with a log line) for the others."""
    offload_params: bool = False
    """ZeRO-3 parameters in CPU memory (e.g. a cpt+lora run offloads the CPT phase's ZeRO-3 parameters but not the
    LoRA phase's at stage 2)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 on GPUs that support it, fp16 (loss-scaled) on older GPUs, fp32 on CPU (device.auto_dtype)."""
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the exported checkpoint; auto: the trained (pruned) model's config.json dtype, else the training
    dtype."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute)."""
    attn_implementation: str = Field("auto", min_length=1)
    """transformers' attention kernel for training (and the distillation teacher): auto is flash_attention_2 on
    CUDA in bf16/fp16 when flash-attn is installed, else sdpa (eager where the architecture has no sdpa); or name
    one."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    """LoRA settings (methods lora and cpt+lora)."""
    distill: DistillSettings = Field(default_factory=DistillSettings)
    """Distillation settings (method distill)."""
    partial_blocks: int = Field(3, ge=1, le=1 << 16)
    """For partial: how many of the last (kept) blocks train, with the final norm and the LM head (an LM head tied
    to the input embeddings trains them too); at most the model's block count (checked before workers start)."""
    report_every_steps: int = Field(10, ge=1)
    """Optimizer steps between metric reports (each report is a barrier across workers)."""
    val_every_tokens: int | None = Field(None, ge=1)
    """Held-out validation every this many tokens trained, and after the last step: the loss and perplexity of
    val_windows fixed windows of the data source's validation split reported as val_loss, val_ppl (a sweep's ASHA
    scheduler stops trials on them). None: no validation."""
    val_windows: int = Field(4, ge=1, le=100_000)
    """Windows of data.seq_len tokens drawn once (seed 0) from the validation split for val_every_tokens."""
    checkpoint_every_tokens: int | None = Field(None, ge=1)
    """Tokens between checkpoints (None: only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints Ray Train keeps."""
    checkpoint_upload: Literal["async", "sync"] = "async"
    """How a checkpoint reaches the storage path: async (Ray Train uploads the staged shards in the background
    while training goes on; the staging folder holds them until then) or sync (every worker waits for the
    upload)."""
    checkpoint_staging_dir: str | None = None
    """Local folder where each worker writes its DeepSpeed shards before the session (Ray Train, LocalSession)
    takes them to storage; None: the system temporary folder (tempfile.gettempdir(), honouring $TMPDIR), often a
    small container /tmp. A ZeRO checkpoint holds 12 bytes of fp32 master weights and Adam state per trainable
    parameter (a CPT of 6.7B parameters at ZeRO-3 with 8 GPUs on a node: ~80 GB on that node), so point this at a
    large local disk. Free space is checked before every checkpoint (checkpoint.check_staging_space)."""
    seed: int = Field(0, ge=0, lt=2**63)
    """torch's seed on every worker (LoRA initialisation, dropout); the data order has its own data.seed."""
    token_log: bool = False
    """Audit: each rank logs a hash of every micro-batch it trains on."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        # offload that no phase of this method can use is an error (a phase that cannot use it drops it)
        stages = {m: phase_zero_stage(self, m) for m in PHASES[self.method]}
        where = ", ".join(f"{STAGE_FIELD[m]} {s} ({m})" for m, s in stages.items())
        if self.offload_params and 3 not in stages.values():
            raise ValueError(f"offload_params needs zero_stage 3 in a phase, got {where}")
        if self.offload_optimizer and not any(stages.values()):
            raise ValueError(f"offload_optimizer needs a ZeRO stage of 1, 2 or 3 in a phase, got {where}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step across ``world_size`` workers: ``global_batch_size``, else
        ``micro_batch_size × grad_accum × world_size``."""
        return self.global_batch_size or self.micro_batch_size * self.grad_accum * world_size

    def tokens_per_step(self, world_size: int) -> int:
        return self.global_batch(world_size) * self.data.seq_len

    def total_steps(self, world_size: int, tokens: int | None = None) -> int:
        """Optimizer steps to reach the budget (rounded up: at least the budget is trained)."""
        return -(-(tokens or self.train_tokens) // self.tokens_per_step(world_size))

    def for_world_size(self, world_size: int) -> TrainConfig:
        """This config split over ``world_size`` workers with the global batch fixed (:meth:`global_batch`, made
        explicit): each worker trains ``global_batch / world_size`` sequences per step as ``grad_accum``
        micro-batches of the largest size up to ``micro_batch_size`` that divides them. Example: 2 × 1 × 2 workers
        on 1 worker is 2 × 2; on 4 workers, 1 × 1. Raises ValueError when ``world_size`` does not divide it."""
        batch = self.global_batch(world_size)
        if batch % world_size:
            raise ValueError(f"a global batch of {batch} sequences (global_batch_size) cannot be split evenly over "
                             f"{world_size} workers")
        per_worker = batch // world_size
        micro = next(m for m in range(min(self.micro_batch_size, per_worker), 0, -1) if per_worker % m == 0)
        return self.model_copy(update={"global_batch_size": batch, "micro_batch_size": micro,
                                       "grad_accum": per_worker // micro})
