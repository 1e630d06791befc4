"""One phase of a retraining (one TorchTrainer run): :class:`Phase` says what it trains, with what and where the
result goes; :func:`build_model` loads the model it trains (the loop trains it, the export loads the result into
a fresh copy)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from shortened.training.config import TrainConfig
from shortened.training.lora import with_lora


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
