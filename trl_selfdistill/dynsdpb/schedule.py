"""The per-sample distillation weight and temperature: the one place to change the rule.

From the previous optimizer step's predictions on a re-used sample's response tokens, `p_ij = softmax(z_prev_ij)`:

- uncertainty     `u_i = mean_j H(p_ij) / log V`   (0 = certain, 1 = uniform)
- discrimination  `d_i = mean_j p_ij[gold_ij]`     (how much the previous step already favoured the label)

`dynamic` (default) is **this project's reading** of DynSDPB (Fu et al., arXiv 2411.16991). The paper adapts the
distillation weight and temperature to the model's prediction uncertainty and discrimination capability, but its exact
formulas are not published in a form we could reproduce, so the rule below is ours:

- `alpha_i = alpha * d_i * (1 - u_i)`: trust the previous step only where it was sure (`1 - u_i`) *and* right (`d_i`);
  early in training, when the previous predictions are poor, the distillation term fades out by itself.
- `T_i = T * (1 + u_i)`: soften uncertain targets, so that an unsure previous step passes on only its coarse ranking.

`constant` is DLB (Shen et al., CVPR 2022) carried over to language models, and the ablation: `alpha_i = alpha`,
`T_i = T` for every sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SampleStatistics:
    """The previous step's per-sample statistics, float32, shape `[num_samples]`."""

    uncertainty: Tensor  # u_i = mean_j H(p_ij) / log V, in [0, 1]
    discrimination: Tensor  # d_i = mean_j p_ij[gold_ij], in [0, 1]


def check_one_entry_per_token(labels: Tensor, sample_ids: Tensor, num_tokens: int) -> None:
    """The packed layout: one gold label and one sample id per token."""
    if labels.shape != (num_tokens,) or sample_ids.shape != (num_tokens,):
        raise ValueError(
            f"`labels` {tuple(labels.shape)} and `sample_ids` {tuple(sample_ids.shape)} need one entry per packed "
            f"token ({num_tokens})."
        )


@torch.no_grad()
def teacher_statistics(
    teacher_logits: Tensor, labels: Tensor, sample_ids: Tensor, num_samples: int, chunk_size: int = 1024
) -> SampleStatistics:
    """Per-sample mean normalised entropy and mean gold-token probability of the teacher.

    Computed in float32 (float64 for float64 inputs), `chunk_size` tokens at a time to bound the working memory. A
    sample with no tokens gets zeros.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"`teacher_logits` must be [tokens, vocab], got shape {tuple(teacher_logits.shape)}.")
    num_tokens, vocab = teacher_logits.shape
    if vocab < 2:
        raise ValueError(f"The vocabulary needs at least 2 entries for a normalised entropy, got {vocab}.")
    check_one_entry_per_token(labels, sample_ids, num_tokens)
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    entropy = torch.empty(num_tokens, dtype=dtype, device=teacher_logits.device)
    gold = torch.empty_like(entropy)
    for start in range(0, num_tokens, chunk_size):
        chunk = slice(start, start + chunk_size)
        log_p = torch.log_softmax(teacher_logits[chunk].to(dtype), dim=-1)
        p = log_p.exp()
        entropy[chunk] = -torch.where(p > 0, p * log_p, 0.0).sum(-1)  # 0 * log 0 = 0 (masked vocabulary entries)
        gold[chunk] = p.gather(-1, labels[chunk, None].long()).squeeze(-1)
    entropy /= math.log(vocab)
    ids = sample_ids.long()
    counts = torch.zeros(num_samples, dtype=dtype, device=entropy.device).index_add_(0, ids, torch.ones_like(gold))
    sums = torch.zeros(2, num_samples, dtype=dtype, device=entropy.device)
    sums[0].index_add_(0, ids, entropy)
    sums[1].index_add_(0, ids, gold)
    means = sums / counts.clamp(min=1)
    return SampleStatistics(uncertainty=means[0].clamp(0, 1), discrimination=means[1].clamp(0, 1))


def dynamic_weights(stats: SampleStatistics, alpha: float, temperature: float) -> tuple[Tensor, Tensor]:
    """This project's DynSDPB rule: `alpha_i = alpha * d_i * (1 - u_i)` and `T_i = T * (1 + u_i)`."""
    return alpha * stats.discrimination * (1 - stats.uncertainty), temperature * (1 + stats.uncertainty)


def constant_weights(stats: SampleStatistics, alpha: float, temperature: float) -> tuple[Tensor, Tensor]:
    """DLB (the ablation): `alpha_i = alpha` and `T_i = T` for every sample."""
    return torch.full_like(stats.uncertainty, alpha), torch.full_like(stats.uncertainty, temperature)


WeightRule = Callable[[SampleStatistics, float, float], tuple[Tensor, Tensor]]
DISTILL_MODES: dict[str, WeightRule] = {"dynamic": dynamic_weights, "constant": constant_weights}
