"""Scores over several training seeds, and differences between models paired on the same probe items.

A benchmark score varies for two reasons: the training run (its seed: LoRA initialisation, data order, the sampled
rewrites) and the probe's items (which questions happen to be asked). Every model answers the same items, so two
models are compared item by item, and each arm's seed `k` is compared with the other arm's seed `k`.

- `mean_over_seeds(scores)`: the mean of the per-seed scores, with a 95 % t-interval over seeds (`K - 1` degrees of
  freedom). With one run (the seed model) the interval is over items instead: each item's outcome is one observation.
- `paired_difference(a, b)`: `a[k][i]` and `b[k][i]` are item `i`'s outcomes under seed `k` (`b` may have one row,
  the seed model, compared with every seed of `a`). The difference is the mean over seeds and items. Its standard
  error adds the two sources of noise: the spread of the per-seed differences over seeds (`s_seeds^2 / K`) and the
  spread of the per-item differences, averaged over seeds, over items (`s_items^2 / n`). Adding them counts the
  seed-by-item interaction twice, so the interval is conservative. The 95 % interval uses Student's t with the
  Welch-Satterthwaite degrees of freedom of that sum. `item_share`, the items' part of the variance, says which
  would narrow the interval more: more probe items or more seeds.

Outcomes are 0/1 for rule-checked probes and fractions (a prompt's share of instructions followed, a cosine
similarity) elsewhere; nothing here assumes which.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error and 95 % confidence interval `[low, high]`."""

    mean: float
    standard_error: float
    low: float
    high: float
    degrees_of_freedom: float  # of the t quantile (inf: no spread to estimate; the interval is the point)
    over: str  # "seeds" or "items": what the interval is over
    count: int  # seeds, or items
    # paired differences: the share of the variance that comes from the items, the rest from the seeds. Near 1,
    # more probe items would narrow the interval; near 0, more training seeds would.
    item_share: float | None = None

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return asdict(self)


def _t_interval(
    mean: float,
    standard_error: float,
    degrees_of_freedom: float,
    over: str,
    count: int,
    item_share: float | None = None,
) -> Estimate:
    if standard_error == 0 or not math.isfinite(degrees_of_freedom):
        return Estimate(mean, standard_error, mean, mean, math.inf, over, count, item_share)
    half = scipy_stats.t.ppf((1 + CONFIDENCE) / 2, degrees_of_freedom) * standard_error
    return Estimate(mean, standard_error, mean - half, mean + half, degrees_of_freedom, over, count, item_share)


def _mean_with_t_interval(values: Sequence[float], over: str) -> Estimate:
    """The mean of `values` with a t-interval over them (a point when there is only one)."""
    count = len(values)
    if count == 0:
        raise ValueError(f"A mean over {over} needs at least one {over[:-1]}.")
    mean = statistics.fmean(values)
    if count == 1:
        return Estimate(mean, 0.0, mean, mean, math.inf, over, 1)
    return _t_interval(mean, statistics.stdev(values) / math.sqrt(count), count - 1, over, count)


def mean_over_items(outcomes: Sequence[float]) -> Estimate:
    """The mean of one run's per-item outcomes, with a t-interval over the items."""
    return _mean_with_t_interval(outcomes, "items")


def mean_over_seeds(per_seed_scores: Sequence[float]) -> Estimate:
    """The mean of the per-seed scores with a t-interval over seeds (at least two seeds for an interval)."""
    return _mean_with_t_interval(per_seed_scores, "seeds")


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> Estimate:
    """`mean(a) - mean(b)` over seeds and items, paired item by item and seed by seed (see the module docstring).

    `a` is `[seed][item]`; `b` is the same shape, or a single row (a model trained by no seed), which is then paired
    with every seed of `a`.
    """
    if not a or not b:
        raise ValueError("paired_difference needs at least one seed on each side.")
    if len(b) == 1 and len(a) > 1:
        b = [b[0]] * len(a)
    if len(a) != len(b):
        raise ValueError(f"paired_difference pairs seed by seed, but got {len(a)} and {len(b)} seeds.")
    n = len(a[0])
    if n == 0 or any(len(row) != n for row in (*a, *b)):
        raise ValueError("paired_difference needs the same non-zero number of items in every seed of both sides.")
    k = len(a)
    differences = [[x - y for x, y in zip(row_a, row_b, strict=True)] for row_a, row_b in zip(a, b, strict=True)]
    per_seed = [statistics.fmean(row) for row in differences]
    per_item = [statistics.fmean(differences[s][i] for s in range(k)) for i in range(n)]
    mean = statistics.fmean(per_seed)
    seed_part = statistics.variance(per_seed) / k if k > 1 else 0.0
    item_part = statistics.variance(per_item) / n if n > 1 else 0.0
    variance = seed_part + item_part
    if variance == 0:
        return Estimate(mean, 0.0, mean, mean, math.inf, "seeds and items", n)
    # Welch-Satterthwaite: the degrees of freedom of a sum of two variance estimates.
    terms = (seed_part**2 / (k - 1) if k > 1 else 0.0) + (item_part**2 / (n - 1) if n > 1 else 0.0)
    degrees_of_freedom = variance**2 / terms
    return _t_interval(mean, math.sqrt(variance), degrees_of_freedom, "seeds and items", n, item_part / variance)
