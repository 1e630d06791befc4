"""Retraining after pruning: continued pretraining (CPT), LoRA, CPT then LoRA, and distillation from the dense
model, with DeepSpeed ZeRO on Ray Train workers.

- :mod:`~shortened.training.config`: :class:`TrainConfig` (paper defaults).
- :mod:`~shortened.training.loop`: the per-worker loop, a plain function; checkpoints, resume, export.
- :mod:`~shortened.training.session`: Ray Train or plain processes under the same loop.
- :mod:`~shortened.training.retrain`: the thin Ray layer (``TorchTrainer`` per phase).
"""

from shortened.training.config import DistillSettings, LoraSettings, TrainConfig

__all__ = ["DistillSettings", "LoraSettings", "TrainConfig"]
