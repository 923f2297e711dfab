"""Scores over several training seeds, and differences between models paired on the same probe items.

A benchmark score varies for two reasons: the training run (its seed: LoRA initialisation, data order, the sampled
rewrites) and the probe's items (which questions happen to be asked). Every model answers the same items, so two
models are compared item by item, and each arm's seed `k` is compared with the other arm's seed `k`.

- `mean_over_seeds(scores)`: the mean of the per-seed scores, with a 95 % t-interval over seeds (`K - 1` degrees of
  freedom). With one run (the seed model) the interval is over items instead: each item's outcome is one observation.
- `paired_difference(a, b)`: `a[k][i]` and `b[k][i]` are item `i`'s outcomes under seed `k` (`b` may have one row,
  the seed model, compared with every seed of `a`). The difference `d[k][i]` is modelled as two-way random effects,
  `mu + s_k + t_i + e_ki` (seed, item, and seed-by-item interaction with the residual noise); the estimate of `mu`
  is the grand mean, whose variance `σ_s²/K + σ_t²/n + σ_e²/(K n)` is estimated from the mean squares of a two-way
  ANOVA without replication (a component estimated below 0 is 0, its mean square pooled into the residual's), with
  Satterthwaite's degrees of freedom for the 95 % t-interval (which, like Welch's test, runs a little short when a
  mean square with 2 degrees of freedom carries most of the variance: 3 seeds, the seeds dominating, cover about
  93 %). It replaces the sum `s_seeds²/K + s_items²/n` of the spreads of the per-seed and the per-item means:
  each of those spreads holds the interaction, so the sum counted it twice and its intervals were too wide (in a run
  where the interaction dominates, about 99 % coverage for a nominal 95 %). `item_share` and `interaction_share`
  say where the variance comes from: items (more probe items would narrow the interval), the interaction (more of
  either would), the rest from the seeds (more training seeds would).
- `paired_ratio((a, b), (c, e))`: the ratio of two paired differences, `mean(a - b) / mean(c - e)`, with Fieller's
  95 % set (the ratios `r` for which `(a - b) - r (c - e)` is not distinguishable from 0); `ratio_exceeds` tests
  one `r0`. `minimum_detectable_difference` turns an estimate's standard error into the smallest true difference a
  run of this size detects with 80 % power.

Outcomes are 0/1 for rule-checked probes and fractions (a prompt's share of instructions followed, a cosine
similarity) elsewhere; nothing here assumes which.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, special

CONFIDENCE = 0.95
_T_QUANTILE = (1 + CONFIDENCE) / 2

Rows = Sequence[Sequence[float]]  # [seed][item]; a numpy array of that shape is fine


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
    # paired differences: the share of the variance (standard error squared) that comes from the items. Near 1,
    # more probe items would narrow the interval.
    item_share: float | None = None
    # paired differences: the share from the seed-by-item interaction (and residual noise), which more items or more
    # seeds would both shrink; None with one seed or one item, where it cannot be told apart from the other source.
    # The rest, `seed_share`, comes from the seeds: near 1, more training seeds would narrow the interval.
    interaction_share: float | None = None

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def seed_share(self) -> float | None:
        """The share of the variance that comes from the training seeds (paired differences only)."""
        if self.item_share is None:
            return None
        return max(0.0, 1.0 - self.item_share - (self.interaction_share or 0.0))

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return asdict(self)


def _t_quantile(degrees_of_freedom: float, probability: float) -> float:
    # scipy.special rather than scipy.stats: the same quantile, some forty times faster (simulations call it a lot)
    return float(special.stdtrit(degrees_of_freedom, probability))


def _t_interval(
    mean: float,
    standard_error: float,
    degrees_of_freedom: float,
    over: str,
    count: int,
    item_share: float | None = None,
    interaction_share: float | None = None,
) -> Estimate:
    if standard_error == 0 or not math.isfinite(degrees_of_freedom):
        return Estimate(mean, standard_error, mean, mean, math.inf, over, count, item_share, interaction_share)
    half = _t_quantile(degrees_of_freedom, _T_QUANTILE) * standard_error
    return Estimate(
        mean, standard_error, mean - half, mean + half, degrees_of_freedom, over, count, item_share, interaction_share
    )


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


def _differences(a: Rows, b: Rows, name: str = "paired_difference") -> np.ndarray:
    """`a - b` as a `[seed][item]` array, `b` broadcast when it has one row; refuses shapes that do not pair."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"{name} needs at least one seed on each side.")
    if len(b) != 1 and len(a) != len(b):
        raise ValueError(f"{name} pairs seed by seed, but got {len(a)} and {len(b)} seeds.")
    n = len(a[0])
    if n == 0 or any(len(row) != n for row in (*a, *b)):
        raise ValueError(f"{name} needs the same non-zero number of items in every seed of both sides.")
    return np.asarray(a, dtype=float) - np.asarray(b, dtype=float)


def _sums_of_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The two-way ANOVA's sums of (cross-)products of `x` and `y`: seeds, items, residual (`x is y`: squares)."""
    k, n = x.shape
    x_seed, x_item = x.mean(axis=1) - x.mean(), x.mean(axis=0) - x.mean()
    y_seed, y_item = y.mean(axis=1) - y.mean(), y.mean(axis=0) - y.mean()
    x_resid = x - x.mean() - x_seed[:, None] - x_item[None, :]
    y_resid = y - y.mean() - y_seed[:, None] - y_item[None, :]
    return np.array([n * x_seed @ y_seed, k * x_item @ y_item, float(np.vdot(x_resid, y_resid))])


def _two_way_variance(
    ss_seed: float, ss_item: float, ss_resid: float, k: int, n: int
) -> tuple[float, float, float | None, float | None]:
    """The estimated variance of the grand mean of a `k x n` two-way layout, from its sums of squares.

    Returns the variance, its Satterthwaite degrees of freedom, and the shares of items and of the interaction.

    With `E[MS_seed] = n σ_s² + σ_e²`, `E[MS_item] = k σ_t² + σ_e²`, `E[MS_resid] = σ_e²`, the variance
    `σ_s²/k + σ_t²/n + σ_e²/(k n)` is estimated by `(MS_seed + MS_item - MS_resid) / (k n)`, with Satterthwaite's
    degrees of freedom for that combination. A component whose mean square is not above the residual's is estimated
    as 0: its sum of squares and degrees of freedom join the residual's (the smaller mean square first; the other is
    then compared with the pooled residual). With one component left, the variance is its mean square over `k n`
    (`n - 1` or `k - 1` degrees of freedom: the residual's coefficient is then 0); with none, the pooled residual's
    (`k n - 1`). Either way it is the sum `σ̂_s²/k + σ̂_t²/n + σ̂_e²/(k n)` of the truncated components, and it is
    continuous in the data (a component is dropped where its mean square equals the residual's).
    """
    if k == 1 and n == 1:
        return 0.0, math.inf, None, None
    if k == 1:  # no seed component, and the interaction is the items' noise: the spread of the items
        return ss_item / (n - 1) / n, n - 1, 1.0, None
    if n == 1:
        return ss_seed / (k - 1) / k, k - 1, 0.0, None
    mean_squares = {"seed": (ss_seed / (k - 1), k - 1), "item": (ss_item / (n - 1), n - 1)}
    resid_ss, resid_df = ss_resid, (k - 1) * (n - 1)
    kept = dict(mean_squares)
    for source, (mean_square, df) in sorted(mean_squares.items(), key=lambda entry: entry[1][0]):
        if mean_square <= resid_ss / resid_df:
            del kept[source]
            resid_ss, resid_df = resid_ss + mean_square * df, resid_df + df
    resid_ms = resid_ss / resid_df
    # The variance times k n, as a linear combination of independent mean squares (each with its df).
    terms = [(1.0, ms, df) for ms, df in kept.values()] + [(1.0 - len(kept), resid_ms, resid_df)]
    total = sum(coefficient * ms for coefficient, ms, _ in terms)
    if total <= 0:
        return 0.0, math.inf, None, None
    denominator = sum((coefficient * ms) ** 2 / df for coefficient, ms, df in terms)
    degrees_of_freedom = total**2 / denominator if denominator > 0 else math.inf
    item_part = kept["item"][0] - resid_ms if "item" in kept else 0.0  # k σ_t², over k n as σ_t²/n
    return total / (k * n), degrees_of_freedom, item_part / total, resid_ms / total


def _estimate_of_differences(differences: np.ndarray) -> Estimate:
    """The grand mean of a `[seed][item]` array of paired differences with its two-way interval."""
    k, n = differences.shape
    mean = float(differences.mean())
    ss_seed, ss_item, ss_resid = _sums_of_squares(differences, differences).tolist()
    variance, degrees_of_freedom, item_share, interaction_share = _two_way_variance(ss_seed, ss_item, ss_resid, k, n)
    if variance == 0:
        return Estimate(mean, 0.0, mean, mean, math.inf, "seeds and items", n)
    return _t_interval(
        mean, math.sqrt(variance), degrees_of_freedom, "seeds and items", n, item_share, interaction_share
    )


def paired_difference(a: Rows, b: Rows) -> Estimate:
    """`mean(a) - mean(b)` over seeds and items, paired item by item and seed by seed (see the module docstring).

    `a` is `[seed][item]`; `b` is the same shape, or a single row (a model trained by no seed), which is then paired
    with every seed of `a`.
    """
    return _estimate_of_differences(_differences(a, b))


def minimum_detectable_difference(estimate: Estimate, power: float = 0.8) -> float:
    """The smallest true difference that a run like `estimate`'s detects with probability `power`.

    Detecting is the two-sided 95 % test (the interval excludes 0), so the difference is
    `(t_{0.975, df} + t_{power, df}) * standard_error`, the standard choice for sizing a study. Inf where the estimate
    has no spread to estimate (infinite degrees of freedom: a point), 0 where its standard error is 0 otherwise.
    """
    if not 0 < power < 1:
        raise ValueError(f"power must be between 0 and 1, got {power}.")
    if not math.isfinite(estimate.degrees_of_freedom):
        return math.inf
    if estimate.standard_error == 0:
        return 0.0
    df = estimate.degrees_of_freedom
    return (_t_quantile(df, _T_QUANTILE) + _t_quantile(df, power)) * estimate.standard_error


@dataclass(frozen=True)
class RatioEstimate:
    """A ratio of two paired differences with its 95 % Fieller set.

    `bounded`: the set is the interval `[low, high]`. Otherwise `low = -inf`, `high = inf`, and the set is either every
    ratio (`gap` None: the denominator is not distinguishable from 0, nor is the ratio from any value) or every ratio
    outside the open interval `gap` (two rays: the denominator's sign is not settled, but some ratios are excluded;
    `(-inf, inf)`: no finite ratio, when differences without any spread put the denominator at exactly 0).
    """

    ratio: float  # inf or nan when the denominator's estimate is exactly 0
    low: float
    high: float
    bounded: bool
    gap: tuple[float, float] | None = None

    def contains(self, ratio: float) -> bool:
        if self.gap is not None and self.gap[0] < ratio < self.gap[1]:
            return False
        return self.low <= ratio <= self.high

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio_differences(
    numerator: tuple[Rows, Rows], denominator: tuple[Rows, Rows], name: str
) -> tuple[np.ndarray, np.ndarray]:
    x, y = _differences(*numerator, name=name), _differences(*denominator, name=name)
    if x.shape != y.shape:
        raise ValueError(f"{name} needs both differences over the same seeds and items, got {x.shape} and {y.shape}.")
    return x, y


_RATIO_GRID = 48  # angles tried around the projective line before the bounds are refined
_RATIO_REFINE = 8  # the steps each bracket of a bound is cut into before Brent's method


def paired_ratio(numerator: tuple[Rows, Rows], denominator: tuple[Rows, Rows]) -> RatioEstimate:
    """`mean(a - b) / mean(c - e)` for `numerator = (a, b)`, `denominator = (c, e)`, with Fieller's 95 % set.

    All four are `[seed][item]` over the same seeds and items (`b` and `e` may be one row, as in `paired_difference`).
    The set is the ratios `r` for which the per-(seed, item) contrast `(a - b) - r (c - e)` has a 95 % interval
    (`paired_difference`'s two-way estimator) that holds 0: a test inversion, so its coverage is that of the
    contrast's interval, whatever the noise of the denominator. It is bounded only when the denominator is
    distinguishable from 0 (see `RatioEstimate`).

    The bounds are found on the angle `θ` of `cos θ (a - b) - sin θ (c - e)` (`r = tan θ`; the test does not depend
    on the contrast's scale), where the whole real line, infinities included, is a circle, and Fieller's set an arc
    holding the estimate: its ends, the first angles outside the set on either side of the estimate, are bracketed on
    a grid and refined with Brent's method. A gap narrower than the grid's spacing is still searched for, around the
    least compatible angle, when no grid point is outside the set. Where the contrast's degrees of freedom jump (a
    variance component truncated to 0 for some `r` and not others), the set can have islands beyond that arc, mostly
    with few seeds and items: the arc around the estimate is what is reported.
    """
    x, y = _ratio_differences(numerator, denominator, "paired_ratio")
    k, n = x.shape
    mean_x, mean_y = float(x.mean()), float(y.mean())
    xx, xy, yy = _sums_of_squares(x, x), _sums_of_squares(x, y), _sums_of_squares(y, y)

    def excess(theta: float) -> float:
        """How far the contrast at `theta` is from holding 0 in its interval: > 0 outside the set."""
        cos, sin = math.cos(theta), math.sin(theta)
        ss = np.maximum(cos * cos * xx - 2 * cos * sin * xy + sin * sin * yy, 0.0)  # rounding can go below 0
        variance, df, _, _ = _two_way_variance(*ss.tolist(), k, n)
        mean = abs(cos * mean_x - sin * mean_y)
        if variance == 0:
            return mean
        return mean - _t_quantile(df, _T_QUANTILE) * math.sqrt(variance)

    if mean_y != 0:
        ratio = mean_x / mean_y
    else:
        ratio = math.copysign(math.inf, mean_x) if mean_x != 0 else math.nan
    if math.isnan(ratio):  # both means 0: every contrast's is, so every ratio is in the set
        return RatioEstimate(ratio, -math.inf, math.inf, False)
    if not xx.any() and not yy.any():  # no spread at all: the set is the estimate alone (as the interval is a point)
        if math.isfinite(ratio):
            return RatioEstimate(ratio, ratio, ratio, True)
        return RatioEstimate(ratio, -math.inf, math.inf, False, (-math.inf, math.inf))
    theta_hat = math.atan(ratio) if math.isfinite(ratio) else math.pi / 2  # in (-π/2, π/2]
    angles = [theta_hat + math.pi * j / _RATIO_GRID for j in range(1, _RATIO_GRID)]
    excesses = [excess(theta) for theta in angles]
    outside = [j for j, value in enumerate(excesses) if value > 0]
    if not outside:
        best = max(range(len(angles)), key=excesses.__getitem__)
        found = optimize.minimize_scalar(
            lambda theta: -excess(theta),
            bounds=(angles[best] - math.pi / _RATIO_GRID, angles[best] + math.pi / _RATIO_GRID),
            method="bounded",
        )
        if -found.fun <= 0:
            return RatioEstimate(ratio, -math.inf, math.inf, False)
        angles.insert(best + 1 if found.x > angles[best] else best, float(found.x))
        outside = [j for j, theta in enumerate(angles) if excess(theta) > 0]
    angles = [theta_hat, *angles, theta_hat + math.pi]
    first, last = outside[0] + 1, outside[-1] + 1  # indices into the padded list

    def boundary(inside: float, beyond: float) -> float:
        """The first angle outside the set from `inside` towards `beyond` (a grid point outside)."""
        if excess(inside) > 0:  # the estimate itself, off by rounding where the set is that single point
            return inside
        for step in range(1, _RATIO_REFINE):  # the first exit, not one behind a narrow island, if there is one
            between = inside + (beyond - inside) * step / _RATIO_REFINE
            if excess(between) > 0:
                beyond = between
                break
            inside = between
        return optimize.brentq(excess, inside, beyond, xtol=1e-13)

    theta_high = boundary(angles[first - 1], angles[first])
    theta_low = boundary(angles[last + 1], angles[last]) - math.pi
    # The arc [theta_low, theta_high] holds theta_hat; it maps to one interval unless it crosses ±π/2 (r = ±inf).
    crosses_infinity = theta_low <= -math.pi / 2 or theta_high >= math.pi / 2
    if not crosses_infinity:  # (min and max: tan(atan(r)) may round off r)
        return RatioEstimate(ratio, min(math.tan(theta_low), ratio), max(math.tan(theta_high), ratio), True)
    return RatioEstimate(ratio, -math.inf, math.inf, False, (math.tan(theta_high), math.tan(theta_low)))


def ratio_exceeds(numerator: tuple[Rows, Rows], denominator: tuple[Rows, Rows], r0: float) -> Estimate:
    """Whether `mean(a - b) / mean(c - e)` exceeds `r0`: the estimate of the contrast `(a - b) - r0 (c - e)`.

    Its lower bound above 0 says the ratio exceeds `r0` (a one-sided 2.5 % test; upper bound below 0: it falls
    short). The contrast is oriented by the estimated denominator's sign (negated when `mean(c - e) < 0`), so that
    its sign is the sign of `ratio - r0`: read it only when the denominator's own interval excludes 0.
    """
    x, y = _ratio_differences(numerator, denominator, "ratio_exceeds")
    contrast = x - r0 * y
    return _estimate_of_differences(-contrast if y.mean() < 0 else contrast)
