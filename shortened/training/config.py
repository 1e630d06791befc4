"""What a retraining run does: method, data, token budget, optimizer, DeepSpeed ZeRO, checkpoints, scale.

Defaults are the paper's CPT settings (AdamW, betas 0.9/0.95, weight decay 0.1, lr 1e-4, warmup then cosine) and
its LoRA settings (r 8, alpha 16, dropout 0.05 on q,k,v,o,gate,up,down).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shortened.data.config import DataConfig

Method = Literal["cpt", "lora", "cpt+lora", "distill"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(BaseModel):
    """``target_modules`` are roles (q, k, v, o, gate, up, down; Llama's names q_proj … down_proj stand for them)
    or module names of the blocks; each architecture's modules that play the roles are adapted, fused ones included
    (see :func:`shortened.training.loop.resolve_lora_targets`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(8, ge=1, le=4096)
    alpha: int = Field(16, ge=1, le=65536)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)
    lr: float = Field(1e-4, gt=0, le=1)  # LoRA's own learning rate (paper: 1e-4)
    train_tokens: int | None = Field(None, ge=1)  # for cpt+lora: the LoRA phase's budget (default: train_tokens)


class DistillSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    teacher: str | None = None  # the unpruned model; default: pruning.json's "model" beside the student
    weight: float = Field(1.0, ge=0, le=1e6)  # loss = CE + weight * T^2 * KL(teacher || student)
    temperature: float = Field(2.0, gt=0, le=1e3)


class TrainConfig(BaseModel):
    """One retraining run. Budgeted in tokens: ``train_tokens`` across all workers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Method = "cpt"
    data: DataConfig = Field(default_factory=DataConfig)
    train_tokens: int = Field(..., ge=1)
    micro_batch_size: int = Field(1, ge=1, le=1 << 20)  # sequences per worker per micro-step
    grad_accum: int = Field(1, ge=1, le=1 << 20)
    lr: float = Field(1e-4, gt=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # share of the steps spent warming up linearly
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory (DeepSpeed CPU Adam, JIT-built once)
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs, fp32 on CPU
    # dtype of the exported checkpoint; auto: the trained (pruned) model's config.json dtype, else the training dtype
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    lora: LoraSettings = Field(default_factory=LoraSettings)
    distill: DistillSettings = Field(default_factory=DistillSettings)
    report_every_steps: int = Field(10, ge=1)  # each report is a barrier across workers
    checkpoint_every_tokens: int | None = Field(None, ge=1)  # None: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    token_log: bool = False  # audit: each rank logs a hash of every micro-batch it trains on

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs a ZeRO stage of 1, 2 or 3")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self

    def tokens_per_step(self, world_size: int) -> int:
        return self.micro_batch_size * self.data.seq_len * self.grad_accum * world_size

    def total_steps(self, world_size: int, tokens: int | None = None) -> int:
        """Optimizer steps to reach the budget (rounded up: at least the budget is trained)."""
        return -(-(tokens or self.train_tokens) // self.tokens_per_step(world_size))
