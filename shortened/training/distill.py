"""Distillation from the dense model: ``T² · KL(teacher ‖ student)`` over the predicted positions, computed in
chunks of positions so that no full-size fp32 copy of the logits is ever held (:func:`distill_loss`)."""

from __future__ import annotations

import torch

from shortened.data.formats import IGNORE_INDEX


class _ChunkedKL(torch.autograd.Function):
    """``T² / n · Σ_rows KL(softmax(t/T) ‖ softmax(s/T))`` over the rows ``rows`` (n of them) of ``s`` and ``t``
    (``[N, V]``, any float dtype), computed ``chunk`` rows at a time in fp32, forward and backward.

    Autograd through the plain expression would keep the fp32 log-softmaxes of every row for the backward pass;
    here only the inputs are kept and the gradient is recomputed per chunk: d/ds = T/n · (softmax(s/T) −
    softmax(t/T)), written into a gradient of ``s``'s dtype. The teacher ``t`` is a constant (no gradient)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, temperature: float,
                chunk: int) -> torch.Tensor:
        total = s.new_zeros((), dtype=torch.float32)
        for i in range(0, rows.numel(), chunk):
            idx = rows[i:i + chunk]
            log_s = torch.log_softmax(s.index_select(0, idx).float().div_(temperature), -1)
            log_t = torch.log_softmax(t.index_select(0, idx).float().div_(temperature), -1)
            log_s.neg_().add_(log_t)  # log p_t − log p_s
            total += torch.dot(log_t.exp_().view(-1), log_s.view(-1))  # Σ p_t (log p_t − log p_s)
            del log_s, log_t
        ctx.save_for_backward(s, t, rows)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total * (temperature**2 / max(rows.numel(), 1))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        s, t, rows = ctx.saved_tensors
        grad = torch.zeros_like(s)
        scale = grad_out * (ctx.temperature / max(rows.numel(), 1))
        for i in range(0, rows.numel(), ctx.chunk):
            idx = rows[i:i + ctx.chunk]
            p_s = torch.softmax(s.index_select(0, idx).float().div_(ctx.temperature), -1)
            p_t = torch.softmax(t.index_select(0, idx).float().div_(ctx.temperature), -1)
            grad.index_copy_(0, idx, p_s.sub_(p_t).mul_(scale).to(grad.dtype))
            del p_s, p_t
        return grad, None, None, None, None


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float, chunk_tokens: int = 1024) -> torch.Tensor:
    """T² · KL(teacher ‖ student) over the predicted positions (position i predicts ``labels[:, i + 1]``, counted
    where that label is not -100), mean per predicted position; 0 when there is none.

    ``student_logits`` and ``teacher_logits`` are ``[batch, seq, vocab]`` (any float dtype; the teacher's carry no
    gradient), ``labels`` ``[batch, seq]``. The KL is taken ``chunk_tokens`` positions at a time, each chunk
    upcast to fp32 on its own, so a 128k vocabulary never has a full-size fp32 copy of either tensor: the extra
    memory is a few ``chunk_tokens × vocab × 4`` bytes, forward and backward. Same value for every chunk size."""
    vocab = student_logits.shape[-1]
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    rows = valid.reshape(-1).nonzero().squeeze(1)
    return _ChunkedKL.apply(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), rows,
                            float(temperature), int(chunk_tokens))

