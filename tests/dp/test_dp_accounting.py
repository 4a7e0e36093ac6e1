"""Privacy accounting: regression values, monotonicity, calibration round trips, validation."""
import math

import pytest

from lorafast.dp.accountant import Accountant, compute_epsilon, get_noise_multiplier

DELTA = 1e-5

# (σ, q, steps) → PLD ε at δ=1e-5, to 2 decimals (a 1e-5 grid gives 3.1923 and 6.7688; see test_dp_accountant_grid).
REGRESSION_ROWS = [((1.0, 0.01, 3000), 3.19), ((1.5, 0.04, 2250), 6.77)]


@pytest.mark.parametrize("row, expected", REGRESSION_ROWS)
def test_pld_regression_rows(row, expected):
    eps = compute_epsilon(*row, DELTA)
    assert round(eps, 2) == expected, eps
    assert compute_epsilon(*row, DELTA, accountant="pld") == eps


@pytest.mark.parametrize("row, _", REGRESSION_ROWS)
def test_rdp_is_looser_than_pld(row, _):
    pld_eps = compute_epsilon(*row, DELTA, "pld")
    rdp_eps = compute_epsilon(*row, DELTA, "rdp")
    assert rdp_eps >= pld_eps
    assert rdp_eps < 1.5 * pld_eps  # looser, but the same mechanism


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_monotone(accountant):
    by_sigma = [compute_epsilon(s, 0.01, 1000, DELTA, accountant) for s in (0.8, 1.0, 1.5, 3.0)]
    by_steps = [compute_epsilon(1.0, 0.01, n, DELTA, accountant) for n in (10, 300, 3000)]
    by_rate = [compute_epsilon(1.0, q, 1000, DELTA, accountant) for q in (0.002, 0.01, 0.05)]
    by_delta = [compute_epsilon(1.0, 0.01, 1000, d, accountant) for d in (1e-8, 1e-5, 1e-2)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:])), by_sigma
    assert all(a < b for a, b in zip(by_steps, by_steps[1:])), by_steps
    assert all(a < b for a, b in zip(by_rate, by_rate[1:])), by_rate
    assert all(a > b for a, b in zip(by_delta, by_delta[1:])), by_delta
    assert all(e > 0 and math.isfinite(e) for e in by_sigma + by_steps + by_rate + by_delta)


def test_edge_values():
    assert compute_epsilon(0.0, 0.01, 10, DELTA) == math.inf
    assert compute_epsilon(0.0, 0.01, 10, DELTA, "rdp") == math.inf
    assert compute_epsilon(1.0, 0.01, 0, DELTA) == 0.0
    assert compute_epsilon(0.0, 0.01, 0, DELTA) == 0.0
    # no subsampling: q = 1 is the plain Gaussian mechanism, much costlier than q = 0.01
    assert compute_epsilon(5.0, 1.0, 10, DELTA) > compute_epsilon(5.0, 0.01, 10, DELTA)


def test_small_noise_is_finite_and_ordered():
    # the PLD grid widens with 1/σ², so small σ stays fast and finite, and PLD stays tighter than RDP;
    # below σ=1e-3 the (larger) RDP bound takes over, so ε keeps falling with σ
    eps = [compute_epsilon(s, 0.01, 1000, DELTA) for s in (1e-7, 9e-4, 1.1e-3, 0.01, 0.05, 0.3)]
    assert all(math.isfinite(e) for e in eps)
    assert all(a > b for a, b in zip(eps, eps[1:])), eps
    assert eps[4] <= compute_epsilon(0.05, 0.01, 1000, DELTA, "rdp")


@pytest.mark.parametrize("target, q, steps, accountant", [
    (3.0, 0.01, 3000, "pld"),
    (0.5, 0.1, 100, "pld"),
    (1000.0, 0.01, 100, "pld"),  # σ < 1: the bracket is searched downwards
    (2.0, 0.04, 500, "rdp"),
])
def test_noise_multiplier_round_trip(target, q, steps, accountant):
    sigma = get_noise_multiplier(target, DELTA, q, steps, accountant)
    eps = compute_epsilon(sigma, q, steps, DELTA, accountant)
    assert eps <= target
    assert target - eps <= 0.01 * 1.0001  # the default epsilon_tolerance
    assert compute_epsilon(0.995 * sigma, q, steps, DELTA, accountant) > target


def test_noise_multiplier_inverts_compute_epsilon():
    eps = compute_epsilon(1.0, 0.01, 3000, DELTA)
    sigma = get_noise_multiplier(eps, DELTA, 0.01, 3000)
    assert sigma <= 1.0 + 1e-9
    assert sigma == pytest.approx(1.0, abs=2e-3)


def test_noise_multiplier_tolerance():
    sigma = get_noise_multiplier(3.0, DELTA, 0.01, 3000, epsilon_tolerance=1e-4)
    eps = compute_epsilon(sigma, 0.01, 3000, DELTA)
    assert 3.0 - 1e-4 <= eps <= 3.0
    assert get_noise_multiplier(3.0, DELTA, 0.01, 0) == 0.0


_GOOD = dict(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=DELTA)
_GOOD_CAL = dict(target_epsilon=2.0, target_delta=DELTA, sample_rate=0.01, steps=100)


@pytest.mark.parametrize("name, bad", [
    ("noise_multiplier", -0.1), ("noise_multiplier", math.nan), ("noise_multiplier", math.inf),
    ("noise_multiplier", "1.0"), ("noise_multiplier", None),
    ("sample_rate", 0.0), ("sample_rate", -0.5), ("sample_rate", 1.01), ("sample_rate", math.nan),
    ("steps", -1), ("steps", 10.0), ("steps", True), ("steps", "10"),
    ("delta", 0.0), ("delta", 1.0), ("delta", -1e-5), ("delta", math.nan),
    ("accountant", "gdp"), ("accountant", None),
])
def test_compute_epsilon_rejects(name, bad):
    with pytest.raises(ValueError, match=name):
        compute_epsilon(**{**_GOOD, name: bad})


@pytest.mark.parametrize("name, bad", [
    ("target_epsilon", 0.0), ("target_epsilon", -1.0), ("target_epsilon", math.inf), ("target_epsilon", math.nan),
    ("target_delta", 0.0), ("target_delta", 1.0), ("target_delta", 2.0),
    ("sample_rate", 0.0), ("sample_rate", 2.0),
    ("steps", -5), ("steps", 2.5),
    ("accountant", "prv"),
    ("epsilon_tolerance", 0.0), ("epsilon_tolerance", -0.1),
])
def test_get_noise_multiplier_rejects(name, bad):
    with pytest.raises(ValueError, match=name):
        get_noise_multiplier(**{**_GOOD_CAL, name: bad})


def test_accountant_merges_history():
    acc = Accountant()
    assert acc.mechanism == "pld" and acc.steps == 0 and acc.history == []
    assert acc.get_epsilon(DELTA) == 0.0
    for _ in range(3):
        acc.step(1.0, 0.01)
    acc.step(1.0, 0.01, n=2)
    acc.step(1.2, 0.01)
    acc.step(1.2, 0.02)
    acc.step(1.0, 0.01, n=0)  # no-op
    acc.step(1.0, 0.01)
    assert acc.history == [[1.0, 0.01, 5], [1.2, 0.01, 1], [1.2, 0.02, 1], [1.0, 0.01, 1]]
    assert acc.steps == 8
    acc.history[0][2] = 99  # a copy
    acc.history.clear()
    assert acc.steps == 8


@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_accountant_single_segment_matches_compute_epsilon(mechanism):
    acc = Accountant(mechanism)
    acc.step(1.5, 0.04, n=1000)
    acc.step(1.5, 0.04, n=1250)
    assert acc.get_epsilon(DELTA) == compute_epsilon(1.5, 0.04, 2250, DELTA, mechanism)


def test_accountant_composes_segments():
    acc = Accountant()
    acc.step(1.0, 0.01, n=1000)
    acc.step(2.0, 0.01, n=1000)
    eps = acc.get_epsilon(DELTA)
    # more noise in the second half: between the first half alone and all of it at σ=1
    assert compute_epsilon(1.0, 0.01, 1000, DELTA) < eps < compute_epsilon(1.0, 0.01, 2000, DELTA)
    acc.step(0.0, 0.01)
    assert acc.get_epsilon(DELTA) == math.inf


def test_accountant_state_dict_round_trip():
    acc = Accountant("rdp")
    acc.step(1.0, 0.01, n=50)
    acc.step(1.3, 0.02, n=7)
    state = acc.state_dict()
    restored = Accountant()
    restored.load_state_dict(state)
    assert restored.mechanism == "rdp"
    assert restored.history == acc.history and restored.steps == 57
    assert restored.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    state["history"][0][2] = 1  # the state is a copy
    assert acc.steps == 57
    # continuing after a restore merges into the last segment
    restored.step(1.3, 0.02)
    assert restored.history[-1] == [1.3, 0.02, 8]


def test_accountant_rejects_bad_input_and_keeps_state():
    with pytest.raises(ValueError, match="mechanism"):
        Accountant("gdp")
    acc = Accountant()
    acc.step(1.0, 0.01, n=3)
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.step(-1.0, 0.01)
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(1.0, 0.0)
    with pytest.raises(ValueError, match="n must"):
        acc.step(1.0, 0.01, n=-1)
    with pytest.raises(ValueError, match="delta"):
        acc.get_epsilon(0.0)
    for bad in ({"history": [[1.0, 0.01, 5], [1.0, 2.0, 1]]}, {"history": [[1.0, 0.01]]},
                {"mechanism": "gdp", "history": []}, [[1.0, 0.01, 1]]):
        with pytest.raises(ValueError, match="state_dict"):
            acc.load_state_dict(bad)
    assert acc.history == [[1.0, 0.01, 3]] and acc.mechanism == "pld"
