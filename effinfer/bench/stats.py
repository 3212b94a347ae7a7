"""Uncertainty of measured figures: 95% intervals for means (Student's t), for statistics without a formula
(bootstrap over the observations), for ratios of paired, interleaved measurements, and for proportions.

A speed measured on a shared machine is a sample, not a constant: the record keeps its interval, and the
tables print it (`1.22x [1.15, 1.29]`), so that a difference inside the noise reads as one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student's t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95%); past 30 see `t_quantile`."""


def t_quantile(df: int) -> float:
    """The two-sided 95% critical value of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"an interval needs at least 2 observations (df >= 1), got df={df}")
    if df <= len(T_975):
        return T_975[df - 1]
    return 1.960 + 2.40 / df    # within 0.002 of the exact quantile for df > 30


@dataclass
class Interval:
    value: float
    low: float | None
    high: float | None
    n: int
    std: float | None = None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def relative_half_width(self) -> float | None:
        return None if self.low is None or not self.value else self.half_width / abs(self.value)

    def bounds(self) -> list[float] | None:
        return None if self.low is None else [self.low, self.high]

    def format(self, spec: str = ".4g", suffix: str = "") -> str:
        text = f"{self.value:{spec}}{suffix}"
        return text if self.low is None else f"{text} [{self.low:{spec}}, {self.high:{spec}}]"


def mean_interval(values: Sequence[float]) -> Interval:
    """Mean with a t-interval (no bounds from one observation)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no observations")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, None, None, 1)
    std = float(x.std(ddof=1))
    half = t_quantile(x.size - 1) * std / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size), std)


def bootstrap_interval(values: Sequence[float], statistic: Callable = np.mean, resamples: int = 2000,
                       seed: int = 0) -> Interval:
    """The statistic with a percentile-bootstrap interval over the observations (e.g. a median over requests)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no observations")
    value = float(statistic(x))
    if x.size < 2:
        return Interval(value, None, None, 1)
    rng = np.random.default_rng(seed)
    samples = statistic(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    low, high = np.percentile(samples, [2.5, 97.5])
    return Interval(value, float(low), float(high), int(x.size), float(x.std(ddof=1)))


def ratio_interval(candidate: Sequence[float], baseline: Sequence[float]) -> Interval:
    """The ratio of two paired series (round i of each measured side by side): the geometric mean of the
    per-round ratios, with a t-interval on their logs (the value is that interval's centre). A slow round
    slows both, and pairing removes that from the interval. One round: the plain ratio, no interval."""
    c, b = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if c.shape != b.shape or c.size == 0:
        raise ValueError(f"paired series need the same, non-zero length, got {c.size} and {b.size}")
    if (c <= 0).any() or (b <= 0).any():
        return Interval(float(c.mean() / b.mean()), None, None, int(c.size))
    logs = mean_interval(np.log(c / b))
    if logs.low is None:
        return Interval(math.exp(logs.value), None, None, int(c.size))
    return Interval(math.exp(logs.value), math.exp(logs.low), math.exp(logs.high), int(c.size), logs.std)


def proportion_se(successes: float, n: int) -> float:
    """Standard error of a proportion (an accuracy over n questions)."""
    if n <= 0:
        return 0.0
    p = successes / n
    return math.sqrt(p * (1 - p) / n)
