"""The seed/item aggregation of the forgetting benchmark, against hand computations."""

from __future__ import annotations

import math

import pytest

from trl_selfdistill.evaluation.stats import mean_over_items, mean_over_seeds, paired_difference

T_975 = {2: 4.302652729749464, 4: 2.7764451051977934, 7: 2.3646242510102993}  # Student's t, two-sided 95 %


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


def test_paired_difference_adds_the_seed_and_the_item_noise():
    a = [[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]  # 3 seeds x 4 items
    b = [[0, 1, 0, 1], [1, 0, 0, 0], [0, 1, 0, 1]]
    # differences per seed: [1,0,0,0] [0,0,0,1] [1,0,1,0] -> per-seed means 0.25, 0.25, 0.5
    # per-item means over seeds: 2/3, 0, 1/3, 1/3
    estimate = paired_difference(a, b)
    per_seed, per_item = [0.25, 0.25, 0.5], [2 / 3, 0, 1 / 3, 1 / 3]
    mean = sum(per_seed) / 3
    var_seed = sum((x - mean) ** 2 for x in per_seed) / 2 / 3
    item_mean = sum(per_item) / 4
    var_item = sum((x - item_mean) ** 2 for x in per_item) / 3 / 4
    df = (var_seed + var_item) ** 2 / (var_seed**2 / 2 + var_item**2 / 3)
    assert estimate.mean == pytest.approx(1 / 3)
    assert estimate.standard_error == pytest.approx(math.sqrt(var_seed + var_item))
    assert estimate.degrees_of_freedom == pytest.approx(df)
    assert estimate.item_share == pytest.approx(var_item / (var_seed + var_item))
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(var_seed + var_item)
    assert (estimate.low, estimate.high) == pytest.approx((1 / 3 - half, 1 / 3 + half))
    assert estimate.excludes_zero() == (1 / 3 - half > 0)


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
