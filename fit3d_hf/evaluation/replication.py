"""Verdicts across independent replications: one paired difference per replication, a t interval and two tests.

A replication is a whole run with its own rooms and seeds; its difference between two sources is
the difference of their means within it (over probe seeds, or test rooms for correspondence).
`replicate` turns the n differences of one comparison into their mean, standard error, the 95%
confidence interval of the t distribution with n - 1 degrees of freedom, the two-sided p-value of
the one-sample t-test (mean difference = 0), and the two-sided exact sign test (zeros dropped).
The verdict is "better" / "WORSE" only when the interval excludes 0, so with n = 1 there is none.

The t and binomial distributions are computed here (the regularised incomplete beta function by
its continued fraction, as in Numerical Recipes §6.4) so that the package needs no scipy.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95
ONE_REPLICATION = "one replication: no verdict across rooms and seeds"
NO_EFFECT = "no effect across replications (the 95% CI includes 0)"
TEST = "95% t confidence interval across replications (n - 1 degrees of freedom); two-sided one-sample t-test and exact sign test"


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging for x < (a + 1) / (a + b + 2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return fraction


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_beta needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_sf_two_sided(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom (0.5 < probability < 1), by bisection."""
    if not 0.5 < probability < 1.0:
        raise ValueError(f"t_quantile needs 0.5 < probability < 1, got {probability}")
    target = 2.0 * (1.0 - probability)  # the two-sided tail beyond the quantile
    low, high = 0.0, 1.0
    while t_sf_two_sided(high, df) > target:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_sf_two_sided(middle, df) > target else (low, middle)
    return (low + high) / 2.0


def sign_test(differences: Sequence[float]) -> float:
    """Two-sided exact sign test of median difference = 0: zeros are dropped, p = min(1, 2 P(X <= min(k, n - k)))
    for X ~ Binomial(n, 1/2). Returns 1.0 when no difference is non-zero."""
    positive = sum(d > 0 for d in differences)
    n = positive + sum(d < 0 for d in differences)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(positive, n - positive) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class Replicated:
    """One comparison (a - b, one metric) over n replications.

    Attributes:
        differences: the per-replication differences a - b (each a mean over probe seeds).
        n: number of replications.
        mean: mean of the differences.
        sem: their standard error (sample std / sqrt(n)); None when n = 1.
        ci_low, ci_high: the 95% t confidence interval of the mean; None when n = 1.
        t_p: two-sided p-value of the one-sample t-test of mean = 0; None when n = 1.
        sign_p: two-sided p-value of the exact sign test.
        verdict: "better" / "WORSE" (for a, by the metric's direction) when the interval excludes 0,
            `NO_EFFECT` when it does not, `ONE_REPLICATION` when n = 1.
    """

    differences: tuple[float, ...]
    n: int
    mean: float
    sem: float | None
    ci_low: float | None
    ci_high: float | None
    t_p: float | None
    sign_p: float
    verdict: str

    def to_dict(self) -> dict:
        return {**asdict(self), "differences": list(self.differences)}


def replicate(differences: Sequence[float], higher_is_better: bool = True) -> Replicated:
    """The statistics and the verdict of one comparison from its per-replication differences (module docstring)."""
    differences = tuple(float(d) for d in differences)
    n = len(differences)
    if n == 0:
        raise ValueError("replicate needs at least one difference")
    mean = sum(differences) / n
    sign_p = sign_test(differences)
    if n == 1:
        return Replicated(differences, 1, mean, None, None, None, None, sign_p, ONE_REPLICATION)
    sem = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1) / n)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sem
    if sem == 0.0:
        t_p = 1.0 if mean == 0.0 else 0.0
    else:
        t_p = t_sf_two_sided(mean / sem, n - 1)
    low, high = mean - half, mean + half
    if low <= 0.0 <= high:
        verdict = NO_EFFECT
    else:
        verdict = "better" if (mean > 0) == higher_is_better else "WORSE"
    return Replicated(differences, n, mean, sem, low, high, t_p, sign_p, verdict)
