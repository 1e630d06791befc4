"""The DeepSpeed config of a :class:`TrainConfig`: ZeRO stage, offload, precision, batch sizes, clipping."""

from __future__ import annotations

import torch

from shortened.training.config import TrainConfig


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """bf16 on GPUs that support it (fp16 on older ones), fp32 on CPU — unless set."""
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # we report ourselves
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if cfg.offload_optimizer:  # DeepSpeed's CPU Adam: a client torch optimizer cannot be offloaded
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas),
                                                        "weight_decay": cfg.weight_decay}}
    return ds
