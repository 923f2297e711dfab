"""The per-sample distillation weight and temperature: the one place to change the rule.

From the previous step's predictions on a re-used sample's response tokens (`p_ij = softmax(z_prev_ij)`):

- uncertainty     u_i = mean_j H(p_ij) / log V      (0 = certain, 1 = uniform)
- discrimination  d_i = mean_j p_ij[gold_ij]         (how much the previous step already favoured the label)

`dynamic` (default): `alpha_i = alpha * d_i * (1 - u_i)` trusts the previous step only where it was sure *and* right,
and `T_i = T * (1 + u_i)` softens uncertain targets. This is this project's reading of Fu et al. (arXiv 2411.16991),
which describes weights and temperatures adapted to prediction uncertainty and discrimination capability but gives no
formulas we could reproduce. `constant` is DLB (Shen et al., CVPR 2022) carried over: `alpha_i = alpha`, `T_i = T`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SampleStatistics:
    uncertainty: torch.Tensor  # [n] in [0, 1]
    discrimination: torch.Tensor  # [n] in [0, 1]


@torch.no_grad()
def teacher_statistics(
    teacher_logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor, num_samples: int
) -> SampleStatistics:
    """Per-sample mean normalised entropy and mean gold-token probability of the teacher, in float32."""
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1) / math.log(teacher_logits.shape[-1])
    gold = p.gather(-1, labels[:, None]).squeeze(-1)
    counts = torch.zeros(num_samples, device=p.device).index_add_(0, sample_ids, torch.ones_like(gold)).clamp(min=1)
    per_sample = torch.zeros(2, num_samples, device=p.device)
    per_sample[0].index_add_(0, sample_ids, entropy)
    per_sample[1].index_add_(0, sample_ids, gold)
    per_sample /= counts
    return SampleStatistics(uncertainty=per_sample[0].clamp(0, 1), discrimination=per_sample[1])


def dynamic_weights(stats: SampleStatistics, alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This project's DynSDPB rule: `alpha * d * (1 - u)` and `T * (1 + u)`."""
    return alpha * stats.discrimination * (1 - stats.uncertainty), temperature * (1 + stats.uncertainty)


def constant_weights(stats: SampleStatistics, alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DLB: the same weight and temperature for every sample."""
    return torch.full_like(stats.uncertainty, alpha), torch.full_like(stats.uncertainty, temperature)


WeightRule = Callable[[SampleStatistics, float, float], tuple[torch.Tensor, torch.Tensor]]
DISTILL_MODES: dict[str, WeightRule] = {"dynamic": dynamic_weights, "constant": constant_weights}
