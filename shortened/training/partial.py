"""Method ``partial`` (Lu et al. 2024, "Reassessing Layer Pruning in LLMs: New Insights and Methods",
arXiv:2411.15558, ICLR 2026, "partial-layer fine-tuning"): full-parameter training of the last ``k`` blocks, the
final norm and the LM head, everything else frozen.

Found generically: the blocks are :func:`shortened.blocks.find_blocks`'s list, the LM head is
``model.get_output_embeddings()``, and the final norm is the one normalisation module (class name containing
``Norm``) hanging directly on the decoder beside the block list, not named after the embeddings (Llama's
``model.norm``, GPT-2's ``transformer.ln_f``, OPT's ``decoder.final_layer_norm``, GPT-NeoX's
``final_layer_norm``). An LM head **tied** to the input embeddings (GPT-2, SmolLM2, Qwen2-0.5B...) is one tensor
with them: it is trained, so the input embeddings change too, and the record says ``tied: true``.
"""

from __future__ import annotations

from torch import nn

from shortened.blocks import find_blocks, num_layers
from shortened.errors import ShortenedError


def check_partial_blocks(k: int, n_blocks: int | None, where: str) -> None:
    """Refuse ``partial_blocks`` ``k`` outside 1..``n_blocks`` (the model's block count; None: unknown, not
    checked). ``where`` names the model in the message."""
    if k < 1 or (n_blocks is not None and k > n_blocks):
        raise ShortenedError(f"partial_blocks {k} must be between 1 and the {n_blocks} blocks of {where} "
                             "(method partial trains the last partial_blocks blocks)")


def check_partial_model(model_dir: str, k: int) -> None:
    """:func:`check_partial_blocks` against the block count in ``model_dir``'s config (before workers start)."""
    from transformers import AutoConfig

    check_partial_blocks(k, num_layers(AutoConfig.from_pretrained(model_dir)), f"--model {model_dir!r}")


def final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(qualified name, module)`` of the decoder's final norm (see the module doc), None if the decoder has none;
    :class:`ShortenedError` when several candidates leave it ambiguous."""
    blocks = find_blocks(model)
    prefix = blocks.path.rpartition(".")[0]
    found = [(f"{prefix}.{name}" if prefix else name, m) for name, m in blocks.parent.named_children()
             if name != blocks.attr and "norm" in type(m).__name__.lower() and "emb" not in name.lower()]
    if len(found) > 1:
        raise ShortenedError(f"method partial: several candidate final norms beside the blocks "
                             f"({', '.join(n for n, _ in found)}); cannot tell which one follows the last block")
    return found[0] if found else None


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partitioned parameter holds a placeholder


def freeze_for_partial(model: nn.Module, k: int) -> dict:
    """Set ``requires_grad`` on the last ``k`` blocks, the final norm and the LM head only (every other parameter
    frozen), in place; works on a ZeRO-3 partitioned model. Returns the record for ``retraining.json``:
    ``{"partial_blocks", "blocks": [indices], "final_norm", "lm_head", "tied", "trained_tensors",
    "trained_params", "total_params", "trained_names"}``. :class:`ShortenedError` for ``k`` outside 1..blocks or
    a model without an LM head."""
    blocks = find_blocks(model)
    n = len(blocks)
    check_partial_blocks(k, n, type(model).__name__)
    head = model.get_output_embeddings()
    if head is None:
        raise ShortenedError(f"method partial: {type(model).__name__} has no LM head (get_output_embeddings)")
    norm = final_norm(model)
    modules = [blocks.blocks[i] for i in range(n - k, n)] + [head] + ([norm[1]] if norm else [])
    trained = {id(p) for m in modules for p in m.parameters()}
    model.requires_grad_(False)
    for m in modules:
        m.requires_grad_(True)
    inputs = model.get_input_embeddings()
    tied = inputs is not None and any(id(p) in trained for p in inputs.parameters())
    names = [name for name, p in model.named_parameters() if p.requires_grad]  # tied: under the first name
    head_name = next((name for name, m in model.named_modules() if m is head), None)
    return {"partial_blocks": k, "blocks": list(range(n - k, n)), "final_norm": norm[0] if norm else None,
            "lm_head": head_name, "tied": tied, "trained_tensors": len(names),
            "trained_params": sum(_numel(p) for p in model.parameters() if p.requires_grad),
            "total_params": sum(_numel(p) for p in model.parameters()), "trained_names": names}
