"""Find a decoder's block list generically and remove blocks so that the model still generates with a KV cache.

No per-family table: the block list is the one ``nn.ModuleList`` whose length is the config's layer count and
whose children share one class. Removal renumbers every ``layer_idx`` inside the kept blocks, sets
``num_hidden_layers`` and rewrites every config field that encodes per-layer structure so that the config describes
exactly the kept blocks:

- per-layer lists (one entry per block: ``layer_types``, ``mlp_layer_types``, ``no_rope_layers``, …) and per-layer
  strings (``hybrid_override_pattern``) keep the kept blocks' entries;
- index lists (``mlp_only_layers``, ``moe_layers``, ``attn_layer_indices``, …) are remapped to the new indices;
- formulas over the layer index are turned into their explicit form where the config class has one
  (``decoder_sparse_step`` → ``mlp_only_layers``).

Whether that worked is checked by :mod:`shortened.structure` (a meta-device rebuild compared module by module);
a layout no config can express is refused there, before anything is written.
"""

from __future__ import annotations

import contextlib
import copy
import re
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
    uniform, mixed = [], []
    # Multimodal models also hold vision/audio encoder stacks; the decoder's own submodule holds the blocks.
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    inside = {id(m) for m in decoder.modules()} if isinstance(decoder, nn.Module) and decoder is not model else None
    for name, module in model.named_modules():
        if inside is not None and id(module) not in inside:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            (uniform if len({type(m) for m in module}) == 1 else mixed).append(name)
    # Hybrids may build each block type as its own class (Jamba's attention and Mamba layers): one list of the
    # layer count holding several classes is the block list when no single-class list is.
    candidates = uniform or (mixed if n is not None and len(mixed) == 1 else [])
    if len(candidates) != 1:
        found = uniform or mixed
        why = "none" if not found else f"several ({', '.join(found)})"
        raise ShortenedError(f"model_type {model_type!r}: cannot find its decoder blocks — expected one nn.ModuleList "
                             f"of {n} blocks, found {why}")
    path = candidates[0]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return BlockList(parent=parent, attr=attr, path=path)


def block_param_counts(model: PreTrainedModel) -> list[int]:
    return [count_params(b) for b in find_blocks(model).blocks]


_LAYERISH = re.compile(r"layer|idx|indices|_ids$|step|interval|period|offset|replace|pattern|freq|every")


def _is_index_list(key: str, value: object, n: int) -> bool:
    """A sorted list of distinct block indices (``mlp_only_layers=[4]``), as opposed to one entry per block."""
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return False
    if not re.search(r"layer|idx|indices|ids", key) or list(value) != sorted(set(value)):
        return False
    if not all(0 <= v < n for v in value):
        return False
    return len(value) != n or list(value) == list(range(n))


def _per_layer_keys(config: PretrainedConfig, n: int) -> list[str]:
    """Config fields that hold one entry per layer (e.g. ``layer_types``, ``hybrid_override_pattern``)."""
    keys = []
    for k, v in vars(config).items():
        if k.startswith("_") or _is_index_list(k, v, n):
            continue
        if isinstance(v, (list, tuple)) and len(v) == n:
            keys.append(k)
        elif isinstance(v, str) and len(v) == n and n > 1 and "pattern" in k:
            keys.append(k)
    return keys


def _index_list_keys(config: PretrainedConfig, n: int) -> list[str]:
    return [k for k, v in vars(config).items() if not k.startswith("_") and v and _is_index_list(k, v, n)]


def layout_fields(config: PretrainedConfig) -> list[str]:
    """Config fields whose names say they may encode per-layer structure (named in refusals)."""
    cfg = text_config(config)
    return sorted(k for k, v in vars(cfg).items() if not k.startswith("_") and k not in _LAYER_COUNT_KEYS
                  and _LAYERISH.search(k) and v is not None and not isinstance(v, float)
                  and not re.search(r"norm|eps|drop|scale_init|hidden_size_per", k))


def _explicit_sparse_step(cfg: PretrainedConfig, n: int, kept: Sequence[int]) -> None:
    """Qwen-MoE style ``decoder_sparse_step``: block i is MoE iff i is not in ``mlp_only_layers``, experts exist and
    ``(i + 1) % step == 0``. Rewritten as step 1 plus the explicit list of dense kept blocks."""
    step = getattr(cfg, "decoder_sparse_step", None)
    if not isinstance(step, int) or step <= 1 or not hasattr(cfg, "mlp_only_layers"):
        return
    dense = set(getattr(cfg, "mlp_only_layers") or [])
    experts = getattr(cfg, "num_experts", 1) or 0
    is_moe = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)]
    cfg.decoder_sparse_step = 1
    cfg.mlp_only_layers = [i for i in range(n) if not is_moe[i]]  # original indices; remapped with the other lists


def _explicit_first_k_dense(cfg: PretrainedConfig, n: int, kept: Sequence[int]) -> None:
    """DeepSeek style ``first_k_dense_replace``: blocks below k are dense (with ``moe_layer_freq`` 1 or absent, the
    rest MoE). Dense blocks stay a prefix after removal, so k becomes the number of kept blocks below it."""
    k = getattr(cfg, "first_k_dense_replace", None)
    if not isinstance(k, int) or getattr(cfg, "moe_layer_freq", 1) not in (1, None):
        return
    cfg.first_k_dense_replace = sum(1 for i in kept if i < k)


# Formulas over the layer index, turned into an explicit per-layer form before blocks are renumbered.
_FORMULA_REWRITES = (_explicit_sparse_step, _explicit_first_k_dense)


def rewrite_config(config: PretrainedConfig, n: int, kept: Sequence[int]) -> None:
    """Make the (text) config describe only the ``kept`` blocks (original indices, ascending) of ``n``."""
    cfg = text_config(config)
    for rewrite in _FORMULA_REWRITES:
        rewrite(cfg, n, kept)
    new_index = {old: new for new, old in enumerate(kept)}
    for key in _index_list_keys(cfg, n):
        values = getattr(cfg, key)
        setattr(cfg, key, type(values)(new_index[i] for i in values if i in new_index))
    for key in _per_layer_keys(cfg, n):
        values = getattr(cfg, key)
        subset = [values[i] for i in kept]
        setattr(cfg, key, "".join(subset) if isinstance(values, str) else type(values)(subset))
    _set_layer_count(config, len(kept))


def _module_copies(model: nn.Module, n: int, per_layer: dict[str, object]) -> list[tuple[nn.Module, str, object]]:
    """Module attributes that copied the layer count (``self.num_layers = config.n_layer``) or a per-layer config
    list (GPT-Neo's ``self.attention_layers``) at construction: (module, attribute, value)."""
    lists = [tuple(v) for v in per_layer.values() if isinstance(v, (list, tuple))]
    copies = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key.startswith("_"):
                continue
            if key in _LAYER_COUNT_KEYS and value == n and not isinstance(value, bool):
                copies.append((module, key, value))
            elif isinstance(value, (list, tuple)) and len(value) == n and tuple(value) in lists:
                copies.append((module, key, value))
    return copies


def _sync_module_copies(copies: list[tuple[nn.Module, str, object]], kept: Sequence[int]) -> None:
    for module, key, value in copies:
        setattr(module, key, len(kept) if isinstance(value, int) else type(value)(value[i] for i in kept))


# Names blocks use for their own index (for the KV cache, recurrent state, per-layer lookups).
_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number")


def _renumber(blocks: Sequence[nn.Module]) -> None:
    for new_idx, block in enumerate(blocks):
        for module in block.modules():
            for attr in _INDEX_ATTRS:
                if isinstance(vars(module).get(attr), int) and not isinstance(vars(module)[attr], bool):
                    setattr(module, attr, new_idx)


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
    copies = _module_copies(model, n, {k: getattr(cfg, k) for k in _per_layer_keys(cfg, n)})
    rewrite_config(model.config, n, kept)
    new_blocks = nn.ModuleList([block_list.blocks[i] for i in kept])
    setattr(block_list.parent, block_list.attr, new_blocks)
    _renumber(new_blocks)
    _sync_module_copies(copies, kept)
    return model


@contextlib.contextmanager
def without_blocks(model: PreTrainedModel, removed: Sequence[int]) -> Iterator[PreTrainedModel]:
    """Temporarily remove blocks (same mechanism as :func:`remove_blocks`), restoring the model on exit."""
    block_list = find_blocks(model)
    original = block_list.blocks
    configs = {id(c): c for c in (model.config, text_config(model.config))}.values()
    saved = [(c, copy.deepcopy(vars(c))) for c in configs]
    cfg = text_config(model.config)
    copies = _module_copies(model, len(original), {k: getattr(cfg, k) for k in _per_layer_keys(cfg, len(original))})
    try:
        yield remove_blocks(model, removed)
    finally:
        for module, key, value in copies:
            setattr(module, key, value)
        setattr(block_list.parent, block_list.attr, original)
        _renumber(original)
        for c, fields in saved:
            vars(c).clear()
            vars(c).update(fields)
