"""Find a decoder's block list generically and remove blocks so that the model still generates with a KV cache.

No per-family table: the block list is the one ``nn.ModuleList`` whose length is the config's layer count and
whose children share one class. Removal renumbers every ``layer_idx`` inside the kept blocks, sets
``num_hidden_layers`` and subsets every per-layer config list (``layer_types`` and the like).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from shortened.errors import ShortenedError
from shortened.models import count_params


@dataclass
class BlockList:
    """The decoder's block list and where it hangs: ``getattr(parent, attr) is blocks``."""

    parent: nn.Module
    attr: str
    path: str

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)

    def __len__(self) -> int:
        return len(self.blocks)


# Names transformers configs use for the layer count (GPT-2 style configs alias num_hidden_layers to n_layer).
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(config: PretrainedConfig) -> int | None:
    cfg = text_config(config)
    for key in _LAYER_COUNT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(model: PreTrainedModel) -> BlockList:
    """Locate the decoder blocks; a clear error names the model type when there is no single such list."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ShortenedError(f"model_type {model_type!r} is an encoder-decoder; only decoder-only models are supported")
    n = num_layers(model.config)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if n is None or len(module) == n:
                candidates.append(name)
    if len(candidates) != 1:
        why = "none" if not candidates else f"several ({', '.join(candidates)})"
        raise ShortenedError(f"model_type {model_type!r}: cannot find its decoder blocks — expected one nn.ModuleList "
                             f"of {n} identical blocks, found {why}")
    path = candidates[0]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return BlockList(parent=parent, attr=attr, path=path)


def block_param_counts(model: PreTrainedModel) -> list[int]:
    return [count_params(b) for b in find_blocks(model).blocks]


def _per_layer_keys(config: PretrainedConfig, n: int) -> list[str]:
    """Config fields that hold one entry per layer (e.g. ``layer_types``)."""
    return [k for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == n and not k.startswith("_")]


def _renumber(blocks: Sequence[nn.Module]) -> None:
    for new_idx, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx


def _set_layer_count(config: PretrainedConfig, n: int) -> None:
    cfg = text_config(config)
    for key in _LAYER_COUNT_KEYS:
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, n)
            return


def remove_blocks(model: PreTrainedModel, removed: Sequence[int]) -> PreTrainedModel:
    """Remove the blocks at the given original indices in place and keep the model cache-correct; returns it."""
    block_list = find_blocks(model)
    n = len(block_list)
    bad = [i for i in removed if not 0 <= i < n]
    if bad or len(set(removed)) != len(removed):
        raise ShortenedError(f"removed_blocks {list(removed)}: indices must be distinct and in [0, {n})")
    if len(removed) >= n:
        raise ShortenedError(f"removed_blocks: cannot remove all {n} blocks")
    kept = [i for i in range(n) if i not in set(removed)]
    cfg = text_config(model.config)
    for key in _per_layer_keys(cfg, n):
        values = getattr(cfg, key)
        setattr(cfg, key, type(values)(values[i] for i in kept))
    new_blocks = nn.ModuleList([block_list.blocks[i] for i in kept])
    setattr(block_list.parent, block_list.attr, new_blocks)
    _renumber(new_blocks)
    _set_layer_count(model.config, len(kept))
    return model


@contextlib.contextmanager
def without_blocks(model: PreTrainedModel, removed: Sequence[int]) -> Iterator[PreTrainedModel]:
    """Temporarily remove blocks (same mechanism as :func:`remove_blocks`), restoring the model on exit."""
    block_list = find_blocks(model)
    original = block_list.blocks
    cfg = text_config(model.config)
    saved = {k: getattr(cfg, k) for k in _per_layer_keys(cfg, len(original))}
    n_before = num_layers(model.config)
    try:
        yield remove_blocks(model, removed)
    finally:
        setattr(block_list.parent, block_list.attr, original)
        _renumber(original)
        for k, v in saved.items():
            setattr(cfg, k, v)
        _set_layer_count(model.config, n_before)
