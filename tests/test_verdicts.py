"""The verdicts of a comparison (`dali_skd/verdicts.py`) on known cases: identical runs are not separated, a fixed
shift with small noise is, one seed gives no interval and says so, and the seed count that would separate a
difference follows the power of a paired t-test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dali_skd.verdicts import MOST_SEEDS, estimate, paired, seeds_to_separate

SEEDS = range(10)


def noisy(mean: float, spread: float, seed: int) -> dict[int, float]:
    rng = np.random.default_rng(seed)
    return {s: float(mean + rng.normal(0, spread)) for s in SEEDS}


def test_identical_runs_are_not_separated() -> None:
    same = noisy(0.45, 0.05, seed=0)
    verdict = paired("skd-srl", same, "self-kd", dict(same))
    assert verdict.separated is False and verdict.p_value == 1.0 and verdict.seeds_needed is None
    assert verdict.difference.mean == 0 and verdict.difference.low == verdict.difference.high == 0
    assert verdict.sentence() == (
        "skd-srl - self-kd: +0.0 points (95% CI +0.0 to +0.0), paired t-test p = 1.000: not separated at 10 seeds; "
        "the two give the same figure at every seed"
    )


def test_a_shift_of_ten_points_with_small_noise_is_separated() -> None:
    base = noisy(0.40, 0.06, seed=1)  # the seeds differ a lot, but each seed's shift is about 10 points
    noise = np.random.default_rng(2).normal(0, 0.01, len(base))
    shifted = {s: v + 0.10 + n for (s, v), n in zip(base.items(), noise, strict=True)}
    verdict = paired("skd-srl", shifted, "baseline", base)
    assert verdict.separated is True and verdict.p_value < 0.001
    assert verdict.difference.low > 0.08 and verdict.difference.high < 0.12
    assert verdict.sentence().startswith("skd-srl - baseline: +10.")
    assert verdict.sentence().endswith("paired t-test p = < 0.001: separated at 10 seeds")
    # unpaired, the seeds' own spread (6 points) would hide much of it; paired, a few seeds suffice
    assert verdict.seeds_needed is not None and verdict.seeds_needed <= 3


def test_the_interval_and_test_are_scipys_paired_t() -> None:
    a, b = noisy(0.47, 0.04, seed=3), noisy(0.45, 0.04, seed=4)
    verdict = paired("a", a, "b", b)
    reference = stats.ttest_rel(list(a.values()), list(b.values()))
    interval = reference.confidence_interval(0.95)
    assert verdict.p_value == pytest.approx(reference.pvalue)
    assert (verdict.difference.low, verdict.difference.high) == pytest.approx((interval.low, interval.high))
    assert verdict.separated == (reference.pvalue < 0.05)


def test_one_seed_gives_no_interval_and_says_so() -> None:
    one = estimate([0.479])
    assert (one.low, one.high, one.std) == (None, None, None)
    assert one.format() == "47.9 (1 seed: no interval)"
    verdict = paired("skd-srl", {0: 0.479}, "baseline", {0: 0.399})
    assert verdict.separated is None and verdict.p_value is None
    assert verdict.sentence() == (
        "skd-srl - baseline: +8.0 points (1 seed: no interval); 1 seed: no interval and no test (a spread needs 2 "
        "seeds or more): run more seeds"
    )


def test_not_separated_says_how_many_seeds_would_separate_it() -> None:
    a = {s: 0.45 + d for s, d in enumerate([0.05, -0.03, 0.02, 0.06, -0.04, 0.01, 0.03, -0.02, 0.04, 0.0])}
    b = {s: 0.45 for s in SEEDS}
    verdict = paired("skd-srl", a, "self-kd", b)
    assert verdict.separated is False
    n = verdict.seeds_needed
    assert n is not None and n > 10
    assert f"would take about {n} seeds to separate (80% power)" in verdict.sentence()


def test_seeds_to_separate_is_the_power_of_a_paired_t_test() -> None:
    # Cohen's d = 0.5 at 80% power and 5% two-sided: 34 pairs (the textbook figure, e.g. G*Power)
    assert seeds_to_separate(0.02, 0.04) == 34
    assert seeds_to_separate(-0.02, 0.04) == 34
    assert seeds_to_separate(0.0, 0.04) is None
    assert seeds_to_separate(0.02, 0.0) == 2
    assert seeds_to_separate(1e-4, 0.5) == MOST_SEEDS + 1
    assert "more than 10,000 seeds" in paired("a", {0: 0.6001, 1: 0.5}, "b", {0: 0.5, 1: 0.6}).sentence()


def test_pairs_use_the_seeds_both_rows_have() -> None:
    verdict = paired("a", {0: 0.5, 1: 0.6, 2: 0.7}, "b", {1: 0.5, 2: 0.6, 3: 0.1})
    assert verdict.seeds == [1, 2] and verdict.difference.mean == pytest.approx(0.1)
    with pytest.raises(ValueError, match="share no seed"):
        paired("a", {0: 0.5}, "b", {1: 0.5})


def test_the_same_difference_at_every_seed_is_no_verdict() -> None:
    """Two seeds of 48 test videos each 2 videos apart (Table I's normal12 baselines): the differences agree to the
    video, their spread is 0, and a t-test has nothing to weigh the difference against: no verdict, said."""
    verdict = paired("baseline [arch=r3d18-tiny]", {0: 39 / 48, 1: 40 / 48}, "baseline", {0: 37 / 48, 1: 38 / 48})
    assert verdict.separated is None and verdict.p_value is None and verdict.seeds_needed is None
    assert verdict.sentence() == (
        "baseline [arch=r3d18-tiny] - baseline: +4.2 points (95% CI +4.2 to +4.2): no verdict at 2 seeds, which all "
        "give the same difference: no spread to test it against (the test figures are counts of videos, and a few "
        "seeds can agree by chance): run more seeds"
    )
