"""Retraining after pruning: continued pretraining (CPT), LoRA, CPT then LoRA, and distillation from the dense
model, with DeepSpeed ZeRO on Ray Train workers.

- :mod:`~shortened.training.config`: :class:`TrainConfig` (paper defaults).
- :mod:`~shortened.training.loop`: the per-worker loop, a plain function and a short recipe: setup → fit → export.
- :mod:`~shortened.training.phase`: :class:`~shortened.training.phase.Phase` (one TorchTrainer run) and its model.
- :mod:`~shortened.training.lora`: which block modules play the LoRA target roles; the peft wrapping.
- :mod:`~shortened.training.distill`: the distillation loss (KL in chunks of positions).
- :mod:`~shortened.training.checkpoint`: checkpoints (staging, space estimate and check, save, resume).
- :mod:`~shortened.training.export`: the final Hugging Face checkpoint and ``retraining.json``.
- :mod:`~shortened.training.faults`, :mod:`~shortened.training.audit`: test-only hooks (fault injection, token log).
- :mod:`~shortened.training.session`: Ray Train or plain processes under the same loop.
- :mod:`~shortened.training.retrain`: the thin Ray layer (``TorchTrainer`` per phase).
"""

from shortened.training.config import DistillSettings, LoraSettings, TrainConfig

__all__ = ["DistillSettings", "LoraSettings", "TrainConfig"]
