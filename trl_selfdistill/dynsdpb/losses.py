"""The DynSDPB loss of a micro-batch's response tokens, computed from final hidden states in token chunks.

For every response token `j` of a row `i`, with student logits `z_ij = W h_ij (+ b)` from the output layer:

    cross-entropy   -log softmax(z_ij)[y_ij]                                              (every row)
    distillation    alpha_i T_i^2 KL(softmax(z_prev_ij / T_i) || softmax(z_ij / T_i))      (re-used rows only)

The teacher `z_prev` is either cached logits `[M, V]`, or cached final hidden states `[M, H]` projected through the
same output layer: with a frozen output layer (LoRA, QLoRA) both give the same logits, and hidden states are `V / H`
times smaller (7.8x for Llama-2-7B).

Neither the student's nor the teacher's logits exist in full. `FusedDistillationLoss` walks over the tokens in chunks:
each chunk's logits are projected, turned into per-token values in float32 and dropped; the backward pass recomputes
them chunk by chunk (TRL's fused LM head does the same for plain SFT). The working memory is a few float32
`[chunk_size, V]` buffers, whatever the number of tokens. The softmax needs the whole vocabulary, so only tokens are
split.
"""

from __future__ import annotations

import torch
from packaging.version import Version
from torch import Tensor
from torch.autograd.function import once_differentiable

# About 32 MB per float32 [chunk, vocab] buffer: small next to a 7B model's activations, large enough for full GPUs.
DEFAULT_CHUNK_LOGITS = 2**23
# `torch.mm(..., out_dtype=torch.float32)` from bf16/fp16 inputs exists on CUDA since torch 2.8.
_MM_OUT_DTYPE = Version(torch.__version__.split("+")[0]) >= Version("2.8")


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one float32 `[chunk, vocab]` buffer holds about `DEFAULT_CHUNK_LOGITS` values."""
    return max(1, DEFAULT_CHUNK_LOGITS // vocab_size)


def project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`hidden @ weight.T (+ bias)` in float32 (float64 for float64 inputs), accumulated so where the device can."""
    if _MM_OUT_DTYPE and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16):
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:
        logits = torch.mm(hidden, weight.t())
        logits = logits.to(_float_dtype(logits))
    return logits if bias is None else logits + bias.to(logits.dtype)


@torch.no_grad()
def project_in_chunks(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int, dtype: torch.dtype):
    """The logits of `hidden` (no gradient), stored in `dtype`, projected `chunk_size` tokens at a time."""
    out = torch.empty(hidden.shape[0], weight.shape[0], dtype=dtype, device=hidden.device)
    hidden = hidden.to(weight.dtype)
    for chunk in _chunks(hidden.shape[0], chunk_size):
        out[chunk] = project(hidden[chunk], weight, bias)
    return out


class FusedDistillationLoss(torch.autograd.Function):
    """Per-token cross-entropy terms, weighted distillation terms, entropy and top-1 hits from hidden states.

    Inputs (the first `M = teacher.shape[0]` tokens are the distilled ones):
        hidden `[N, H]`, weight `[V, H]`, bias `[V]` or None: the student's final hidden states and output layer, in
            the compute dtype.
        targets `[N]`: gold next tokens.
        teacher `[M, H]` (hidden states, `teacher_is_hidden`) or `[M, V]` (logits), in any floating dtype.
        kl_weight, temperature `[M]`: `alpha_i` and `T_i` of each distilled token's row.

    Returns, all float32 (float64 for float64 inputs) except `is_top1`:
        log_probs `[N]` (differentiable), distill `[M]` = `alpha_i T_i^2 KL_ij` (differentiable), entropy `[N]` of
        `softmax(z)` and is_top1 `[N]` (both without gradient).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher, teacher_is_hidden, kl_weight, temperature, chunk_size):
        num_tokens, num_distilled = hidden.shape[0], teacher.shape[0]
        log_probs = torch.empty(num_tokens, dtype=_float_dtype(hidden), device=hidden.device)
        entropy, is_top1 = torch.empty_like(log_probs), torch.empty_like(log_probs, dtype=torch.bool)
        distill = torch.empty(num_distilled, dtype=log_probs.dtype, device=hidden.device)
        for chunk in _chunks(num_tokens, chunk_size):
            logits = project(hidden[chunk], weight, bias)
            log_z = torch.logsumexp(logits, dim=-1)
            log_probs[chunk] = logits.gather(-1, targets[chunk, None]).squeeze(-1) - log_z
            entropy[chunk] = torch.special.entr(torch.softmax(logits, dim=-1)).sum(-1)
            is_top1[chunk] = logits.argmax(dim=-1) == targets[chunk]
            distilled = _distilled_part(chunk, num_distilled)
            if distilled is not None:
                teacher_logits = _teacher_logits(teacher[distilled], teacher_is_hidden, weight, bias)
                t = temperature[distilled, None]
                log_p_teacher = torch.log_softmax(teacher_logits / t, dim=-1)
                log_p_student = torch.log_softmax(logits[: teacher_logits.shape[0]] / t, dim=-1)
                p_teacher = log_p_teacher.exp()
                # sum_v p_t (log p_t - log p_s), with 0 * log 0 = 0 where the teacher gives a token no mass.
                kl = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0).sum(-1)
                kl.clamp_(min=0)  # rounding can leave -1e-12 where the two distributions agree
                distill[distilled] = kl_weight[distilled] * t.squeeze(-1) ** 2 * kl
        ctx.save_for_backward(hidden, weight, bias, targets, teacher, kl_weight, temperature)
        ctx.teacher_is_hidden, ctx.chunk_size = teacher_is_hidden, chunk_size
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, distill, entropy, is_top1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_probs, grad_distill, _grad_entropy, _grad_is_top1):
        hidden, weight, bias, targets, teacher, kl_weight, temperature = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # Accumulated over chunks, so in float32 whatever the weight's dtype (as TRL's fused LM head does).
        grad_weight = torch.zeros_like(weight, dtype=_float_dtype(weight)) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=_float_dtype(bias)) if needs_bias else None
        num_distilled = teacher.shape[0]
        for chunk in _chunks(hidden.shape[0], ctx.chunk_size):
            logits = project(hidden[chunk], weight, bias)
            # d(log p_y)/dz = onehot(y) - softmax(z)
            grad_logits = torch.softmax(logits, dim=-1).mul_(-grad_log_probs[chunk, None])
            grad_logits.scatter_add_(-1, targets[chunk, None], grad_log_probs[chunk, None])
            distilled = _distilled_part(chunk, num_distilled)
            if distilled is not None:
                teacher_logits = _teacher_logits(teacher[distilled], ctx.teacher_is_hidden, weight, bias)
                t = temperature[distilled, None]
                # d(alpha T^2 KL)/dz = alpha T (softmax(z / T) - softmax(z_prev / T))
                p_student = torch.softmax(logits[: teacher_logits.shape[0]] / t, dim=-1)
                p_teacher = torch.softmax(teacher_logits / t, dim=-1)
                scale = (grad_distill[distilled] * kl_weight[distilled])[:, None] * t
                grad_logits[: teacher_logits.shape[0]] += scale * (p_student - p_teacher)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += project(grad_logits.t(), hidden[chunk].t(), None)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            *([None] * 6),
        )


def fused_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    teacher: Tensor,
    teacher_is_hidden: bool,
    kl_weight: Tensor,
    temperature: Tensor,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Checks shapes, then applies [`FusedDistillationLoss`] (see there; the first `M` tokens are distilled)."""
    num_tokens, num_distilled = hidden.shape[0], teacher.shape[0]
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"`hidden` {tuple(hidden.shape)} and `weight` {tuple(weight.shape)} must be [N, H], [V, H].")
    expected_width = weight.shape[1] if teacher_is_hidden else weight.shape[0]
    if teacher.dim() != 2 or teacher.shape[1] != expected_width or num_distilled > num_tokens:
        kind = "hidden states [M, H]" if teacher_is_hidden else "logits [M, V]"
        raise ValueError(
            f"The teacher must be {kind} with M <= {num_tokens} tokens and width {expected_width}, got "
            f"{tuple(teacher.shape)}."
        )
    if targets.shape != (num_tokens,) or kl_weight.shape != (num_distilled,) or temperature.shape != (num_distilled,):
        raise ValueError(
            f"Need one target per token ({num_tokens}) and one weight and temperature per distilled token "
            f"({num_distilled}); got {tuple(targets.shape)}, {tuple(kl_weight.shape)}, {tuple(temperature.shape)}."
        )
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    return FusedDistillationLoss.apply(
        hidden,
        weight,
        bias,
        targets.long(),
        teacher.detach(),
        teacher_is_hidden,
        kl_weight.detach().to(_float_dtype(hidden)),
        temperature.detach().to(_float_dtype(hidden)),
        chunk_size,
    )


def _chunks(num_tokens: int, chunk_size: int):
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


def _distilled_part(chunk: slice, num_distilled: int) -> slice | None:
    """The distilled tokens (the first `num_distilled`) inside `chunk`, if any."""
    return slice(chunk.start, min(chunk.stop, num_distilled)) if chunk.start < num_distilled else None


def _teacher_logits(teacher: Tensor, teacher_is_hidden: bool, weight: Tensor, bias: Tensor | None) -> Tensor:
    return project(teacher.to(weight.dtype), weight, bias) if teacher_is_hidden else teacher.to(_float_dtype(weight))


def _float_dtype(tensor: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (for exact checks)."""
    return torch.promote_types(tensor.dtype, torch.float32)
