import math

import pytest

from fit3d_hf.evaluation.replication import (
    NO_EFFECT,
    ONE_REPLICATION,
    regularized_beta,
    replicate,
    sign_test,
    t_quantile,
    t_sf_two_sided,
)


def test_t_quantiles_match_the_textbook_table():
    # Student's t table, two-sided 95%: df 1, 2, 4, 9, 30.
    for df, value in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.995, 9) == pytest.approx(3.2498, abs=1e-4)


def test_t_tail_and_incomplete_beta_known_values():
    # df = 1 is the Cauchy distribution: P(|T| >= 1) = 1/2; df = 2 has P(|T| >= t) = 1 - t / sqrt(2 + t^2).
    assert t_sf_two_sided(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    assert t_sf_two_sided(3.0, 2) == pytest.approx(1 - 3 / math.sqrt(11), abs=1e-12)
    assert t_sf_two_sided(0.0, 5) == pytest.approx(1.0)
    # I_x(1, b) = 1 - (1 - x)^b and I_x(a, 1) = x^a.
    assert regularized_beta(1.0, 3.0, 0.3) == pytest.approx(1 - 0.7**3, abs=1e-12)
    assert regularized_beta(2.5, 1.0, 0.8) == pytest.approx(0.8**2.5, abs=1e-12)
    with pytest.raises(ValueError, match="0 <= x <= 1"):
        regularized_beta(1.0, 1.0, 1.5)


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test([1.0] * 10) == pytest.approx(2 / 1024)
    assert sign_test([1.0] * 9 + [-1.0]) == pytest.approx(2 * 11 / 1024)
    assert sign_test([1.0, -1.0]) == 1.0
    # zeros are dropped: 3 positives of 3
    assert sign_test([0.0, 2.0, 3.0, 4.0]) == pytest.approx(0.25)
    assert sign_test([0.0]) == 1.0


def test_replicate_gives_the_t_interval_the_tests_and_the_verdict():
    up = replicate([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), sem sqrt(0.5); t = 4.2426 with 4 df: two-sided p = 0.01324.
    assert (up.n, up.mean, up.sem) == (5, 3.0, pytest.approx(math.sqrt(0.5)))
    assert (up.ci_low, up.ci_high) == (pytest.approx(3 - 2.776445 * math.sqrt(0.5), abs=1e-5), pytest.approx(4.963243, abs=1e-5))
    assert up.t_p == pytest.approx(0.013236, abs=1e-5) and up.sign_p == pytest.approx(0.0625)
    assert up.verdict == "better"
    # Lower is better (depth RMSE): a positive difference is worse.
    assert replicate([1.0, 2.0, 3.0, 4.0, 5.0], higher_is_better=False).verdict == "WORSE"
    # The interval includes 0: no verdict, even though most differences are positive.
    mixed = replicate([0.02, 0.01, -0.03, 0.015])
    assert mixed.ci_low < 0 < mixed.ci_high and mixed.verdict == NO_EFFECT
    one = replicate([0.5])
    assert one.verdict == ONE_REPLICATION and one.ci_low is None and one.t_p is None and one.sign_p == 1.0
    assert replicate([0.25, 0.25]).t_p == 0.0 and replicate([0.25, 0.25]).to_dict()["differences"] == [0.25, 0.25]
    with pytest.raises(ValueError, match="at least one difference"):
        replicate([])
