"""lorafast.dp.audit.epsilon_lower_bound: the one-run audit's conversion of guess counts into
an ε lower bound (Steinke, Nasr & Jagielski 2023), against scipy's binomial."""
import math
import random

import pytest

from lorafast.dp.audit import epsilon_lower_bound, p_value

stats = pytest.importorskip("scipy.stats")


def scipy_p_value(m, r, v, eps, delta):
    """The paper's p-value, written with scipy's binomial."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, below / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def test_p_value_matches_scipy():
    rng = random.Random()
    for _ in range(40):
        m = rng.randint(1, 2000)
        r = rng.randint(1, m)
        v = rng.randint(0, r)
        eps, delta = rng.uniform(0, 8), rng.choice([0.0, 1e-5, 1e-3])
        assert p_value(m, r, v, eps, delta) == pytest.approx(scipy_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_bound_is_where_the_p_value_crosses_the_level(delta):
    for m, r, v in [(1000, 100, 90), (1000, 1000, 1000), (500, 50, 40), (10000, 200, 160)]:
        eps = epsilon_lower_bound(m, r, v, delta, confidence=0.95)
        assert eps > 0
        assert scipy_p_value(m, r, v, eps, delta) < 0.05 <= scipy_p_value(m, r, v, eps * (1 + 1e-6) + 1e-9, delta)


def test_all_guesses_right_gives_the_closed_form():
    """δ = 0 and every guess right: q^r = 1 − confidence, so ε = log(q / (1 − q))."""
    r = 1000
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-8)


def test_monotone_in_correct_guesses_and_zero_at_chance():
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(0, 201, 10)]
    assert bounds == sorted(bounds)
    assert bounds[0] == 0.0 and bounds[10] == 0.0      # 100 of 200: no better than a coin
    assert bounds[-1] > bounds[-5] > 0.0
    # a stricter confidence rules out less, a larger δ too
    assert epsilon_lower_bound(1000, 200, 180, 1e-5, confidence=0.99) < epsilon_lower_bound(1000, 200, 180, 1e-5)
    assert epsilon_lower_bound(1000, 200, 180, 1e-3) < epsilon_lower_bound(1000, 200, 180, 0.0)


@pytest.mark.parametrize("args, kw, name", [
    ((0, 0, 0, 0.0), {}, "n_canaries"), ((10, 11, 0, 0.0), {}, "n_guesses"), ((10, 5, 6, 0.0), {}, "n_correct"),
    ((10, 5, 2.5, 0.0), {}, "n_correct"), ((10, 5, 3, -0.1), {}, "delta"), ((10, 5, 3, 1e-5), {"confidence": 1.0},
                                                                            "confidence"),
    ((10, True, 0, 0.0), {}, "n_guesses"),
])
def test_bad_input_names_the_argument(args, kw, name):
    with pytest.raises(ValueError, match=name):
        epsilon_lower_bound(*args, **kw)
