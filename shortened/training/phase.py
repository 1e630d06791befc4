"""One phase of a retraining (one TorchTrainer run): :class:`Phase` says what it trains, with what and where the
result goes; :func:`build_model` loads the model it trains, inside :func:`partitioned_init` so that under ZeRO-3
each rank only ever holds its partition of the weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict

from shortened.training.config import TrainConfig
from shortened.training.lora import with_lora


class Phase(BaseModel):
    """One TorchTrainer run: train ``model`` with ``method`` for ``tokens``, export to ``out``."""

    model_config = ConfigDict(extra="forbid")

    method: str  # cpt | lora | distill | partial
    model: str
    out: str
    tokens: int
    train: TrainConfig
    teacher: str | None = None
    run: str = ""  # the Ray Train run's name
    earlier: list[str] = []  # output folders of the phases before this one (cpt+lora: the CPT export)


def build_model(phase: Phase, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
                ) -> torch.nn.Module:
    """The model a phase trains, on the CPU (DeepSpeed moves and casts it): LoRA-wrapped for ``lora``. Loaded in
    ``dtype`` (the training dtype: no fp32 copy of a model that trains in bf16); inside :func:`partitioned_init`
    it is built partitioned."""
    from shortened.models import load_model

    model = load_model(phase.model, device="cpu", dtype=str(dtype).removeprefix("torch."),
                       attn_implementation=attn_implementation)
    if phase.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if phase.method == "lora":
        model = with_lora(model, phase.train)
    return model


@contextmanager
def partitioned_init(ds_config: dict | None) -> Iterator[bool]:
    """Models loaded inside are built under ZeRO-3's ``deepspeed.zero.Init`` when ``ds_config`` (a DeepSpeed config
    dict) is stage 3: every parameter is partitioned across the ranks as it is created, and ``from_pretrained``
    copies the checkpoint into the partitions module by module (rank 0 reads the files, each rank keeps its
    ``1/world_size`` share), so no rank holds the whole model. This is transformers' DeepSpeed integration
    (``transformers.integrations.HfDeepSpeedConfig``, which ``from_pretrained`` looks up through a weak reference:
    it is held here, and dropped on exit so later loads in the process are plain again). Yields whether it is on;
    other stages and ``None`` change nothing. The process group is started first when it is not up (DeepSpeed's
    ``init_distributed`` from the environment: ``torchrun``'s, or a single process), since the config's
    ``train_batch_size`` is checked against its world size."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield False
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    deepspeed.init_distributed()  # a no-op when torch.distributed is up (Ray Train starts it)

    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 (alive while the model loads: transformers holds a weakref)
    try:
        yield True
    finally:
        unset_hf_deepspeed_config()
        del hf_ds
