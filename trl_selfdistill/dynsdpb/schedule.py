"""The per-sample distillation weight and temperature: the one place to change the rule.

From the previous optimizer step's predictions on a re-used sample's response tokens, `p_ij = softmax(z_prev_ij)`:

- uncertainty     `u_i = mean_j H(p_ij) / log V`   (0 = certain, 1 = uniform)
- discrimination  `d_i = mean_j p_ij[gold_ij]`     (how much the previous step already favoured the label)

Both come from the forward pass in which the sample was new, the one that produced its teacher (its per-token entropy
and gold log-probability cost nothing extra there), and are cached with the teacher (`sample_statistics`).

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


def sample_statistics(entropy: Tensor, log_probs: Tensor, counts: list[int], vocab_size: int) -> SampleStatistics:
    """Per-sample `u_i` and `d_i` from per-token entropies and gold log-probabilities of one forward pass.

    `entropy` and `log_probs` are packed `[sum(counts)]` (sample after sample, `counts[i]` tokens each). A sample with
    no tokens gets zeros.
    """
    if vocab_size < 2:
        raise ValueError(f"The vocabulary needs at least 2 entries for a normalised entropy, got {vocab_size}.")
    if entropy.shape != log_probs.shape or entropy.shape != (sum(counts),):
        raise ValueError(
            f"`entropy` {tuple(entropy.shape)} and `log_probs` {tuple(log_probs.shape)} need one entry per token "
            f"({sum(counts)})."
        )
    device = entropy.device
    sample_ids = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    sums = torch.zeros(2, len(counts), dtype=torch.float32, device=device)
    sums[0].index_add_(0, sample_ids, entropy.detach().float() / math.log(vocab_size))
    sums[1].index_add_(0, sample_ids, log_probs.detach().float().exp())
    means = sums / torch.tensor(counts, device=device).clamp(min=1)
    return SampleStatistics(uncertainty=means[0].clamp(0, 1), discrimination=means[1].clamp(0, 1))


def dynamic_weights(stats: SampleStatistics, alpha: float, temperature: float) -> tuple[Tensor, Tensor]:
    """This project's DynSDPB rule: `alpha_i = alpha * d_i * (1 - u_i)` and `T_i = T * (1 + u_i)`."""
    return alpha * stats.discrimination * (1 - stats.uncertainty), temperature * (1 + stats.uncertainty)


def constant_weights(stats: SampleStatistics, alpha: float, temperature: float) -> tuple[Tensor, Tensor]:
    """DLB (the ablation): `alpha_i = alpha` and `T_i = T` for every sample."""
    return torch.full_like(stats.uncertainty, alpha), torch.full_like(stats.uncertainty, temperature)


WeightRule = Callable[[SampleStatistics, float, float], tuple[Tensor, Tensor]]
DISTILL_MODES: dict[str, WeightRule] = {"dynamic": dynamic_weights, "constant": constant_weights}
