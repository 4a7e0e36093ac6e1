"""The PLD accountant's grid: ε within 0.2 % above a much finer dp-accounting grid, never below.

Pessimistic PLD rounding makes every grid an upper bound, and a finer grid a tighter one, so
the accountant's ε must lie in [ε_fine, 1.002·ε_fine]. The references are computed here with
dp-accounting itself. For σ=1.869 the reference grid is 1e-5, over 10× finer than the
accountant's; for the two regression rows it is 5e-5, 13× and 20× finer (a 1e-5 grid takes
~10 s there). The excess of a grid grows as its step squared, so these references sit within
1/150 of the accountant's excess from the fine limit: the 0.2 % bound holds against it too.
"""
import math

import dp_accounting
import pytest
from dp_accounting import pld

from lorafast.dp import accountant
from lorafast.dp.accountant import Accountant, compute_epsilon

ROWS = [  # (σ, q, steps, δ, reference grid step)
    (1.0, 0.01, 3000, 1e-5, 5e-5),
    (1.5, 0.04, 2250, 1e-5, 5e-5),
    (1.869, 0.004, 10_000, 1e-6, 1e-5),   # the fixed 1e-3 grid gave 0.99976 here, +1.6 %
]


def _reference(sigma, q, steps, delta, interval):
    acc = pld.PLDAccountant(value_discretization_interval=interval)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, steps, delta, interval", ROWS)
def test_pld_epsilon_is_within_0_2_percent_above_a_fine_grid(sigma, q, steps, delta, interval):
    eps = compute_epsilon(sigma, q, steps, delta)
    fine = _reference(sigma, q, steps, delta, interval)
    assert fine <= eps <= 1.002 * fine, (eps, fine)
    # the ledger uses the same grid
    acc = Accountant()
    acc.step(sigma, q, n=steps)
    assert acc.get_epsilon(delta) == eps


@pytest.mark.parametrize("sigma, q", [(1.0, 0.01), (1.5, 0.04), (1.869, 0.004), (3.0, 1e-3), (10.0, 1e-5),
                                      (0.7, 1e-4), (0.5, 0.1), (1.0, 1.0), (0.05, 0.01), (1.1e-3, 0.5)])
def test_grid_step_is_bounded(sigma, q):
    step = accountant._pld_interval([(sigma, q, 100)])
    coarsest = min(accountant._PLD_INTERVAL * max(1.0, sigma**-2), 500.0)
    assert accountant._PLD_MIN_INTERVAL <= step <= coarsest
    # never coarser than a twentieth of one step's loss spread, unless that would need more
    # than _PLD_MAX_POINTS grid points per step
    spread_step = accountant._loss_spread(sigma, q) / accountant._PLD_STEPS_PER_SPREAD
    if step > spread_step * (1 + 1e-12):
        assert step == coarsest or step == accountant._PLD_MIN_INTERVAL or math.isclose(
            step, accountant._loss_range(sigma, q) / accountant._PLD_MAX_POINTS)
    else:
        assert accountant._loss_range(sigma, q) / step <= accountant._PLD_MAX_POINTS * (1 + 1e-9)


def test_grid_step_of_segments_is_the_finest_needed():
    rows = [(1.869, 0.004, 10), (3.0, 0.01, 10)]
    assert accountant._pld_interval(rows) == min(accountant._pld_interval([r]) for r in rows)
    # ... unless another segment would then need more than _PLD_MAX_POINTS points a step
    rows = [(1.0, 0.01, 10), (3.0, 0.004, 10)]
    step = accountant._pld_interval(rows)
    assert step > min(accountant._pld_interval([r]) for r in rows)
    assert max(accountant._loss_range(s, q) for s, q, _ in rows) / step == pytest.approx(accountant._PLD_MAX_POINTS)


def test_large_noise_small_rate_is_not_inflated():
    # σ=5, q=1e-3: one step's loss spans ~0.007, within a few cells of the old 1e-3 grid, which
    # reported ε over twice the fine-grid value
    eps = compute_epsilon(5.0, 1e-3, 1000, 1e-5)
    fine = _reference(5.0, 1e-3, 1000, 1e-5, accountant._pld_interval([(5.0, 1e-3, 1000)]) / 5)
    assert fine <= eps <= 1.002 * fine, (eps, fine)
