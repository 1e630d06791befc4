"""Automatic, overridable device and precision choice: bf16 on GPUs that support it, fp32 on CPU."""

from __future__ import annotations

import torch

from shortened.errors import ShortenedError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ShortenedError(f"device: unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ShortenedError(f"device: {device!r} asked for, but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, fp32 otherwise (bf16 is ~7x slower on CPUs without avx512_bf16)."""
    if dtype == "auto":
        dev = device or resolve_device("auto")
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ShortenedError(f"dtype: {dtype!r} is not one of auto, {', '.join(sorted(_DTYPES))}") from None
