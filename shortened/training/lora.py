"""LoRA on the decoder blocks: which modules play the paper's target roles (q, k, v, o, gate, up, down) in this
architecture (:func:`resolve_lora_targets`), and the peft wrapping with them (:func:`with_lora`)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from shortened.errors import ShortenedError
from shortened.training.config import TrainConfig

log = logging.getLogger(__name__)

# The paper's LoRA targets are roles: q, k, v, o in attention; gate, up, down in the MLP. Each architecture names the
# modules that play them differently, and some fuse several roles into one module (qkv_proj, c_attn,
# query_key_value: q+k+v; gate_up_proj: gate+up). Llama's names (q_proj, …) stand for their roles.
ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ROLE_OF_NAME = {f"{r}_proj": r for r in ROLES}
_NAME_ROLES = {
    **{n: ["q"] for n in ("q_proj", "query", "wq", "q", "query_proj")},
    **{n: ["k"] for n in ("k_proj", "key", "wk", "k", "key_proj")},
    **{n: ["v"] for n in ("v_proj", "value", "wv", "v", "value_proj")},
    **{n: ["q", "k", "v"] for n in ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "qkv", "W_pack", "in_proj",
                                    "att_proj")},
    **{n: ["o"] for n in ("o_proj", "out_proj", "wo", "o", "attn_out")},
    **{n: ["gate"] for n in ("gate_proj", "w1")},
    **{n: ["up"] for n in ("up_proj", "w3", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "ff_proj")},
    **{n: ["gate", "up"] for n in ("gate_up_proj",)},
    **{n: ["down"] for n in ("down_proj", "w2", "fc2", "fc_out", "dense_4h_to_h", "ff_out")},
}
_CONTEXT_ROLES = ("c_proj", "dense", "proj", "out", "out_proj")  # o in attention, down in the MLP
_ROUTERS = ("gate", "router", "shared_expert_gate", "switch")  # MoE routing layers: not adapted


@dataclass
class LoraTargets:
    """The block modules LoRA adapts: their names relative to a block, the roles each plays, and the requested
    targets that matched nothing."""

    block_path: str
    modules: dict[str, list[str]]  # relative name (expert indices as '*') -> roles
    unmatched: list[str]

    def regex(self) -> str:
        alts = "|".join(re.escape(n).replace(r"\*", r"\d+") for n in self.modules)
        return rf"(?:.*\.)?{re.escape(self.block_path)}\.\d+\.(?:{alts})"

    def to_json(self) -> dict:
        by_role = {r: [n for n, roles in self.modules.items() if r in roles] for r in ROLES}
        return {"modules": list(self.modules), "roles": {r: v for r, v in by_role.items() if v},
                "unmatched": self.unmatched}


def _linear_out(mod: torch.nn.Module) -> int | None:
    return getattr(mod, "out_features", None) or getattr(mod, "nf", None)


def block_linears(model: torch.nn.Module) -> tuple[str, dict[str, list[str]]]:
    """Every Linear/Conv1D inside the decoder blocks (names relative to a block, expert indices as '*'), with the
    LoRA roles it plays: by its name where the name says it, else by where it sits and its shape."""
    from transformers.pytorch_utils import Conv1D

    from shortened.blocks import find_blocks, text_config

    blocks = find_blocks(model)
    hidden = getattr(text_config(model.config), "hidden_size", None)
    found: dict[str, list[str]] = {}
    for block in blocks.blocks:
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
        for i, (name, mod) in enumerate(linears):
            rel = re.sub(r"\.\d+\.", ".*.", f".{name}.")[1:-1]
            if rel in found:
                continue
            parent, _, leaf = name.rpartition(".")
            where = parent.lower()
            in_attn = "attn" in where or "attention" in where
            in_mlp = any(w in where for w in ("mlp", "ffn", "feed_forward", "expert"))
            if leaf in _ROUTERS and not in_attn:
                continue
            if leaf in _CONTEXT_ROLES and (in_attn or in_mlp):
                roles = ["o"] if in_attn else ["down"]
            elif leaf in _NAME_ROLES:
                roles = _NAME_ROLES[leaf]
            elif in_attn:  # unknown name: the projection back to the hidden size is o, the others q/k/v
                later = [m for n, m in linears[i + 1:] if n.rpartition(".")[0] == parent]
                roles = ["o"] if _linear_out(mod) == hidden and not later else ["q", "k", "v"]
            elif in_mlp:
                roles = ["down"] if _linear_out(mod) == hidden else ["up"]
            else:
                continue
            found[rel] = roles
    return blocks.path, found


def resolve_lora_targets(model: torch.nn.Module, requested: list[str]) -> LoraTargets:
    """Map the requested targets to this architecture's block modules: a name that is a module of the blocks (its
    last part, or its path within a block) is taken as is; a role (q, k, v, o, gate, up, down) or Llama's name for
    it (q_proj, …, down_proj) takes every module that plays that role, fused ones included."""
    path, linears = block_linears(model)
    chosen: dict[str, list[str]] = {}
    unmatched = []
    for t in requested:
        literal = [n for n in linears if n == t or n.endswith(f".{t}")]
        role = t if t in ROLES else ROLE_OF_NAME.get(t)
        by_role = [n for n, roles in linears.items() if role in roles] if role else []
        hits = literal or by_role
        if not hits:
            unmatched.append(t)
        for n in hits:
            chosen[n] = linears[n]
    return LoraTargets(block_path=path, modules=chosen, unmatched=unmatched)


def with_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """peft LoRA on the blocks' modules that play the requested roles (see :func:`resolve_lora_targets`). A target
    that matches nothing is a warning naming it; none at all is an error. The resolution is kept on the returned
    model as ``shortened_lora_targets`` (and recorded in ``retraining.json``)."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_lora_targets(model, cfg.lora.target_modules)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if not targets.modules:
        raise ShortenedError(f"LoRA target modules {cfg.lora.target_modules} match no module of the {model_type} "
                             f"blocks (their linear modules: {', '.join(block_linears(model)[1]) or 'none'})")
    if targets.unmatched:
        log.warning("LoRA target(s) %s match no module of the %s blocks and are not adapted (adapted: %s)",
                    ", ".join(targets.unmatched), model_type, ", ".join(targets.modules))
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                  lora_dropout=cfg.lora.dropout, target_modules=targets.regex(),
                                                  task_type="CAUSAL_LM"))
    peft_model.shortened_lora_targets = targets.to_json()
    return peft_model

