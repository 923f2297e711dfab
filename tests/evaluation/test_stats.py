"""The seed/item aggregation of the forgetting benchmark, against hand computations and simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import t

from trl_selfdistill.evaluation.stats import (
    Estimate,
    RatioEstimate,
    mean_over_items,
    mean_over_seeds,
    minimum_detectable_difference,
    paired_difference,
    paired_ratio,
    ratio_exceeds,
)

T_975 = {2: 4.302652729749464, 4: 2.7764451051977934, 7: 2.3646242510102993}  # Student's t, two-sided 95 %
REPLICATIONS = 2000


def test_mean_over_seeds_is_a_t_interval_over_the_seeds():
    estimate = mean_over_seeds([0.5, 0.6, 0.7])
    # mean 0.6, sample sd 0.1, standard error 0.1 / sqrt(3), t with 2 degrees of freedom
    assert estimate.mean == pytest.approx(0.6)
    assert estimate.standard_error == pytest.approx(0.1 / math.sqrt(3))
    assert estimate.high - estimate.mean == pytest.approx(T_975[2] * 0.1 / math.sqrt(3))
    assert estimate.low == pytest.approx(0.6 - T_975[2] * 0.1 / math.sqrt(3))
    assert (estimate.over, estimate.count, estimate.degrees_of_freedom) == ("seeds", 3, 2)


def test_one_run_is_a_point_over_seeds_and_an_interval_over_items():
    assert mean_over_seeds([0.4]).low == mean_over_seeds([0.4]).high == 0.4
    items = mean_over_items([1, 0, 0, 1, 0])
    # p = 0.4, sample variance = (2 * 0.36 + 3 * 0.16) / 4 = 0.3, standard error sqrt(0.3 / 5)
    assert items.mean == pytest.approx(0.4)
    assert items.standard_error == pytest.approx(math.sqrt(0.3 / 5))
    assert items.high - items.mean == pytest.approx(T_975[4] * math.sqrt(0.3 / 5))


def test_paired_difference_is_the_two_way_random_effects_estimate():
    # d[k][i] = seed effect + item effect + interaction, 3 seeds x 4 items; the interaction's rows and columns sum to 0
    seeds, items = [0, 1, 5], [0, 1, 3, 8]
    interaction = [[1, 0, -1, 0], [0, 1, 0, -1], [-1, -1, 1, 1]]
    d = [[s + i + e for i, e in zip(items, row, strict=True)] for s, row in zip(seeds, interaction, strict=True)]
    estimate = paired_difference(d, [[0, 0, 0, 0]])
    # grand mean 2 + 3 = 5; per-seed means deviate by -2, -1, 3; per-item means by -3, -2, 0, 5
    ms_seed = 4 * (4 + 1 + 9) / 2  # n * var(per-seed means) = 28
    ms_item = 3 * (9 + 4 + 0 + 25) / 3  # K * var(per-item means) = 38
    ms_resid = 8 / 6  # sum of squared interactions over (K - 1)(n - 1)
    seed_var, item_var, resid_var = (ms_seed - ms_resid) / 4, (ms_item - ms_resid) / 3, ms_resid  # σ_s², σ_t², σ_e²
    variance = seed_var / 3 + item_var / 4 + resid_var / 12  # 20/9 + 55/18 + 1/9 = 97/18
    assert variance == pytest.approx((ms_seed + ms_item - ms_resid) / 12) and variance == pytest.approx(97 / 18)
    df = (ms_seed + ms_item - ms_resid) ** 2 / (ms_seed**2 / 2 + ms_item**2 / 3 + ms_resid**2 / 6)  # about 4.79
    assert estimate.mean == pytest.approx(5)
    assert estimate.standard_error == pytest.approx(math.sqrt(variance))
    assert estimate.degrees_of_freedom == pytest.approx(df)
    assert estimate.item_share == pytest.approx(item_var / 4 / variance)
    assert estimate.interaction_share == pytest.approx(resid_var / 12 / variance)
    assert estimate.seed_share == pytest.approx(seed_var / 3 / variance)
    half = t.ppf(0.975, df) * math.sqrt(variance)
    assert (estimate.low, estimate.high) == pytest.approx((5 - half, 5 + half))
    assert estimate.as_dict()["interaction_share"] == estimate.interaction_share


def test_a_component_whose_mean_square_is_below_the_residual_is_pooled_into_it():
    # The seeds do not differ (MS_seed = 0): the seed component is 0, its (empty) sum of squares joins the residual,
    # and the variance is MS_item / (K n), with n - 1 degrees of freedom: the t-interval over the per-item means.
    items, interaction = [0, 1, 3, 8], [[1, 0, -1, 0], [0, 1, 0, -1], [-1, -1, 1, 1]]
    d = [[i + e for i, e in zip(items, row, strict=True)] for row in interaction]
    estimate = paired_difference(d, [[0] * 4])
    per_item = mean_over_items([sum(column) / 3 for column in zip(*d, strict=True)])
    assert estimate.standard_error == pytest.approx(per_item.standard_error)  # 38 / 12 = var(per-item means) / 4
    assert estimate.degrees_of_freedom == 3
    pooled = (8 + 0) / (6 + 2)  # the residual's and the seeds' sums of squares over their degrees of freedom
    assert estimate.interaction_share == pytest.approx(pooled / 38)
    assert estimate.item_share == pytest.approx((38 - pooled) / 38) and estimate.seed_share == pytest.approx(0)

    # 0/1 outcomes, 3 seeds x 4 items: both mean squares are below the residual's, so both components are 0 and the
    # cells are treated as independent: the variance is the spread of all 12 over 12, with 11 degrees of freedom.
    a = [[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    b = [[0, 1, 0, 1], [1, 0, 0, 0], [0, 1, 0, 1]]
    # differences [1,0,0,0] [0,0,0,1] [1,0,1,0]; per-seed means 1/4, 1/4, 1/2; per-item means 2/3, 0, 1/3, 1/3
    ms_seed = 4 * ((1 / 12) ** 2 * 2 + (1 / 6) ** 2) / 2  # 1/12
    ms_item = 3 * ((1 / 3) ** 2 * 2) / 3  # 2/9
    ss_total = 4 - 12 / 9  # four ones around a mean of 1/3
    ms_resid = (ss_total - 2 * ms_seed - 3 * ms_item) / 6  # 11/36
    assert ms_seed < ms_resid and ms_item < (ss_total - 3 * ms_item) / 8  # the seeds pooled first, then the items
    estimate = paired_difference(a, b)
    assert estimate.mean == pytest.approx(1 / 3)
    assert estimate.standard_error == pytest.approx(math.sqrt(ss_total / 11 / 12))
    assert estimate.degrees_of_freedom == 11
    assert (estimate.item_share, estimate.interaction_share) == (0, pytest.approx(1))
    half = t.ppf(0.975, 11) * estimate.standard_error
    assert (estimate.low, estimate.high) == pytest.approx((1 / 3 - half, 1 / 3 + half))


def test_one_seed_or_one_item_leaves_one_source_of_noise():
    one_seed = paired_difference([[1, 0, 1, 1]], [[0, 0, 1, 0]])  # differences 1, 0, 0, 1
    assert one_seed.standard_error == pytest.approx(math.sqrt(1 / 3 / 4))
    assert (one_seed.degrees_of_freedom, one_seed.item_share, one_seed.interaction_share) == (3, 1, None)
    one_item = paired_difference([[1], [0], [1]], [[0]])
    assert one_item.standard_error == pytest.approx(math.sqrt(1 / 3 / 3))
    assert (one_item.degrees_of_freedom, one_item.item_share, one_item.seed_share) == (2, 0, 1)


def test_one_reference_run_pairs_with_every_seed():
    a = [[1, 0, 1], [1, 1, 1]]
    seed_model = [[0, 0, 1]]
    assert paired_difference(a, seed_model) == paired_difference(a, [seed_model[0], seed_model[0]])
    assert paired_difference(a, seed_model).mean == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_identical_models_differ_by_exactly_zero():
    same = [[1, 0, 1], [0, 0, 1]]
    estimate = paired_difference(same, same)
    assert (estimate.mean, estimate.low, estimate.high) == (0, 0, 0)
    assert not estimate.excludes_zero()


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="seed by seed"):
        paired_difference([[1, 0], [1, 1]], [[1, 0], [0, 0], [1, 1]])
    with pytest.raises(ValueError, match="same non-zero number of items"):
        paired_difference([[1, 0]], [[1, 0, 1]])
    with pytest.raises(ValueError, match="at least one seed"):
        mean_over_seeds([])
    with pytest.raises(ValueError, match="same seeds and items"):
        paired_ratio(([[1, 0], [1, 1]], [[0, 0]]), ([[1, 0]], [[0, 0]]))


# --- simulations: d[k][i] = mu + s_k + t_i + e_ki with known components -------------------------------------------

MU, VARIANCE = 0.1, 0.02**2  # the true difference, and the variance of its estimate (the grand mean)
MIXES = {  # the shares of that variance from the seeds (σ_s²/K), the items (σ_t²/n), the interaction (σ_e²/(K n))
    "seed-dominated": (0.7, 0.15, 0.15),
    "item-dominated": (0.15, 0.7, 0.15),
    "interaction-dominated": (0.15, 0.15, 0.7),
    "balanced": (1 / 3, 1 / 3, 1 / 3),
}


def _two_way_draws(
    rng: np.random.Generator, k: int, n: int, shares: tuple[float, float, float], mu: float = MU
) -> np.ndarray:
    """`REPLICATIONS` arrays `[seed][item]` of Gaussian two-way random effects whose grand mean has `VARIANCE`."""
    sizes = (k, n, k * n)
    seed_sd, item_sd, interaction_sd = (math.sqrt(s * VARIANCE * size) for s, size in zip(shares, sizes, strict=True))
    return (
        mu
        + seed_sd * rng.standard_normal((REPLICATIONS, k, 1))
        + item_sd * rng.standard_normal((REPLICATIONS, 1, n))
        + interaction_sd * rng.standard_normal((REPLICATIONS, k, n))
    )


def _coverage(draws: np.ndarray, truth: float = MU) -> float:
    """The share of replications whose `paired_difference` interval (against a zero row) holds `truth`."""
    zero = np.zeros((1, draws.shape[2]))
    return float(np.mean([(e := paired_difference(d, zero)).low <= truth <= e.high for d in draws]))


def _old_coverage(draws: np.ndarray, truth: float = MU) -> float:
    """The same with the replaced estimator: `s_seeds²/K + s_items²/n`, Welch-Satterthwaite's degrees of freedom."""
    _, k, n = draws.shape
    seed_part = draws.mean(axis=2).var(axis=1, ddof=1) / k
    item_part = draws.mean(axis=1).var(axis=1, ddof=1) / n
    variance = seed_part + item_part
    df = variance**2 / (seed_part**2 / (k - 1) + item_part**2 / (n - 1))
    return float(np.mean(np.abs(draws.mean(axis=(1, 2)) - truth) <= t.ppf(0.975, df) * np.sqrt(variance)))


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("items", [120, 541])
@pytest.mark.parametrize("seeds", [3, 4, 5])
def test_paired_difference_covers_the_true_difference(seeds: int, items: int, mix: str):
    rng = np.random.default_rng([seeds, items, list(MIXES).index(mix)])
    coverage = _coverage(_two_way_draws(rng, seeds, items, MIXES[mix]))
    if seeds == 3 and mix == "seed-dominated":
        # A known limit of Satterthwaite's t, not of the variance: when a mean square with 2 degrees of freedom carries
        # most of the variance, the degrees of freedom are overestimated exactly when that mean square is small by
        # chance (as in Welch's test with 3 observations). 20000 replications measure about 92.8 %.
        assert 0.91 <= coverage <= 0.97
    else:
        assert 0.93 <= coverage <= 0.97


def test_the_old_sum_of_the_marginal_spreads_over_covers_when_the_interaction_dominates():
    # The spreads of the per-seed and of the per-item means each hold the interaction: their sum counts it twice.
    draws = _two_way_draws(np.random.default_rng(7), 4, 541, (0.05, 0.05, 0.9))
    old, new = _old_coverage(draws), _coverage(draws)
    assert old > 0.98
    assert 0.93 <= new <= 0.975 and new < old


def test_paired_difference_covers_the_true_difference_of_0_1_outcomes():
    # IFEval-like: 541 items of varying difficulty, pass/fail; 3 seeds of an arm against the seed model's one run.
    rng = np.random.default_rng(11)
    seeds, items = 3, 541
    difficulty = rng.uniform(0.2, 0.8, (REPLICATIONS, 1, items))  # the seed model's pass rate of each item
    seed_effect = rng.normal(0, 0.02, (REPLICATIONS, seeds, 1))  # at most 0.8 + 0.05 + 0.1 (5 sd): a probability
    arm = rng.random((REPLICATIONS, seeds, items)) < difficulty + MU / 2 + seed_effect
    seed_model = rng.random((REPLICATIONS, 1, items)) < difficulty
    zero_or_one = arm.astype(float) - seed_model.astype(float)
    assert set(np.unique(zero_or_one)) == {-1, 0, 1}
    assert 0.93 <= _coverage(zero_or_one, truth=MU / 2) <= 0.97


def test_at_the_minimum_detectable_difference_the_test_rejects_with_the_power_asked():
    seeds, items, shares = 5, 120, MIXES["balanced"]
    # The standard error, and Satterthwaite's degrees of freedom at the expected mean squares, of this layout
    seed_var, item_var, interaction_var = (s * VARIANCE * size for s, size in zip(shares, (5, 120, 600), strict=True))
    ms_seed, ms_item = items * seed_var + interaction_var, seeds * item_var + interaction_var
    df = (ms_seed + ms_item - interaction_var) ** 2 / (
        ms_seed**2 / 4 + ms_item**2 / 119 + interaction_var**2 / (4 * 119)
    )
    design = Estimate(0.0, math.sqrt(VARIANCE), -1.0, 1.0, df, "seeds and items", items)
    difference = minimum_detectable_difference(design)
    assert difference == pytest.approx((t.ppf(0.975, df) + t.ppf(0.8, df)) * math.sqrt(VARIANCE))
    draws = _two_way_draws(np.random.default_rng(5), seeds, items, shares, mu=difference)
    zero = np.zeros((1, items))
    power = np.mean([paired_difference(d, zero).excludes_zero() for d in draws])
    assert 0.76 <= power <= 0.84  # 0.79 over 10000 replications: the usual approximation of the noncentral t
    assert minimum_detectable_difference(design, power=0.5) < difference
    assert minimum_detectable_difference(mean_over_seeds([0.3])) == math.inf  # one run: no spread to estimate
    assert minimum_detectable_difference(Estimate(0.2, 0.0, 0.2, 0.2, 3, "seeds", 4)) == 0


# --- ratios of paired differences ----------------------------------------------------------------------------------


def _ratio_arms(rng: np.random.Generator, seeds: int, items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed model's one run and two trained arms, sharing the items' difficulty, with correlated seed effects.

    Their true means are 0.5 (seed model), 0.47 and 0.44: the ratio of the arms' differences from the seed model is
    (0.47 - 0.5) / (0.44 - 0.5) = 0.5.
    """
    shape = (REPLICATIONS, seeds, items)
    difficulty = rng.normal(0, 1, (REPLICATIONS, 1, items))
    seed_a = rng.normal(0, 1, (REPLICATIONS, seeds, 1))
    seed_c = 0.6 * seed_a + 0.8 * rng.normal(0, 1, (REPLICATIONS, seeds, 1))  # the same seed: shared data order
    seed_model = 0.5 + 0.15 * difficulty + rng.normal(0, 0.2, (REPLICATIONS, 1, items))
    a = 0.47 + 0.17 * difficulty + 0.01 * seed_a + rng.normal(0, 0.2, shape)
    c = 0.44 + 0.19 * difficulty + 0.015 * seed_c + rng.normal(0, 0.2, shape)
    return a, c, seed_model


def _in_fieller_set(numerator: tuple, denominator: tuple, ratio: float) -> bool:
    """The definition: the contrast `(a - b) - r (c - e)` has a `paired_difference` interval (against 0) holding 0."""
    contrast = np.subtract(*numerator) - ratio * np.subtract(*denominator)
    estimate = paired_difference(contrast, np.zeros((1, contrast.shape[1])))
    return estimate.low <= 0 <= estimate.high


def test_paired_ratio_covers_the_true_ratio():
    a, c, seed_model = _ratio_arms(np.random.default_rng(3), 4, 541)
    results = [paired_ratio((a[r], seed_model[r]), (c[r], seed_model[r])) for r in range(REPLICATIONS)]
    coverage = np.mean([result.contains(0.5) for result in results])
    assert 0.93 <= coverage <= 0.97
    for r, result in enumerate(results):
        # a test inversion: the set holds 0.5 exactly when the contrast at 0.5 is not distinguishable from 0 ...
        assert result.contains(0.5) == _in_fieller_set((a[r], seed_model[r]), (c[r], seed_model[r]), 0.5)
        # ... and it is bounded exactly when the denominator is distinguishable from 0
        assert result.bounded == paired_difference(c[r], seed_model[r]).excludes_zero()
    bounded = [r for r, result in enumerate(results) if result.bounded]
    assert len(bounded) > 0.95 * REPLICATIONS  # the denominator's difference is about 5 standard errors from 0
    for r in bounded[::100]:  # the bounds are where the contrast's interval stops holding 0
        result, numerator, denominator = results[r], (a[r], seed_model[r]), (c[r], seed_model[r])
        assert result.low < result.ratio < result.high and result.gap is None
        step = 1e-6 * (result.high - result.low)
        assert _in_fieller_set(numerator, denominator, result.low + step)
        assert _in_fieller_set(numerator, denominator, result.high - step)
        assert not _in_fieller_set(numerator, denominator, result.low - step)
        assert not _in_fieller_set(numerator, denominator, result.high + step)


def test_a_denominator_not_distinguishable_from_zero_gives_an_unbounded_set():
    numerator = ([[1, 1, 1, 0, 1], [1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], [[0, 0, 0, 0, 0]])  # clearly above 0
    denominator = ([[1, 0, 0, 1, 0], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0]], [[0, 1, 0, 0, 1]])  # mean -1/15, noise
    result = paired_ratio(numerator, denominator)
    assert not paired_difference(*denominator).excludes_zero()
    assert result.ratio == pytest.approx((12 / 15) / (-1 / 15))
    assert (result.low, result.high, result.bounded) == (-math.inf, math.inf, False)
    # two rays: every ratio except those near 0 (the numerator is clearly not 0, so r = 0 is excluded)
    assert result.gap is not None and result.gap[0] < 0 < result.gap[1]
    assert result.contains(result.ratio) and result.contains(1e9) and result.contains(-1e9) and not result.contains(0)
    step = 1e-6 * (result.gap[1] - result.gap[0])
    for end, inside in ((result.gap[0], -step), (result.gap[1], step)):
        assert _in_fieller_set(numerator, denominator, end + inside)
        assert not _in_fieller_set(numerator, denominator, end - inside)
    assert RatioEstimate(**result.as_dict()) == result

    # neither difference is distinguishable from 0: every ratio is compatible with the data
    noise = ([[1, 0, 0, 1, 0], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0]], [[0, 1, 0, 0, 0]])
    everything = paired_ratio(noise, denominator)
    assert (everything.low, everything.high, everything.bounded, everything.gap) == (-math.inf, math.inf, False, None)


def test_differences_without_spread_give_a_point():
    point = RatioEstimate(0.5, 0.5, 0.5, True)
    assert paired_ratio(([[1]], [[0]]), ([[2]], [[0]])) == point
    assert paired_ratio(([[1, 1], [1, 1]], [[0, 0]]), ([[2, 2], [2, 2]], [[0, 0]])) == point
    infinite = paired_ratio(([[1, 1], [1, 1]], [[0, 0]]), ([[0, 0], [0, 0]], [[0, 0]]))  # 1 / 0, exactly
    assert infinite.ratio == math.inf and not infinite.bounded
    assert infinite.contains(math.inf) and not infinite.contains(1e300)


def test_ratio_exceeds_is_the_contrast_at_that_ratio():
    a, c, seed_model = _ratio_arms(np.random.default_rng(4), 4, 541)
    numerator, denominator = (a[0], seed_model[0]), (c[0], seed_model[0])
    result = paired_ratio(numerator, denominator)
    assert result.bounded
    below, above = (
        ratio_exceeds(numerator, denominator, result.low - 0.1),
        ratio_exceeds(numerator, denominator, result.high + 0.1),
    )
    assert below.low > 0 and above.high < 0  # the ratio significantly exceeds r0 below the set, falls short above it
    assert not ratio_exceeds(numerator, denominator, result.ratio).excludes_zero()
    difference = np.subtract(*numerator) - 0.3 * np.subtract(*denominator)
    assert ratio_exceeds(numerator, denominator, 0.3) == paired_difference(-difference, np.zeros((1, 541)))
    # the denominator is negative here, so the contrast is negated: its sign is the sign of ratio - r0
    flipped = ((-a[0], -seed_model[0]), (-c[0], -seed_model[0]))  # both differences negated: the same ratio
    assert ratio_exceeds(*flipped, 0.3).mean == pytest.approx(ratio_exceeds(numerator, denominator, 0.3).mean)
