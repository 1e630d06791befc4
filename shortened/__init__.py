"""Shortened: depth pruning of decoder LLMs (Kim et al. 2024, "Shortened LLaMA") and retraining at scale."""

__version__ = "0.1.0"
