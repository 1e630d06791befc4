"""Does a config describe a model? Meta-device skeletons compared module by module.

After blocks are removed, the saved ``config.json`` must rebuild exactly the kept blocks: the same module classes,
parameter names and shapes, and the same values fixed at construction (attention scales, sliding windows, layer
types). A config that encodes per-layer structure in a form removal did not rewrite (an index list, a formula over
the layer index, a value computed from ``layer_idx``) reloads as a different model without any error; this module
is the generic net that catches it. Building on the ``meta`` device allocates no weights, so the check costs the
same for a 70B model as for a tiny one (module construction only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from shortened.errors import ShortenedError

# Attributes that differ between a live model and a fresh one without describing its structure.
_IGNORED_ATTRS = {"training", "gradient_checkpointing", "is_gradient_checkpointing", "name_or_path"}
_SIMPLE = (bool, int, float, str, type(None))


def skeleton(model_class: type[PreTrainedModel], config: PretrainedConfig) -> PreTrainedModel:
    """``model_class`` built from ``config`` on the meta device (no memory for weights)."""
    with torch.device("meta"):
        return model_class._from_config(config)


def _attrs(module: nn.Module) -> dict[str, Any]:
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key in _IGNORED_ATTRS:
            continue
        if isinstance(value, _SIMPLE) or (isinstance(value, (tuple, list)) and len(value) <= 64
                                          and all(isinstance(v, _SIMPLE) for v in value)):
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def module_signature(module: nn.Module) -> dict[str, tuple]:
    """Per submodule path: (class name, {param: shape}, {buffer: shape}, {simple attribute: value})."""
    sig = {}
    for path, m in module.named_modules():
        params = {n: tuple(p.shape) for n, p in m.named_parameters(recurse=False)}
        buffers = {n: (tuple(b.shape), n not in m._non_persistent_buffers_set)
                   for n, b in m.named_buffers(recurse=False)}
        sig[path] = (type(m).__name__, params, buffers, _attrs(m))
    return sig


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def first_difference(live: nn.Module, rebuilt: nn.Module, attrs_under: str | None = None) -> tuple[str, str] | None:
    """The first submodule path where ``live`` and ``rebuilt`` differ, and how; ``None`` when they agree.

    Construction-time values are compared inside ``attrs_under`` (the block list) only, or everywhere when it is
    ``None``; outside the blocks, modules also keep run-time state (RWKV's ``layers_are_rescaled``)."""
    a, b = module_signature(live), module_signature(rebuilt)
    for path in list(a) + [p for p in b if p not in a]:
        if path not in b:
            return path, "exists in the pruned model but not in the one the config builds"
        if path not in a:
            return path, "is built from the config but missing in the pruned model"
        (cls_a, pa, ba, xa), (cls_b, pb, bb, xb) = a[path], b[path]
        if cls_a != cls_b:
            return path, f"is {cls_a} in the pruned model but {cls_b} when built from the config"
        # A non-persistent buffer (rotary inv_freq …) that only one side has is recomputed, never loaded: skip it.
        ba = {k: v[0] for k, v in ba.items() if v[1] or k in bb}
        bb = {k: v[0] for k, v in bb.items() if v[1] or k in ba}
        for kind, da, db in (("parameter", pa, pb), ("buffer", ba, bb)):
            for name in sorted(set(da) | set(db)):
                if da.get(name) != db.get(name):
                    return path, (f"{kind} {name!r} has shape {da.get(name)} in the pruned model but "
                                  f"{db.get(name)} when built from the config")
        if attrs_under is not None and not path.startswith(attrs_under + "."):
            continue
        for name in sorted(set(xa) | set(xb)):
            if not _same(xa.get(name), xb.get(name)):
                return path, (f"attribute {name!r} is {xa.get(name)!r} in the pruned model but {xb.get(name)!r} "
                              "when built from the config")
    return None


def check_config_describes(model: PreTrainedModel, config: PretrainedConfig, *, block_path: str,
                           kept: list[int] | None = None, where: str = "the pruned config",
                           suspects: list[str] | None = None) -> None:
    """Raise :class:`ShortenedError` unless ``config`` rebuilds ``model`` module by module.

    ``block_path`` (e.g. ``model.layers``) and ``kept`` (original index of each kept block) let the message name
    the first differing block by its new and original index; ``suspects`` are config fields that may encode
    the layout and are named in the message.
    """
    diff = first_difference(model, skeleton(type(model), config), attrs_under=block_path)
    if diff is None:
        return
    path, how = diff
    what = f"module {path!r}"
    if path.startswith(block_path + "."):
        j = int(path[len(block_path) + 1:].split(".")[0])
        orig = f" (original block {kept[j]})" if kept is not None and j < len(kept) else ""
        what = f"block {j}{orig}, module {path!r}"
    hint = f"; config fields that encode per-layer structure: {', '.join(suspects)}" if suspects else ""
    raise ShortenedError(f"{where} does not describe the pruned model: {what} {how}. No config of this "
                         f"architecture expresses the kept blocks as they are{hint}")
