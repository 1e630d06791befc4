"""Automatic, overridable device, precision and attention-kernel choice: bf16 on GPUs that support it, fp32 on CPU
(:func:`auto_dtype`, the one precision policy of scoring, evaluation and training); flash-attention on CUDA when
installed, PyTorch SDPA otherwise."""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from shortened.errors import ShortenedError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

ATTN_AUTO = "auto"
# the flash-attention implementations transformers knows, and the package each one imports
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


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


def check_dtype_name(dtype: str, what: str = "dtype") -> str:
    """``dtype`` if it is ``auto`` or a known precision name; else :class:`ShortenedError` starting with ``what``
    (the option or field that gave it: ``--dtype``, ``score_dtype``; empty: no prefix)."""
    if dtype != "auto" and dtype not in _DTYPES:
        raise ShortenedError(f"{what + ': ' if what else ''}{dtype!r} is not one of auto, {', '.join(sorted(_DTYPES))}")
    return dtype


def auto_dtype(device: torch.device, *, training: bool = False) -> torch.dtype:
    """What precision ``auto`` means on ``device``: the one policy of scoring and evaluation
    (:func:`resolve_dtype`) and of training (:func:`shortened.training.deepspeed_config.resolve_precision`).

    - a CUDA GPU that supports bf16 (Ampere and later): bf16, for all three;
    - an older CUDA GPU: fp16 for training, fp32 for scoring and evaluation. Training in fp16 runs with DeepSpeed's
      dynamic loss scaling, which keeps small gradients from underflowing, and halves the memory of an 8B-model
      run; inference has no such guard: fp16 activations of models trained in bf16 can overflow (fp16 tops out at
      65504) into inf/NaN perplexities, and block scores of near-tied blocks would rank by fp16 rounding. The two
      therefore differ on these GPUs only, on purpose;
    - a CPU (or any other device): fp32 for all three (bf16 is ~7x slower on CPUs without avx512_bf16, and many
      fp16 CPU kernels are missing or slower still).
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if training else torch.float32
    return torch.float32


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None, what: str = "dtype") -> torch.dtype:
    """The torch dtype to load a model in for scoring or evaluation: ``auto`` is :func:`auto_dtype` of ``device``
    (default: :func:`resolve_device`'s ``auto``); a name is taken as it is.

    Raises :class:`ShortenedError` naming ``what`` (the option or config field) for an unknown name."""
    check_dtype_name(dtype, what)
    if dtype == "auto":
        return auto_dtype(device or resolve_device("auto"))
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (how scores files and reports record a precision)."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def package_importable(name: str) -> bool:
    """Whether ``import name`` works here (an installed flash-attn built for another torch fails to import)."""
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, or an OSError/RuntimeError from a compiled extension built for another ABI
        return False
    return True


def known_attn_implementations() -> list[str]:
    """``eager`` and every attention function transformers has registered (sdpa, flex_attention, flash_attention_2,
    …, paged variants)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
    return list(dict.fromkeys([*names, *(f"paged|{n}" for n in names if "|" not in n)]))


def resolve_attn_implementation(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention implementation to load a model with (transformers' ``attn_implementation``).

    ``auto``: ``flash_attention_2`` on CUDA in fp16/bf16 when the ``flash_attn`` package imports, else ``sdpa``
    (:func:`shortened.models.load_model` falls back to ``eager`` for architectures without SDPA support). Any other
    value (``eager``, ``sdpa``, ``flash_attention_2``, ``flash_attention_3``, ``flex_attention``, a kernels hub
    id, …) is returned as it is, after checking that a flash-attention request can run here: its package imports,
    CUDA is available (a model loaded on the CPU to be moved later, as training does, may ask for it) and the dtype
    is fp16/bf16. Raises :class:`ShortenedError` naming ``attn_implementation`` otherwise.
    """
    if not isinstance(requested, str) or not requested.strip():
        raise ShortenedError(f"attn_implementation: {requested!r} is not an attention implementation (auto, sdpa, "
                             "eager, flash_attention_2, ...)")
    known = known_attn_implementations()
    if requested != ATTN_AUTO and requested not in known and "/" not in requested:  # "org/repo": a kernels hub id
        raise ShortenedError(f"attn_implementation {requested!r} is not one of auto, {', '.join(known)} (or a "
                             "kernels hub id such as kernels-community/flash-attn)")
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == ATTN_AUTO:
        if device.type == "cuda" and half and package_importable(_FLASH_PACKAGES["flash_attention_2"]):
            return "flash_attention_2"
        return "sdpa"
    package = _FLASH_PACKAGES.get(requested)
    if package is not None:
        if not package_importable(package):
            raise ShortenedError(f"attn_implementation {requested!r}: the {package} package is not installed or does "
                                 "not import here; install it, or use auto/sdpa")
        if device.type != "cuda" and not torch.cuda.is_available():  # loading on CPU to move later is fine
            raise ShortenedError(f"attn_implementation {requested!r} needs a CUDA device; none is available here")
        if not half:
            raise ShortenedError(f"attn_implementation {requested!r} runs in float16/bfloat16 only, got "
                                 f"{dtype_name(dtype)}; use --dtype bfloat16 or attn_implementation sdpa")
    return requested
