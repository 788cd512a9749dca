"""Statistics across cycles: mean, sample std and a Student-t 95% confidence interval.

Pure Python (no numpy, no scipy): the adaptive repetition decides with it while a
study runs, and `results --stats` and `load_results(stats=True)` report with it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Describe", "describe", "t_cdf", "t_quantile"]

#: Continued-fraction terms for the incomplete beta (it converges in far fewer).
_MAX_TERMS = 300
_EPS = 1e-15
_TINY = 1e-300


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The fraction converges fast only on this side of the mean; else use symmetry.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The t such that P(T <= t) = p, for Student's t with `df` degrees of freedom.

    Inverts the exact CDF by bisection on x = df / (df + t^2), where the upper tail
    is I_x(df/2, 1/2) / 2 and monotonic: accurate to about 1e-12 relative.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    tail = min(p, 1.0 - p)
    low, high = 0.0, 1.0  # I_x grows with x: x=0 -> tail 0, x=1 -> tail 1/2
    # Halving from 1 reaches any double x > 1e-300 and then 50 more steps fix its digits.
    for _ in range(1100):
        mid = (low + high) / 2.0
        if 0.5 * _regularized_beta(mid, df / 2.0, 0.5) < tail:
            low = mid
        else:
            high = mid
        if high - low <= 1e-15 * high:
            break
    x = (low + high) / 2.0
    t = math.sqrt(df * (1.0 - x) / x)
    return t if p > 0.5 else -t


@dataclass(frozen=True, slots=True)
class Describe:
    """n, mean, sample std (ddof=1) and the 95% CI half-width of some numbers.

    `std` and `ci95` are None with fewer than two numbers (no spread to measure).
    """

    n: int
    mean: float | None
    std: float | None
    ci95: float | None

    def within(self, rel_ci95: float) -> bool:
        """Whether the CI half-width is at most `rel_ci95` of |mean| (False if unknown)."""
        if self.ci95 is None or self.mean is None:
            return False
        return self.ci95 <= rel_ci95 * abs(self.mean)

    @property
    def rel_ci95(self) -> float | None:
        """ci95 / |mean| (inf for a zero mean with spread; None if unknown)."""
        if self.ci95 is None or self.mean is None:
            return None
        if self.mean == 0:
            return 0.0 if self.ci95 == 0 else math.inf
        return self.ci95 / abs(self.mean)


def describe(values: Iterable[float]) -> Describe:
    """The `Describe` of finite numbers (NaN and inf are left out)."""
    numbers = [float(v) for v in values if math.isfinite(v)]
    n = len(numbers)
    if n == 0:
        return Describe(0, None, None, None)
    mean = math.fsum(numbers) / n
    if n == 1:
        return Describe(1, mean, None, None)
    variance = math.fsum((v - mean) ** 2 for v in numbers) / (n - 1)
    std = math.sqrt(variance)
    return Describe(n, mean, std, t_quantile(0.975, n - 1) * std / math.sqrt(n))
