"""The DeepSpeed config of a :class:`TrainConfig`'s phase: ZeRO stage, offload, precision, batch sizes, clipping."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from shortened.device import auto_dtype
from shortened.host_memory import mmap_threshold
from shortened.training.config import PHASE_METHODS, TrainConfig, phase_zero_stage

log = logging.getLogger(__name__)


_PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}  # TrainConfig.precision's


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``precision`` unless ``auto``; then :func:`shortened.device.auto_dtype` for training: bf16 on GPUs that
    support it, fp16 (with loss scaling) on older ones, fp32 on CPU."""
    if cfg.precision != "auto":
        return cfg.precision
    return _PRECISION_NAMES[auto_dtype(device, training=True)]


def phase_offload(cfg: TrainConfig, method: str) -> dict[str, bool]:
    """Which of the configured offloads the phase ``method`` uses: parameter offload needs ZeRO-3 and optimizer
    offload a stage >= 1; one the phase's stage cannot use is dropped with a log line (e.g. the LoRA phase of a
    cpt+lora run at lora.zero_stage 2, after a CPT phase at ZeRO-3 with offload_params)."""
    stage = phase_zero_stage(cfg, method)
    params, optimizer = _offloads(cfg, stage)
    for name, asked, used, needs in (("offload_params", cfg.offload_params, params, "ZeRO-3"),
                                     ("offload_optimizer", cfg.offload_optimizer, optimizer, "a ZeRO stage >= 1")):
        if asked and not used:
            log.warning("%s is not used by the %s phase: it runs ZeRO stage %d and %s needs %s", name, method, stage,
                        name, needs)
    return {"params": params, "optimizer": optimizer}


def _offloads(cfg: TrainConfig, stage: int) -> tuple[bool, bool]:
    """(parameter offload, optimizer offload) as a phase at ZeRO ``stage`` can use them."""
    return cfg.offload_params and stage == 3, cfg.offload_optimizer and stage >= 1


def phase_mmap_threshold(cfg: TrainConfig, method: str, env: Mapping[str, str] | None = None) -> int:
    """The host allocator's mmap threshold (bytes; 0: glibc's default) for the phase ``method``: fixed low when the
    phase runs ZeRO-3 or offloads to CPU memory (:func:`shortened.host_memory.mmap_threshold`, reading ``env``)."""
    stage = phase_zero_stage(cfg, method)
    return mmap_threshold(stage, any(_offloads(cfg, stage)), env)


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str, method: str | None = None,
                     hidden_size: int | None = None) -> dict:
    """The DeepSpeed config of one phase: ``method`` is the phase's (cpt, lora or distill; default: the config's
    method, which must then not be cpt+lora), whose ZeRO stage is :func:`phase_zero_stage`.

    ``hidden_size`` (the model's): the ZeRO buckets are sized from it (:func:`zero_buckets`) instead of DeepSpeed's
    fixed defaults, which are sized for GPUs and keep up to 5·10⁸ gradient elements and 10⁹ gathered parameters
    alive per rank — for a model under 10⁹ parameters a whole extra copy of the weights and of the gradients on
    every rank, whatever the worker count."""
    method = method or cfg.method
    if method not in PHASE_METHODS:
        raise ValueError(f"deepspeed_config is per phase ({', '.join(PHASE_METHODS[:-1])} or {PHASE_METHODS[-1]}), "
                         f"got {method!r}")
    stage = phase_zero_stage(cfg, method)
    offload = phase_offload(cfg, method)
    zero: dict = {"stage": stage}
    if offload["optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload["params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if hidden_size and stage >= 1:
        zero.update(zero_buckets(hidden_size, stage))
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
    if offload["optimizer"]:  # DeepSpeed's CPU Adam: a client torch optimizer cannot be offloaded
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas),
                                                        "weight_decay": cfg.weight_decay}}
    return ds


def zero_buckets(hidden_size: int, stage: int) -> dict:
    """ZeRO bucket sizes (in elements) for a model of width ``hidden_size`` (h): transformers' Trainer rules for its
    ``"auto"`` values (``reduce_bucket_size`` h², ``stage3_prefetch_bucket_size`` 0.9·h²,
    ``stage3_param_persistence_threshold`` 10·h; transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig), and
    under ZeRO-3 at most 10·h² parameters kept gathered between uses (``stage3_max_live_parameters``,
    ``stage3_max_reuse_distance``; DeepSpeed's default 10⁹ keeps every gathered weight of a smaller model alive
    from the forward to the backward pass, a full unpartitioned copy on every rank), and the optimizer stepped on
    10·h² parameters of the rank's partition at a time (``sub_group_size``: each sub-group's gradients are copied
    to fp32 and AdamW computes its update with temporaries of that size; DeepSpeed's default 10⁹ makes one
    sub-group of a smaller model, 4 bytes of fp32 gradient plus up to 8 of AdamW temporaries per parameter on top
    of the 16 of model state: on ``benchmarks/memory.py``'s model, bf16, 1 worker, a peak of 9.28 GiB against
    6.49 GiB with 10·h²)."""
    h2 = hidden_size * hidden_size
    out = {"reduce_bucket_size": h2}
    if stage == 3:
        out.update(stage3_prefetch_bucket_size=int(0.9 * h2), stage3_param_persistence_threshold=10 * hidden_size,
                   stage3_max_live_parameters=10 * h2, stage3_max_reuse_distance=10 * h2, sub_group_size=10 * h2)
    return out
