"""Capture what enters each decoder block in one forward, then replay blocks and the model's head from there.

This is what makes the ``ppl`` criterion cheap: the hidden state entering block ``i`` is computed once, so the
model without block ``i`` only needs blocks ``i+1..L-1`` and the head, not a full forward. Block calls are
replayed with the exact arguments the model passed (masks, rotary embeddings, per-layer attention types), and the
head runs through the model's own forward, so no architecture needs special code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from shortened.blocks import find_blocks


@dataclass
class BlockCall:
    """The arguments one block was called with, minus its hidden state."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class Trace:
    """Hidden states entering each block (``inputs[i]``), the last block's output, and each block's call."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    calls: list[BlockCall] = field(default_factory=list)
    output: torch.Tensor | None = None
    returns_tuple: bool = False
    logits: torch.Tensor | None = None

    def hidden(self, i: int) -> torch.Tensor:
        """Hidden state entering block ``i``; ``i == L`` is the one leaving the last block."""
        return self.output if i == len(self.inputs) else self.inputs[i]


@torch.no_grad()
def trace_blocks(model: PreTrainedModel, input_ids: torch.Tensor) -> Trace:
    """One full forward (no KV cache) recording every block's input, call arguments and the last output."""
    blocks = find_blocks(model).blocks
    trace = Trace()

    def pre_hook(module, args, kwargs):
        if args:
            trace.inputs.append(args[0])
            trace.calls.append(BlockCall(args[1:], dict(kwargs), hidden_as_kwarg=False))
        else:
            kw = dict(kwargs)
            trace.inputs.append(kw.pop("hidden_states"))
            trace.calls.append(BlockCall((), kw, hidden_as_kwarg=True))

    def last_hook(module, args, kwargs, out):
        trace.returns_tuple = isinstance(out, tuple)
        trace.output = out[0] if trace.returns_tuple else out

    handles = [b.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        trace.logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    if len(trace.inputs) != len(blocks):
        raise RuntimeError(f"traced {len(trace.inputs)} block calls for {len(blocks)} blocks")
    return trace


class _Replay(nn.Module):
    """Stands in for the whole block stack: returns a precomputed final hidden state, ignoring its input."""

    def __init__(self, like: nn.Module, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_like", like)  # not a submodule: its parameters must not be touched
        self._hidden = hidden
        self._as_tuple = as_tuple

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the model's loop reads from a block, e.g. ``attention_type``
            return getattr(object.__getattribute__(self, "_like"), name)

    def forward(self, *args, **kwargs):
        return (self._hidden,) if self._as_tuple else self._hidden


@contextlib.contextmanager
def _blocks_replaced_by(model: PreTrainedModel, replay: nn.Module) -> Iterator[None]:
    block_list = find_blocks(model)
    original = block_list.blocks
    setattr(block_list.parent, block_list.attr, nn.ModuleList([replay]))
    try:
        yield
    finally:
        setattr(block_list.parent, block_list.attr, original)


@torch.no_grad()
def head_logits(model: PreTrainedModel, input_ids: torch.Tensor, final_hidden: torch.Tensor,
                returns_tuple: bool) -> torch.Tensor:
    """Logits the model would produce if its blocks had output ``final_hidden`` (final norm, head, softcap...)."""
    blocks = find_blocks(model).blocks
    with _blocks_replaced_by(model, _Replay(blocks[-1], final_hidden, returns_tuple)):
        return model(input_ids=input_ids, use_cache=False).logits


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood (fp32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum")
