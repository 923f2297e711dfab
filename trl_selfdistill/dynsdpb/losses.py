"""The temperature-scaled KL of the distillation term, chunked over tokens.

Inputs are packed: the response tokens of all re-used samples of a micro-batch, `[N, V]`, with `sample_ids[N]` telling
which sample each token belongs to. The softmax needs the whole vocabulary, so chunks split tokens only; each chunk's
float32 copies are `[chunk_size, V]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedule import DISTILL_MODES, SampleStatistics, teacher_statistics


def temperature_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Per-token `KL(softmax(teacher / T) || softmax(student / T))`, float32, differentiable in the student only."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"Student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ.")
    kls = []
    for start in range(0, student_logits.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        t = temperature[chunk, None].float()
        log_p_teacher = torch.log_softmax(teacher_logits[chunk].detach().float() / t, dim=-1)
        log_p_student = torch.log_softmax(student_logits[chunk].float() / t, dim=-1)
        kls.append((log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1))
    return torch.cat(kls) if kls else student_logits.new_zeros(0, dtype=torch.float32)


def distillation_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    sample_ids: torch.Tensor,
    num_samples: int,
    alpha: float,
    temperature: float,
    weights_fn: Callable[[SampleStatistics], tuple[torch.Tensor, torch.Tensor]] | None = None,
    mode: str = "dynamic",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, SampleStatistics, torch.Tensor, torch.Tensor]:
    """`sum_i alpha_i T_i^2 sum_j KL_ij` over the re-used samples (a sum: the caller normalises by token count).

    The weights come from `weights_fn(stats)` when given (the trainer's overridable rule), else from `mode`.
    Returns the sum, the teacher statistics and the per-sample `alpha_i` and `T_i`.
    """
    if labels.shape[0] != student_logits.shape[0] or sample_ids.shape[0] != student_logits.shape[0]:
        raise ValueError("`labels` and `sample_ids` need one entry per packed token.")
    stats = teacher_statistics(teacher_logits, labels, sample_ids, num_samples)
    if weights_fn is None:
        if mode not in DISTILL_MODES:
            raise ValueError(f"Unknown distillation mode {mode!r}; use one of {sorted(DISTILL_MODES)}.")
        alphas, temperatures = DISTILL_MODES[mode](stats, alpha, temperature)
    else:
        alphas, temperatures = weights_fn(stats)
    token_temperature = temperatures[sample_ids]
    kl = temperature_kl(student_logits, teacher_logits, token_temperature, chunk_size)
    return (alphas[sample_ids] * token_temperature**2 * kl).sum(), stats, alphas, temperatures
