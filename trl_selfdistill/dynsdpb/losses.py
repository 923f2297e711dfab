"""The temperature-scaled KL of the distillation term, chunked over tokens.

Inputs are packed: the response tokens of all re-used samples of a micro-batch, `[N, V]`, with `sample_ids[N]` telling
which sample each token belongs to. The softmax needs the whole vocabulary, so chunks split tokens only.

The KL is a custom autograd function: the forward keeps no `[N, V]` intermediates, and the backward recomputes both
softmaxes chunk by chunk (`d KL_j / d z_student_j = (softmax(z_s / T) - softmax(z_t / T)) / T`). The extra memory is
therefore a few float32 `[chunk_size, V]` buffers plus the gradient itself, whatever N is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .schedule import DISTILL_MODES, SampleStatistics, check_one_entry_per_token, teacher_statistics


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (for exact checks)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


class _ChunkedTemperatureKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: Tensor, chunk_size: int) -> Tensor:
        dtype = temperature.dtype
        out = torch.empty(student.shape[0], dtype=dtype, device=student.device)
        for start in range(0, student.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            t = temperature[chunk, None]
            log_p_teacher = torch.log_softmax(teacher[chunk].to(dtype) / t, dim=-1)
            log_p_student = torch.log_softmax(student[chunk].to(dtype) / t, dim=-1)
            p_teacher = log_p_teacher.exp()
            # sum_v p_t (log p_t - log p_s), with 0 * log 0 = 0 where the teacher gives a token no mass.
            out[chunk] = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0).sum(-1)
        ctx.save_for_backward(student, teacher, temperature)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        student, teacher, temperature = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        dtype = temperature.dtype
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.chunk_size):
            chunk = slice(start, start + ctx.chunk_size)
            t = temperature[chunk, None]
            p_teacher = torch.softmax(teacher[chunk].to(dtype) / t, dim=-1)
            p_student = torch.softmax(student[chunk].to(dtype) / t, dim=-1)
            grad[chunk] = ((p_student - p_teacher) * (grad_out[chunk, None].to(dtype) / t)).to(student.dtype)
        return grad, None, None, None


def temperature_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor | float, chunk_size: int = 1024
) -> Tensor:
    """Per-token `KL(softmax(teacher / T) || softmax(student / T))`, shape `[N]`.

    `temperature` is per token (`[N]`) or one number. Computed in float32 (float64 for float64 inputs) whatever the
    input dtypes, `chunk_size` tokens at a time; differentiable in `student_logits` only (the teacher is detached).
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ or are "
            "not [tokens, vocab]."
        )
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    num_tokens = student_logits.shape[0]
    dtype = _compute_dtype(student_logits, teacher_logits)
    temperature = torch.as_tensor(temperature, device=student_logits.device).detach().to(dtype)
    if temperature.dim() == 0:
        temperature = temperature.expand(num_tokens)
    if temperature.shape != (num_tokens,):
        raise ValueError(
            f"`temperature` must be one number or one per token ({num_tokens}), got {tuple(temperature.shape)}."
        )
    return _ChunkedTemperatureKL.apply(student_logits, teacher_logits.detach(), temperature.contiguous(), chunk_size)


def distillation_loss_sum(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    sample_ids: Tensor,
    num_samples: int,
    alpha: float,
    temperature: float,
    mode: str = "dynamic",
    chunk_size: int = 1024,
    *,
    weights: tuple[Tensor, Tensor] | None = None,
    weights_fn: Callable[[SampleStatistics], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, SampleStatistics, Tensor, Tensor]:
    """`sum_i alpha_i T_i^2 sum_j KL_ij` over the re-used samples' tokens.

    A sum, not a mean: the trainer divides it by the same token count as the cross-entropy (TRL's normalisation).
    The per-sample `(alpha_i, T_i)` come from `weights` when given, else from `weights_fn(stats)` (the trainer's
    overridable rule), else from `DISTILL_MODES[mode](stats, alpha, temperature)`.
    Returns the sum (float32, a scalar), the teacher statistics, `alpha_i` and `T_i` (float32, `[num_samples]`).
    """
    if mode not in DISTILL_MODES:
        raise ValueError(f"Unknown distillation mode {mode!r}; use one of {sorted(DISTILL_MODES)}.")
    if weights is not None and weights_fn is not None:
        raise ValueError("Pass `weights` or `weights_fn`, not both.")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ or are "
            "not [tokens, vocab]."
        )
    num_tokens, vocab = student_logits.shape
    check_one_entry_per_token(labels, sample_ids, num_tokens)
    if num_samples < 0:
        raise ValueError(f"`num_samples` must be >= 0, got {num_samples}.")
    if num_tokens:  # one host sync: out-of-range indices would otherwise be a device-side assert on GPU
        bounds = torch.stack([labels.min(), labels.max(), sample_ids.min(), sample_ids.max()]).tolist()
        if bounds[0] < 0 or bounds[1] >= vocab:
            raise ValueError(f"`labels` must lie in [0, {vocab}), got values in [{bounds[0]}, {bounds[1]}].")
        if bounds[2] < 0 or bounds[3] >= num_samples:
            raise ValueError(f"`sample_ids` must lie in [0, {num_samples}), got values in [{bounds[2]}, {bounds[3]}].")

    stats = teacher_statistics(teacher_logits, labels, sample_ids, num_samples, chunk_size)
    if weights is None:
        weights = weights_fn(stats) if weights_fn is not None else DISTILL_MODES[mode](stats, alpha, temperature)
    alphas, temperatures = (torch.as_tensor(w, device=student_logits.device).detach().float() for w in weights)
    if alphas.shape != (num_samples,) or temperatures.shape != (num_samples,):
        raise ValueError(
            f"The weights must be one `alpha_i` and one `T_i` per sample ({num_samples}), got shapes "
            f"{tuple(alphas.shape)} and {tuple(temperatures.shape)}."
        )
    ids = sample_ids.long()
    token_temperature = temperatures[ids]
    kl = temperature_kl(student_logits, teacher_logits, token_temperature, chunk_size)
    total = (alphas[ids] * token_temperature**2 * kl.float()).sum()
    return total, stats, alphas, temperatures
