"""Width pruning, the paper's comparison baseline: remove whole attention head groups (a key/value head and the
query heads that share it) and MLP channels from every block.

Every block loses the same number of groups and channels (which ones is decided per block by a score), so the
result is a standard checkpoint of the same class with a smaller config (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``; ``head_dim`` pinned). Scores: ``magnitude`` (weight norms) or
``activation`` (Wanda-style: mean |input| of each output's weights on calibration text × their weight norm).
Supported: decoder blocks with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` (Llama, Mistral,
Qwen2/3, ...)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shortened.blocks import find_blocks, text_config
from shortened.errors import ShortenedError
from shortened.io import save_model_dir
from shortened.models import count_params

WIDTH_JSON = "width_pruning.json"
Method = Literal["magnitude", "activation"]


@dataclass
class WidthPlan:
    """What goes from every block: ``groups`` key/value head groups and ``channels`` MLP channels."""

    groups: int
    channels: int
    method: str = "magnitude"
    kept_groups: list[list[int]] = field(default_factory=list)  # per block, filled by prune_width
    kept_channels: list[list[int]] = field(default_factory=list)


def _shape(model: PreTrainedModel) -> dict:
    cfg = text_config(model.config)
    blocks = find_blocks(model).blocks
    for i, b in enumerate(blocks):
        attn, mlp = getattr(b, "self_attn", None), getattr(b, "mlp", None)
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ShortenedError(f"width pruning supports blocks with self_attn.q/k/v/o_proj and "
                                 f"mlp.gate/up/down_proj; block {i} of {type(model).__name__} has a different layout")
    head_dim = blocks[0].self_attn.head_dim
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    return {"blocks": blocks, "head_dim": head_dim, "heads": n_heads, "kv": n_kv, "rep": n_heads // n_kv,
            "channels": cfg.intermediate_size, "hidden": cfg.hidden_size}


def unit_params(model: PreTrainedModel) -> tuple[int, int]:
    """Parameters one head group and one MLP channel hold in one block (with biases)."""
    s = _shape(model)
    a = s["blocks"][0].self_attn
    hd, rep = s["head_dim"], s["rep"]
    group = (rep * hd * (s["hidden"] + (a.q_proj.bias is not None))  # q rows
             + 2 * hd * (s["hidden"] + (a.k_proj.bias is not None))  # k and v rows
             + rep * hd * s["hidden"])  # o columns
    m = s["blocks"][0].mlp
    channel = 2 * (s["hidden"] + (m.gate_proj.bias is not None)) + s["hidden"]
    return group, channel


def plan_for_params(model: PreTrainedModel, target_params: int, method: Method = "magnitude") -> WidthPlan:
    """Groups and channels to remove from every block so the model ends at (just under) ``target_params``,
    cutting attention and MLP by shares as equal as whole units allow (the paper's uniform width baseline)."""
    s = _shape(model)
    have = count_params(model)
    excess = have - target_params
    if excess <= 0:
        raise ShortenedError(f"target of {target_params:,} parameters is not below the model's {have:,}")
    group, channel = unit_params(model)
    n = len(s["blocks"])
    best = None
    for g in range(s["kv"]):  # keep at least one group
        rest = excess - g * group * n
        c = max(0, math.ceil(rest / (channel * n)))
        if c >= s["channels"]:
            continue
        gap = abs(g / s["kv"] - c / s["channels"])
        if best is None or gap < best[0]:
            best = (gap, g, c)
    if best is None:
        raise ShortenedError(f"cannot remove {excess:,} parameters by width and keep a head group and a channel "
                             "in every block")
    return WidthPlan(groups=best[1], channels=best[2], method=method)


# -- scores ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def width_scores(model: PreTrainedModel, method: Method = "magnitude",
                 calibration: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """Per block: a score per head group (``groups``) and per MLP channel (``channels``); higher = keep."""
    s = _shape(model)
    hd, rep = s["head_dim"], s["rep"]
    acts: list[dict[str, torch.Tensor]] = [{} for _ in s["blocks"]]
    if method == "activation":
        if calibration is None:
            raise ShortenedError("activation scores need calibration tokens")
        hooks = []
        for i, b in enumerate(s["blocks"]):
            def keep(name, i=i):
                def hook(module, args):
                    x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                    acts[i][name] = acts[i].get(name, 0) + x.abs().sum(0)
                return hook
            hooks.append(b.mlp.down_proj.register_forward_pre_hook(keep("down")))
            hooks.append(b.self_attn.o_proj.register_forward_pre_hook(keep("o")))
        try:
            device = next(model.parameters()).device
            for row in calibration:
                model(input_ids=row.unsqueeze(0).to(device))
        finally:
            for h in hooks:
                h.remove()
    elif method != "magnitude":
        raise ShortenedError(f"unknown width score {method!r}; choose magnitude or activation")
    out = []
    for i, b in enumerate(s["blocks"]):
        a, m = b.self_attn, b.mlp
        down = m.down_proj.weight.float()  # [hidden, channels]
        o = a.o_proj.weight.float()  # [hidden, heads*hd]
        if method == "magnitude":
            channels = (m.gate_proj.weight.float().norm(dim=1) ** 2 + m.up_proj.weight.float().norm(dim=1) ** 2
                        + down.norm(dim=0) ** 2).sqrt()
            q = a.q_proj.weight.float().view(s["heads"], hd, -1).pow(2).sum((1, 2)).view(s["kv"], rep).sum(1)
            kv = sum(p.weight.float().view(s["kv"], hd, -1).pow(2).sum((1, 2)) for p in (a.k_proj, a.v_proj))
            oo = o.view(o.shape[0], s["heads"], hd).pow(2).sum((0, 2)).view(s["kv"], rep).sum(1)
            groups = (q + kv + oo).sqrt()
        else:  # Wanda-style: what each channel / head contributes to the block's output, on average
            channels = acts[i]["down"] * down.norm(dim=0)
            per_col = acts[i]["o"] * o.norm(dim=0)
            groups = per_col.view(s["kv"], rep * hd).sum(1)
        out.append({"groups": groups.cpu(), "channels": channels.cpu()})
    return out


# -- surgery -----------------------------------------------------------------------------------------------------------

def _rows(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[keep].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[keep].clone())
    linear.out_features = len(keep)


def _cols(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, keep].clone())
    linear.in_features = len(keep)


@torch.no_grad()
def prune_width(model: PreTrainedModel, plan: WidthPlan, scores: list[dict[str, torch.Tensor]]) -> PreTrainedModel:
    """Remove the ``plan``'s lowest-scoring head groups and channels from every block, in place; the config
    follows (``head_dim`` is pinned, as it no longer equals hidden/heads)."""
    s = _shape(model)
    hd, rep = s["head_dim"], s["rep"]
    if not 0 <= plan.groups < s["kv"] or not 0 <= plan.channels < s["channels"]:
        raise ShortenedError(f"width plan removes {plan.groups} of {s['kv']} head groups and {plan.channels} of "
                             f"{s['channels']} channels; at least one of each must stay")
    if len(scores) != len(s["blocks"]):
        raise ShortenedError(f"{len(scores)} block scores for a model with {len(s['blocks'])} blocks")
    plan.kept_groups, plan.kept_channels = [], []
    for b, sc in zip(s["blocks"], scores):
        groups = torch.sort(torch.topk(sc["groups"], s["kv"] - plan.groups).indices).values
        channels = torch.sort(torch.topk(sc["channels"], s["channels"] - plan.channels).indices).values
        kv_rows = (groups[:, None] * hd + torch.arange(hd)).flatten()
        heads = (groups[:, None] * rep + torch.arange(rep)).flatten()
        q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
        a, m = b.self_attn, b.mlp
        _rows(a.q_proj, q_rows)
        _rows(a.k_proj, kv_rows)
        _rows(a.v_proj, kv_rows)
        _cols(a.o_proj, q_rows)
        _rows(m.gate_proj, channels)
        _rows(m.up_proj, channels)
        _cols(m.down_proj, channels)
        if hasattr(m, "intermediate_size"):
            m.intermediate_size = len(channels)
        plan.kept_groups.append(groups.tolist())
        plan.kept_channels.append(channels.tolist())
    cfg = text_config(model.config)
    cfg.head_dim = hd
    cfg.num_key_value_heads = s["kv"] - plan.groups
    cfg.num_attention_heads = (s["kv"] - plan.groups) * rep
    cfg.intermediate_size = s["channels"] - plan.channels
    return model


def save_width_pruned(model: PreTrainedModel, plan: WidthPlan, out: str | Path,
                      tokenizer: PreTrainedTokenizerBase | None = None, *, source: str | None = None,
                      params_before: int | None = None, overwrite: bool = False, dtype=None) -> Path:
    """A standard HF folder (loadable with ``from_pretrained``) with ``width_pruning.json`` beside it; weights in
    ``dtype`` (a torch dtype; None: as the model holds them)."""
    return save_model_dir(out, model, tokenizer, report_name=WIDTH_JSON, overwrite=overwrite, dtype=dtype, report={
        "model": source, "params_before": params_before, "params_after": count_params(model), **asdict(plan)})
