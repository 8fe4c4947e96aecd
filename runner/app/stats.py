"""The statistics of a sweep, pure: a row's repeats reduced to one score, a cell's mean over rows with
its interval, paired differences between two cells on the rows both answered (a t interval; McNemar's
exact test for pass/fail scores), Holm's adjustment for many comparisons, and the rows a paired
comparison needs to see a difference of a given size.

The dataset row is the unit of sampling: repeats of a row are reduced before anything is averaged,
so they never count as more rows than there are (with `mean` as the reducer, the interval over rows'
means is the cluster-robust one for rows of equal repeats)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

REDUCERS = ("mean", "majority", "max", "pass@k", "at_least_k")
CONFIDENCE = 0.95
POWER = 0.80
# the standard deviation of a paired difference taken when no earlier run of the spec gives one: that
# of pass/fail scores whose pairs disagree half the time, a conservative figure for most evaluations
DEFAULT_SD = 0.5


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        msg = f"pass@{k} needs at least {k} samples, the row has {n}"
        raise ValueError(msg)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def reduce_scores(scores: Sequence[float], reducer: str, k: int = 1) -> float | None:
    """One row's repeats (graded scores, None left out before) as one score."""
    if not scores:
        return None
    if reducer == "mean":
        return sum(scores) / len(scores)
    if reducer == "max":
        return max(scores)
    if reducer == "majority":  # a pass when more than half passed (a tie fails)
        return 1.0 if sum(1 for s in scores if s >= 0.5) * 2 > len(scores) else 0.0
    passed = sum(1 for s in scores if s >= 0.5)
    if reducer == "pass@k":
        return pass_at_k(len(scores), passed, k)
    if reducer == "at_least_k":
        return 1.0 if passed >= k else 0.0
    msg = f"unknown reducer '{reducer}'"
    raise ValueError(msg)


def binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


@dataclass(frozen=True)
class Mean:
    mean: float
    low: float
    high: float
    n: int


def mean_interval(values: Sequence[float]) -> Mean | None:
    """The mean over rows with its 95 % t interval (Student's t on n - 1 degrees of freedom)."""
    from scipy import stats  # noqa: PLC0415 - loaded for a sweep's report only

    n = len(values)
    if not n:
        return None
    mean = sum(values) / n
    if n < 2:
        return Mean(mean, mean, mean, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return Mean(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class Paired:
    """Cell a against cell b on the rows both answered."""

    rows: int
    difference: float  # mean of a - b
    low: float
    high: float
    test: str  # "mcnemar_exact" | "paired_t" | "none" (fewer than two rows)
    p: float | None
    sd: float  # of the per-row differences (what planning reuses)


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired difference a - b over the same rows: the mean with its 95 % t interval (analytic), and
    the p-value of McNemar's exact test (a binomial test on the discordant pairs) when every score
    is 0 or 1, else of the paired t test."""
    from scipy import stats  # noqa: PLC0415 - loaded for a sweep's report only

    n = len(a)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if n < 2:
        d = diffs[0] if diffs else 0.0
        return Paired(n, d, d, d, "none", None, 0.0)
    interval = mean_interval(diffs)
    assert interval is not None
    mean, low, high = interval.mean, interval.low, interval.high
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if binary(a) and binary(b):
        wins = sum(1 for x, y in zip(a, b, strict=True) if x > y)
        losses = sum(1 for x, y in zip(a, b, strict=True) if x < y)
        p = 1.0 if wins + losses == 0 else float(stats.binomtest(wins, wins + losses, 0.5).pvalue)
        return Paired(n, mean, low, high, "mcnemar_exact", p, sd)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1))
    return Paired(n, mean, low, high, "paired_t", p, sd)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p-values given (None stays None)."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(present)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def rows_needed(delta: float, sd: float, *, alpha: float = 1 - CONFIDENCE, power: float = POWER) -> int:
    """Dataset rows a paired comparison needs to detect a mean difference of `delta` (two-sided test
    at `alpha`, with `power`): ((z_{1-alpha/2} + z_power) * sd / delta)^2, rounded up."""
    from scipy import stats  # noqa: PLC0415

    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    return max(2, math.ceil((z * sd / delta) ** 2))


def detectable(rows: int, sd: float, *, alpha: float = 1 - CONFIDENCE, power: float = POWER) -> float:
    """The smallest mean difference `rows` paired rows detect (the inverse of `rows_needed`)."""
    from scipy import stats  # noqa: PLC0415

    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    return z * sd / math.sqrt(max(1, rows))
