"""What a comparison's seeds can and cannot say: a method's mean with its 95% confidence interval over seeds, and,
for two methods, the paired difference by seed with its interval, a paired t-test, and a sentence.

Seed k of every method of a comparison shares its data order and augmentation draws, so a seed is a block: the
test is on the per-seed differences (Student's paired t-test, two-sided, at 5%), which removes what the seeds share.
The distributions are scipy's (`scipy.stats.t`, `nct`, `ttest_rel`). "About how many seeds would separate it" is a
power calculation: the fewest seeds n for which a paired t-test at 5% has an 80% chance of finding the observed
mean difference, were it the true one, at the observed standard deviation of the differences (the noncentral t
distribution with n - 1 degrees of freedom and noncentrality d / sd x sqrt(n)). It is a rough guide: the observed
difference and spread are themselves noisy estimates. Each pair is tested on its own, without a correction for
the several pairs of one table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # of every confidence interval
ALPHA = 0.05  # of the paired test: separated when p < ALPHA
POWER = 0.8  # of the seed count that would separate an observed difference
MOST_SEEDS = 10_000  # beyond this, "more than" it


@dataclass(frozen=True)
class Estimate:
    """The mean of `n` values and its 95% t-interval (`low`, `high`, `std`: None with a single value)."""

    mean: float
    n: int
    std: float | None = None
    low: float | None = None
    high: float | None = None

    def format(self, scale: float = 100, signed: bool = False, unit: str = "") -> str:
        """`47.9 (95% CI 45.1 to 50.7)` (of fractions, in percent); one value: `47.9 (1 seed: no interval)`."""
        sign = "+" if signed else ""
        mean = f"{scale * self.mean:{sign}.1f}{unit}"
        if self.low is None or self.high is None:
            return f"{mean} (1 seed: no interval)"
        return f"{mean} (95% CI {scale * self.low:{sign}.1f} to {scale * self.high:{sign}.1f})"


def estimate(values: Sequence[float]) -> Estimate:
    """The mean of `values` and its 95% confidence interval (Student's t, n - 1 degrees of freedom)."""
    from scipy import stats  # a second and more to import: when a verdict is made, not as a command starts

    x = np.asarray(values, np.float64)
    if len(x) == 0:
        raise ValueError("no values to estimate from")
    mean = float(x.mean())
    if len(x) == 1:
        return Estimate(mean, 1)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return Estimate(mean, len(x), std, mean - half, mean + half)


def seeds_to_separate(difference: float, spread: float) -> int | None:
    """The fewest seeds (at least 2) at which a paired t-test at ALPHA finds a true mean difference `difference`
    with probability POWER, when the differences by seed have standard deviation `spread`; None if no number of
    seeds would (a difference of 0), MOST_SEEDS + 1 if more than MOST_SEEDS would be needed."""
    from scipy import stats  # a second and more to import: when a verdict is made, not as a command starts

    if difference == 0:
        return None
    if spread == 0:
        return 2
    effect = abs(difference) / spread

    def power(n: int) -> float:
        df = n - 1
        critical = stats.t.ppf(1 - ALPHA / 2, df)
        shift = effect * math.sqrt(n)
        wrong_way = float(stats.nct.cdf(-critical, df, shift))  # scipy gives nan where it underflows
        return float(stats.nct.sf(critical, df, shift)) + (0.0 if math.isnan(wrong_way) else wrong_way)

    if power(MOST_SEEDS) < POWER:
        return MOST_SEEDS + 1
    low, high = 2, MOST_SEEDS  # power grows with n: the first n that reaches POWER, by bisection
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if power(middle) >= POWER else (middle + 1, high)
    return low


@dataclass(frozen=True)
class Paired:
    """`first` against `second` (two rows of a table), seed by seed: the difference first - second."""

    first: str
    second: str
    seeds: list[int]
    difference: Estimate
    p_value: float | None  # None: fewer than 2 seeds, or the same nonzero difference at every seed
    separated: bool | None  # None: as p_value, nothing to say
    seeds_needed: int | None  # None: no number of seeds separates a difference of 0, or fewer than 2 seeds

    def sentence(self, unit: str = "points", scale: float = 100) -> str:
        """One plain sentence: the difference, its interval, the test, and whether the seeds separate it."""
        head = f"{self.first} - {self.second}: {self.difference.format(scale, signed=True, unit=' ' + unit)}"
        n = len(self.seeds)
        if self.separated is None and n < 2:
            return f"{head}; 1 seed: no interval and no test (a spread needs 2 seeds or more): run more seeds"
        if self.separated is None:
            return (
                f"{head}: no verdict at {n} seeds, which all give the same difference: no spread to test it against "
                "(the test figures are counts of videos, and a few seeds can agree by chance): run more seeds"
            )
        spread = self.difference.std or 0.0
        if self.separated:
            return f"{head}, paired t-test p = {_p(self.p_value)}: separated at {n} seeds"
        said = f"{head}, paired t-test p = {_p(self.p_value)}: not separated at {n} seeds"
        if self.seeds_needed is None:
            same = "the two give the same figure at every seed" if spread == 0 else "no difference to find"
            return f"{said}; {same}"
        needed = f"more than {MOST_SEEDS:,}" if self.seeds_needed > MOST_SEEDS else f"about {self.seeds_needed}"
        return (
            f"{said}; a difference of {scale * abs(self.difference.mean):.1f} {unit} at this spread (sd "
            f"{scale * spread:.1f}) would take {needed} seeds to separate (80% power)"
        )

    def to_json(self) -> dict:
        return {
            "first": self.first,
            "second": self.second,
            "seeds": self.seeds,
            "difference": self.difference.__dict__,
            "p_value": self.p_value,
            "separated": self.separated,
            "seeds_needed": self.seeds_needed,
            "sentence": self.sentence(),
        }


def _p(p: float | None) -> str:
    return "n/a" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"


def paired(first: str, by_seed: Mapping[int, float], second: str, other: Mapping[int, float]) -> Paired:
    """`first` - `second` over the seeds both have (`by_seed`, `other`: a value per seed): the mean difference, its
    95% interval, a two-sided paired t-test, and the seeds that would separate the difference at its spread."""
    from scipy import stats  # a second and more to import: when a verdict is made, not as a command starts

    seeds = sorted(by_seed.keys() & other.keys())
    if not seeds:
        raise ValueError(f"{first} and {second} share no seed to pair")
    # the accuracies are fractions of a video count: rounding drops the float noise of subtracting them, which
    # would make identical shifts look like a spread
    d = np.round([by_seed[s] - other[s] for s in seeds], 12)
    difference = estimate(d)
    if len(d) < 2:
        return Paired(first, second, seeds, difference, None, None, None)
    spread = difference.std or 0.0
    needed = seeds_to_separate(difference.mean, spread)
    if spread == 0 and difference.mean == 0:  # the same figure at every seed: nothing between them
        return Paired(first, second, seeds, difference, 1.0, False, needed)
    if spread == 0:  # the same difference at every seed (a few seeds of a few test videos): no spread to test against
        return Paired(first, second, seeds, difference, None, None, None)
    p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return Paired(first, second, seeds, difference, p, p < ALPHA, needed)
