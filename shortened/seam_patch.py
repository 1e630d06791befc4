"""Training-free seam patch: a linear map fused into the MLP of the block before each removed span.

ReplaceMe (Shopkhoev et al., 2025, "ReplaceMe: Network Simplification via Layer Pruning and Linear
Transformations") and LinearPatch (2025) replace a contiguous span of removed blocks by a linear map fitted on
calibration activations, with no training and no added parameters. Here, for each maximal run ``a..b`` of removed
blocks, the kept block ``k = a - 1`` before it is patched. On calibration windows the ORIGINAL (dense) model gives

- ``M``: block ``k``'s MLP output (the output of its down projection, before the residual add), ``(tokens, d)``;
- ``Y``: block ``k``'s output minus ``M`` (the residual stream plus the attention side), ``(tokens, d)``;
- ``L``: the hidden state block ``b`` (the last removed block of the run) produced, ``(tokens, d)``;

and ``T = argmin_T Σ_t w_t²·‖M_t·T − (L_t − Y_t)‖²`` over the calibration tokens ``t`` (least squares in float64
from the accumulated weighted normal equations ``(MᵀW²M + λ·tr(MᵀW²M)/d·I)·T = MᵀW²(L − Y)``; ``λ`` is the optional
relative ridge ``ridge``). The token weights ``w`` are the fit objective ``fit``:

- ``relative`` (default): ``w_t = 1/‖L_t‖``, each token's error relative to its target, a closed-form stand-in for
  ReplaceMe's cosine-distance objective. Plain least squares is dominated by the few tokens with massive
  activations (the first position, the "attention sink", whose hidden state is orders of magnitude larger than the
  rest; Sun et al. 2024, "Massive Activations in Large Language Models"): on SmolLM2 with blocks 6–18 removed it
  fitted those tokens and made WikiText-2 perplexity 17× the unpatched model's, where ``relative`` made it 0.34×;
- ``lstsq``: ``w_t = 1``, the plain least squares of the formula above. ``T`` (``d × d``) is
fused into the down projection: ``nn.Linear`` (weight ``(out, in)``): ``W ← Tᵀ·W``, ``b ← b·T``; GPT-2's
``Conv1D`` (weight ``(in, out)``): ``W ← W·T``, ``b ← b·T``. The pruned model then computes, at the seam,
``Y + M·T`` ≈ ``L``, and is saved as a standard checkpoint of its own class.

The fusion is exact only where the down projection's output is added unchanged to the residual stream. That is
checked on one calibration window before fitting (perturbing the down projection's output must move the block's
output by exactly the perturbation); a model whose MLP output passes through a norm first (Gemma2/Gemma3
``post_feedforward_layernorm``, OLMo2's post norms), is scaled (Granite's ``residual_multiplier``) or is a
mixture of experts is refused with :class:`ShortenedError` naming the model type and the module.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from shortened.blocks import find_blocks
from shortened.errors import ShortenedError

log = logging.getLogger(__name__)

PATCHES = ("none", "linear")
FITS = ("relative", "lstsq")  # the token weighting of the fit (module docstring)
# fewer calibration tokens than this many times the hidden size, without a ridge, and T (d × d) overfits: on
# SmolLM2 (d = 576) at 20% pruned, 10×128 windows made WikiText-2 perplexity 1.80× the unpatched, 128×128 0.92×
MIN_TOKENS_PER_DIM = 16


@dataclass
class Seam:
    """One maximal run of removed blocks (original indices ``removed``) and the kept block before it."""

    block: int  # the kept block patched (original index)
    removed: list[int]
    down: nn.Module | None = None  # its MLP down projection (the module T is fused into)
    down_name: str = ""
    transform: torch.Tensor | None = None  # T, (d, d) float64
    calibration_tokens: int = 0
    fit: str = "relative"
    fit_residual: float | None = None  # Σ‖Y + M·T − L‖² / Σ‖L‖² on the calibration tokens (unweighted)
    residual_before: float | None = None  # Σ‖Y + M − L‖² / Σ‖L‖²: the seam without the patch
    # the same per token, averaged: mean_t ‖Y_t + M_t·T − L_t‖² / ‖L_t‖² (what the relative fit minimizes; the sums
    # above are dominated by the few massive-activation tokens)
    token_fit_residual: float | None = None
    token_residual_before: float | None = None
    skipped: str | None = None  # why this run has no patch (it starts at block 0)

    def to_json(self) -> dict:
        out = {"block": self.block, "removed": self.removed}
        if self.skipped:
            return {**out, "skipped": self.skipped}
        return {**out, "module": self.down_name, "fit": self.fit, "calibration_tokens": self.calibration_tokens,
                "fit_residual": self.fit_residual, "residual_before": self.residual_before,
                "token_fit_residual": self.token_fit_residual, "token_residual_before": self.token_residual_before}


@dataclass
class _Stats:
    """Normal equations of one seam, accumulated over calibration batches (float64)."""

    mtm: torch.Tensor  # Σ MᵀW²M, (d, d)
    mtr: torch.Tensor  # Σ MᵀW²(L − Y), (d, d)
    mtm_plain: torch.Tensor  # Σ MᵀM (the unweighted residual is reported)
    mtr_plain: torch.Tensor  # Σ Mᵀ(L − Y)
    rr: float = 0.0  # Σ ‖L − Y‖²
    ll: float = 0.0  # Σ ‖L‖²
    before: float = 0.0  # Σ ‖Y + M − L‖²
    rr_w: float = 0.0  # Σ ‖L − Y‖² / ‖L‖²
    before_w: float = 0.0  # Σ ‖Y + M − L‖² / ‖L‖²
    tokens: int = 0
    captured: dict = field(default_factory=dict)


def check_patch(patch: str, where: str = "patch") -> str:
    if patch not in PATCHES:
        raise ShortenedError(f"{where} {patch!r}: choose one of {', '.join(PATCHES)}")
    return patch


def patch_windows(n_samples: int, seq_len: int, hidden_size: int, samples: int | None = None) -> int:
    """Calibration windows the seam patch is fitted on: ``samples`` when given, else enough windows of ``seq_len``
    tokens for ``MIN_TOKENS_PER_DIM × hidden_size`` tokens (a ``d × d`` map fitted on fewer overfits: SmolLM2 at
    20% on the criteria's 10 × 128 tokens was 1.8× worse than unpatched), and never fewer than ``n_samples`` (the
    criteria's calibration set)."""
    if samples is not None:
        return samples
    return max(n_samples, -(-MIN_TOKENS_PER_DIM * hidden_size // seq_len))


def seams(removed: list[int]) -> list[Seam]:
    """Maximal runs of consecutive removed blocks, each with the kept block before it (``[5, 6, 9]`` → blocks 4
    and 8); a run starting at block 0 has none and is marked ``skipped``."""
    runs: list[list[int]] = []
    for i in sorted(removed):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [Seam(block=r[0] - 1, removed=r) if r[0] > 0 else
            Seam(block=-1, removed=r, skipped="the run starts at block 0: no kept block before it to patch")
            for r in runs]


def _model_type(model: PreTrainedModel) -> str:
    return getattr(model.config, "model_type", type(model).__name__)


def down_projection(model: PreTrainedModel, block_index: int) -> tuple[str, nn.Module]:
    """The MLP's output projection of one block (its name within the block and the module), found as the LoRA
    targets are (:func:`shortened.training.lora.block_linears`, role ``down``). :class:`ShortenedError` for a
    mixture of experts or a block with no single ``nn.Linear``/``Conv1D`` down projection."""
    from transformers.pytorch_utils import Conv1D

    from shortened.training.lora import block_linears

    block = find_blocks(model).blocks[block_index]
    experts = sorted({n.split(".experts")[0] + ".experts" for n, _ in block.named_modules()
                      if re.search(r"(^|\.)experts?(\.|$)", n)})
    if experts:
        raise ShortenedError(f"model_type {_model_type(model)!r}: block {block_index} has a mixture-of-experts MLP "
                             f"({', '.join(experts)}); a linear seam patch needs one dense down projection "
                             "(use --patch none)")
    _, linears = block_linears(model)
    downs = [name for name, roles in linears.items() if "down" in roles and "*" not in name]
    present = [n for n in downs if _has(block, n)]
    if len(present) != 1:
        raise ShortenedError(f"model_type {_model_type(model)!r}: block {block_index} has "
                             f"{len(present) or 'no'} MLP down projection(s) ({', '.join(present) or 'none found'}); "
                             "a linear seam patch needs exactly one nn.Linear/Conv1D (use --patch none)")
    module = block.get_submodule(present[0])
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise ShortenedError(f"model_type {_model_type(model)!r}: {present[0]} is a {type(module).__name__}, not an "
                             "nn.Linear/Conv1D")
    return present[0], module


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


def _hidden(output) -> torch.Tensor:
    """A block's hidden-state output (blocks return a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def check_fusable(model: PreTrainedModel, block_index: int, tokens: torch.Tensor) -> None:
    """Refuse a block whose down projection's output is not added unchanged to the residual stream.

    On ``tokens`` (one short window, ``(1, seq)``), the down projection's output is perturbed by a random
    ``δ`` (of the block output's scale); the block's output must move by exactly ``δ`` (relative error < 1e-3 in
    float32, < 5e-2 in 16-bit dtypes). Otherwise :class:`ShortenedError` names the model type and, where one
    exists, the module that receives the MLP output (a post-MLP norm such as Gemma2's
    ``post_feedforward_layernorm``)."""
    name, down = down_projection(model, block_index)
    block = find_blocks(model).blocks[block_index]
    captured: dict[str, torch.Tensor] = {}
    consumers: list[str] = []
    delta: dict[str, torch.Tensor] = {}

    def on_down(_m, _inp, out):
        if "delta" in delta:
            return out + delta["delta"]
        captured["m"] = out
        return None

    def on_block(_m, _inp, out):
        captured.setdefault("h", []).append(_hidden(out).detach())

    def consumer_hook(child_name):
        def hook(_m, inp):
            if "m" in captured and "delta" not in delta and inp and inp[0] is captured["m"]:
                consumers.append(f"{child_name} ({type(_m).__name__})")
        return hook

    handles = [down.register_forward_hook(on_down), block.register_forward_hook(on_block)]
    handles += [m.register_forward_pre_hook(consumer_hook(n)) for n, m in block.named_modules()
                if n and m is not down and not any(m is p for p in _parents(block, name))]
    try:
        with torch.no_grad():
            model(input_ids=tokens.to(model.device), use_cache=False)
            h0 = captured["h"][0]
            g = torch.Generator().manual_seed(0)
            delta["delta"] = (torch.randn(h0.shape, generator=g) * h0.float().std().clamp_min(1e-6).cpu()).to(
                h0.dtype).to(h0.device)
            model(input_ids=tokens.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    h1 = captured["h"][1]
    d = delta["delta"].float()
    err = ((h1.float() - h0.float() - d).norm() / d.norm()).item()
    tol = 1e-3 if h0.dtype == torch.float32 or h0.dtype == torch.float64 else 5e-2
    if err > tol or not torch.isfinite(torch.tensor(err)):
        where = (f"passes through {', '.join(consumers)} before the residual add" if consumers else
                 "is transformed (scaled or normalised) before the residual add")
        raise ShortenedError(
            f"model_type {_model_type(model)!r}: block {block_index}'s MLP output ({name}) {where}, so a linear seam "
            f"patch cannot be fused into {name} exactly (perturbing {name}'s output moved the block's output with "
            f"relative error {err:.3g}); use --patch none for this architecture")


def _parents(block: nn.Module, name: str) -> list[nn.Module]:
    """The modules on the path from ``block`` to its submodule ``name`` (the MLP holding the down projection)."""
    parts = name.split(".")
    return [block.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def patch_calibration(model: PreTrainedModel, tokenizer, calibration, samples: int | None = None, *,
                      option: str = "patch_samples") -> tuple[torch.Tensor, dict]:
    """The token windows the seam patch is fitted on, ``(n, seq_len)``, and what ``pruning.json`` records of them
    (:func:`shortened.data.calibration.describe`): ``calibration`` (a ``CalibrationConfig``) with ``n`` from
    :func:`patch_windows` (the residual stream's width ``d`` is the input embedding's). ``option`` names
    ``samples`` in the error for a source too short for them."""
    from shortened.data.calibration import calibration_windows, describe

    d = model.get_input_embeddings().weight.shape[-1]
    cfg = calibration.model_copy(update={"n_samples": patch_windows(calibration.n_samples, calibration.seq_len, d,
                                                                    samples)})
    windows = calibration_windows(tokenizer, cfg, what=option if samples else None)
    return windows, describe(cfg, windows)


def _residual(t: torch.Tensor, mtm: torch.Tensor, mtr: torch.Tensor, rr: float) -> float:
    """``‖M·T − R‖²`` from the normal equations: ``tr(Tᵀ·MᵀM·T) − 2·tr(Tᵀ·MᵀR) + ‖R‖²`` (weighted sums give the
    weighted residual), clipped at 0 against rounding."""
    return max(float((t * (mtm.cpu() @ t)).sum() - 2 * (t * mtr.cpu()).sum() + rr), 0.0)


def fit_seams(model: PreTrainedModel, removed: list[int], calibration: torch.Tensor, *, ridge: float = 0.0,
              batch_size: int = 1, fit: str = "relative") -> list[Seam]:
    """Fit one ``T`` per seam of ``removed`` (original block indices) on the dense ``model``.

    ``calibration``: token ids ``(n_samples, seq_len)`` (:func:`shortened.data.calibration.calibration_windows`).
    ``ridge``: λ ≥ 0, relative (the normal matrix gets ``λ·tr(MᵀW²M)/d`` on its diagonal). ``fit``: the token
    weighting, ``relative`` or ``lstsq`` (module docstring). Returns the seams with
    their ``T`` and fit residuals; the model is not changed. :class:`ShortenedError` for an architecture whose
    MLP output is not added unchanged to the residual stream (:func:`check_fusable`), or bad arguments."""
    if calibration is None or calibration.ndim != 2 or calibration.numel() == 0:
        raise ShortenedError("patch linear needs calibration windows (n_samples × seq_len token ids)")
    if not (ridge >= 0 and ridge != float("inf")):
        raise ShortenedError(f"patch_ridge {ridge!r} must be a finite number >= 0")
    if batch_size < 1:
        raise ShortenedError(f"batch_size {batch_size} must be >= 1")
    if fit not in FITS:
        raise ShortenedError(f"patch_fit {fit!r}: choose one of {', '.join(FITS)}")
    from shortened.models import check_token_ids

    check_token_ids(model, calibration, "the seam patch's calibration windows")
    found = seams(removed)
    active = [s for s in found if s.skipped is None]
    if not active:
        return found
    blocks = find_blocks(model).blocks
    for s in active:
        s.down_name, s.down = down_projection(model, s.block)
        check_fusable(model, s.block, calibration[:1, : min(calibration.shape[1], 32)])

    stats: dict[int, _Stats] = {}
    batch_captured: dict[tuple[str, int], torch.Tensor] = {}

    def keep(tag: str, idx: int, block_output: bool):
        def hook(_m, _inp, out):
            batch_captured[(tag, idx)] = (_hidden(out) if block_output else out).detach()
        return hook

    handles = []
    for s in active:
        handles.append(blocks[s.block].register_forward_hook(keep("h", s.block, True)))
        handles.append(s.down.register_forward_hook(keep("m", s.block, False)))
        handles.append(blocks[s.removed[-1]].register_forward_hook(keep("l", s.removed[-1], True)))
    try:
        with torch.no_grad():
            for start in range(0, calibration.shape[0], batch_size):
                batch_captured.clear()
                model(input_ids=calibration[start:start + batch_size].to(model.device), use_cache=False)
                for s in active:
                    m = batch_captured[("m", s.block)].double().reshape(-1, batch_captured[("m", s.block)].shape[-1])
                    h = batch_captured[("h", s.block)].double().reshape(m.shape)
                    l_ = batch_captured[("l", s.removed[-1])].double().reshape(m.shape)
                    r = l_ - (h - m)  # L − Y
                    st = stats.get(s.block)
                    if st is None:
                        d = m.shape[1]
                        st = stats[s.block] = _Stats(*(torch.zeros(d, d, dtype=torch.float64, device=m.device)
                                                       for _ in range(4)))
                    st.mtm_plain += m.T @ m
                    st.mtr_plain += m.T @ r
                    w2 = 1.0 / (l_ * l_).sum(dim=1, keepdim=True).clamp_min(1e-12)  # w_t² = 1/‖L_t‖²
                    st.mtm += (m * w2).T @ m
                    st.mtr += (m * w2).T @ r
                    st.rr_w += float((r * r * w2).sum())
                    st.before_w += float(((h - l_) ** 2 * w2).sum())
                    st.rr += float((r * r).sum())
                    st.ll += float((l_ * l_).sum())
                    st.before += float(((h - l_) ** 2).sum())
                    st.tokens += m.shape[0]
    finally:
        for h in handles:
            h.remove()

    for s in active:
        st = stats[s.block]
        a, b = (st.mtm.cpu(), st.mtr.cpu()) if fit == "relative" else (st.mtm_plain.cpu(), st.mtr_plain.cpu())
        d = a.shape[0]
        if ridge > 0:
            a = a + ridge * torch.trace(a) / d * torch.eye(d, dtype=a.dtype)
        t = torch.linalg.lstsq(a, b, driver="gelsd").solution  # handles a rank-deficient MᵀM (few tokens)
        s.token_fit_residual = _residual(t, st.mtm, st.mtr, st.rr_w) / st.tokens
        s.token_residual_before = st.before_w / st.tokens
        s.transform = t
        s.fit = fit
        s.calibration_tokens = st.tokens
        scale = st.ll if st.ll > 0 else 1.0
        s.fit_residual = _residual(t, st.mtm_plain, st.mtr_plain, st.rr) / scale
        s.residual_before = st.before / scale
    tokens, d = active[0].calibration_tokens, active[0].transform.shape[0]
    if ridge == 0 and tokens < MIN_TOKENS_PER_DIM * d:
        log.warning("the seam patch fits a %d×%d map on %d calibration tokens (fewer than %d): it may overfit and "
                    "make the model worse; use more calibration windows (patch_samples × calibration.seq_len ≥ %d; "
                    "unset, patch_samples draws that many) or a ridge (patch_ridge, e.g. 0.01)", d, d, tokens, MIN_TOKENS_PER_DIM * d,
                    MIN_TOKENS_PER_DIM * d)
    return found


def fuse(seam: Seam) -> None:
    """Fuse ``seam.transform`` into its down projection in place: ``nn.Linear`` (weight ``(out, in)``)
    ``W ← Tᵀ·W``; ``Conv1D`` (weight ``(in, out)``) ``W ← W·T``; a bias ``b ← b·T``. Computed in float64, stored
    in the module's dtype."""
    from transformers.pytorch_utils import Conv1D

    if seam.skipped or seam.transform is None:
        return
    mod, t = seam.down, seam.transform
    with torch.no_grad():
        w = mod.weight.detach().double()
        t = t.to(w.device)
        new = w @ t if isinstance(mod, Conv1D) else t.T @ w
        mod.weight.copy_(new.to(mod.weight.dtype))
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_((mod.bias.detach().double() @ t).to(mod.bias.dtype))


def apply_unfused(seam: Seam) -> torch.utils.hooks.RemovableHandle:
    """The unfused computation (for checking :func:`fuse`): a forward hook mapping the down projection's output
    ``M`` to ``M·T`` at run time. Remove the returned handle to undo it."""
    t = seam.transform

    def hook(_m, _inp, out):
        return (out.double() @ t.to(out.device)).to(out.dtype)

    return seam.down.register_forward_hook(hook)


def patch_report(found: list[Seam], ridge: float, fit: str = "relative", calibration: dict | None = None) -> dict:
    """What ``pruning.json`` records under ``patch`` (``calibration``: the fit's calibration set,
    :func:`shortened.data.calibration.describe`, where the caller knows it)."""
    return {"method": "linear", "fit": fit, "ridge": ridge, **({"calibration": calibration} if calibration else {}),
            "seams": [s.to_json() for s in found]}
