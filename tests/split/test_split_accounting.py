"""Split-learning accounting: the RDP closed form, ε against independent RDP→(ε, δ) conversions,
the sensitivity of each clipping mode, CutMix's factor, subsampling, monotonicity, validation."""
import math

import numpy as np
import pytest
import torch
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant

from lorafast.dp.accountant import compute_epsilon
from lorafast.split.accounting import epsilon, rdp

DELTA = 1e-5


def classic_epsilon(sigma, steps, delta):
    """Mironov's conversion of T composed Gaussians, RDP(α) = T·α/(2σ²), minimised over α on a fine grid."""
    a = np.geomspace(1.0001, 5000, 400_000)
    return float((steps * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)).min())


def improved_epsilon(sigma, steps, delta):
    """The conversion of Canonne, Kamath & Steinke (2020), minimised over α on a fine grid."""
    a = np.geomspace(1.0001, 5000, 400_000)
    return float((steps * a / (2 * sigma**2) + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)).min())


def test_rdp_closed_form():
    sigma, alpha = 1.7, 6.5
    assert rdp(sigma, alpha) == pytest.approx(alpha / (2 * sigma**2), rel=1e-14)
    assert rdp(sigma, alpha, mode="sample", sample_shape=(7, 3)) == pytest.approx(alpha / (2 * sigma**2), rel=1e-14)
    assert rdp(sigma, alpha, mode="token", sample_shape=(7, 3)) == pytest.approx(7 * alpha / (2 * sigma**2), rel=1e-14)
    assert rdp(sigma, alpha, mode="token", sample_shape=(2, 7, 3)) == pytest.approx(14 * alpha / (2 * sigma**2))
    assert rdp(sigma, alpha, mode="token", sample_shape=(3,)) == pytest.approx(alpha / (2 * sigma**2))
    assert rdp(sigma, alpha, mode="element", sample_shape=(7, 3)) == pytest.approx(21 * alpha / (2 * sigma**2))
    lam = [0.2, 0.45, 0.35]
    assert rdp(sigma, alpha, mixing_ratios=lam) == pytest.approx(0.45 * alpha / (2 * sigma**2), rel=1e-14)
    assert rdp(sigma, alpha, mode="element", sample_shape=(13, 4), mixing_ratios=torch.tensor(lam)) == \
        pytest.approx(0.45 * 52 * alpha / (2 * sigma**2))
    assert rdp(0.0, alpha) == math.inf


@pytest.mark.parametrize("sigma, steps, delta", [(1.0, 10, 1e-5), (2.0, 100, 1e-5), (5.0, 1000, 1e-6),
                                                 (0.8, 50, 1e-5), (3.0, 1, 1e-5), (20.0, 3, 1e-5)])
def test_sample_mode_against_independent_conversions(sigma, steps, delta):
    eps = epsilon(sigma, steps, delta)
    acc = RdpAccountant()
    acc.compose(SelfComposedDpEvent(GaussianDpEvent(sigma), steps))
    assert eps == acc.get_epsilon(delta)
    # dp-accounting converts with the sharper bound of Canonne et al. on a grid of orders: never below the
    # grid-free optimum of that bound, never above the classic conversion, and close to both
    classic, improved = classic_epsilon(sigma, steps, delta), improved_epsilon(sigma, steps, delta)
    assert improved * (1 - 1e-9) <= eps <= improved * 1.01
    assert eps <= classic
    if classic > 10:  # where log(1/δ)/(α−1) dominates, the two conversions are within a few %
        assert eps >= 0.9 * classic


@pytest.mark.parametrize("steps", [1, 37])
@pytest.mark.parametrize("q", [None, 0.03])
def test_token_and_element_modes_scale_the_noise(steps, q):
    sigma, T, d = 3.0, 13, 7
    token = epsilon(sigma, steps, DELTA, mode="token", sample_shape=(T, d), sample_rate=q)
    element = epsilon(sigma, steps, DELTA, mode="element", sample_shape=(T, d), sample_rate=q)
    assert token == pytest.approx(epsilon(sigma / math.sqrt(T), steps, DELTA, sample_rate=q), rel=1e-12)
    assert element == pytest.approx(epsilon(sigma / math.sqrt(T * d), steps, DELTA, sample_rate=q), rel=1e-12)
    assert epsilon(sigma, steps, DELTA, sample_rate=q) < token < element
    # token mode counts every vector of a multi-dim sample
    assert epsilon(sigma, steps, DELTA, mode="token", sample_shape=(2, 5, d), sample_rate=q) == \
        pytest.approx(epsilon(sigma / math.sqrt(10), steps, DELTA, sample_rate=q), rel=1e-12)
    # sample mode does not depend on the shape
    assert epsilon(sigma, steps, DELTA, sample_shape=(T, d), sample_rate=q) == epsilon(sigma, steps, DELTA,
                                                                                      sample_rate=q)


@pytest.mark.parametrize("mode, shape, s2", [("sample", None, 1), ("token", (13, 4), 13), ("element", (3, 5), 15)])
def test_mixing_ratios_amplify(mode, shape, s2):
    sigma, steps, lam = 4.0, 25, [0.15, 0.6, 0.25]
    mixed = epsilon(sigma, steps, DELTA, mode=mode, sample_shape=shape, mixing_ratios=lam)
    assert mixed == pytest.approx(epsilon(sigma / math.sqrt(s2 * 0.6), steps, DELTA), rel=1e-12)
    assert mixed < epsilon(sigma, steps, DELTA, mode=mode, sample_shape=shape)
    assert epsilon(sigma, steps, DELTA, mode=mode, sample_shape=shape, mixing_ratios=[1.0]) == \
        epsilon(sigma, steps, DELTA, mode=mode, sample_shape=shape)
    # more even mixing, more amplification
    assert epsilon(sigma, steps, DELTA, mode=mode, sample_shape=shape, mixing_ratios=[1 / 3] * 3) < mixed


def test_monotone_in_steps_and_sigma():
    by_steps = [epsilon(2.0, n, DELTA) for n in (1, 10, 100, 1000)]
    by_sigma = [epsilon(s, 100, DELTA, mode="element", sample_shape=(4, 4)) for s in (2.0, 4.0, 8.0, 16.0)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:])), by_steps
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:])), by_sigma
    assert all(0 < e < math.inf for e in by_steps + by_sigma)


def test_subsampling():
    sigma, steps = 1.2, 500
    full = epsilon(sigma, steps, DELTA)
    by_rate = [epsilon(sigma, steps, DELTA, sample_rate=q) for q in (0.001, 0.01, 0.1, 1.0)]
    assert all(a < b for a, b in zip(by_rate, by_rate[1:])), by_rate
    assert by_rate[-1] == pytest.approx(full, rel=1e-9)  # q = 1 is no subsampling
    # the same mechanism as DP-SGD's Poisson-subsampled Gaussian
    assert by_rate[1] == pytest.approx(compute_epsilon(sigma, 0.01, steps, DELTA, accountant="rdp"), rel=1e-12)


def test_zero_noise_is_infinite():
    assert epsilon(0.0, 1, DELTA) == math.inf
    assert epsilon(0, 10, DELTA, mode="element", sample_shape=(3,), mixing_ratios=[0.5, 0.5], sample_rate=0.1) \
        == math.inf


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=math.inf), "noise_multiplier"),
    (dict(noise_multiplier=math.nan), "noise_multiplier"),
    (dict(noise_multiplier="1"), "noise_multiplier"),
    (dict(steps=0), "steps"),
    (dict(steps=-3), "steps"),
    (dict(steps=2.0), "steps"),
    (dict(steps=True), "steps"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(delta=-1e-5), "delta"),
    (dict(mode="tokens"), "mode"),
    (dict(mode=None), "mode"),
    (dict(mode="token"), "sample_shape"),
    (dict(mode="element"), "sample_shape"),
    (dict(mode="element", sample_shape=()), "sample_shape"),
    (dict(mode="element", sample_shape=(3, 0)), "sample_shape"),
    (dict(mode="token", sample_shape=(3, -2)), "sample_shape"),
    (dict(mode="token", sample_shape=(3.0, 2)), "sample_shape"),
    (dict(mode="token", sample_shape="ab"), "sample_shape"),
    (dict(mode="token", sample_shape=7), "sample_shape"),
    (dict(sample_shape=(3, 0)), "sample_shape"),
    (dict(mixing_ratios=[]), "mixing_ratios"),
    (dict(mixing_ratios=[0.5, 0.4]), "mixing_ratios"),
    (dict(mixing_ratios=[1.2, -0.2]), "mixing_ratios"),
    (dict(mixing_ratios=[math.nan, 1.0]), "mixing_ratios"),
    (dict(mixing_ratios=0.5), "mixing_ratios"),
    (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=1.5), "sample_rate"),
    (dict(sample_rate=-0.1), "sample_rate"),
])
def test_epsilon_rejects_bad_input(kwargs, match):
    args = dict(noise_multiplier=1.0, steps=10, delta=DELTA)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        epsilon(args.pop("noise_multiplier"), args.pop("steps"), args.pop("delta"), **args)


@pytest.mark.parametrize("args, kwargs, match", [
    ((-1.0, 2.0), {}, "noise_multiplier"),
    ((1.0, 1.0), {}, "order"),
    ((1.0, 0.5), {}, "order"),
    ((1.0, math.inf), {}, "order"),
    ((1.0, "2"), {}, "order"),
    ((1.0, 2.0), {"mode": "row"}, "mode"),
    ((1.0, 2.0), {"mode": "element"}, "sample_shape"),
    ((1.0, 2.0), {"mixing_ratios": [0.3, 0.3]}, "mixing_ratios"),
    ((0.0, 2.0), {"mixing_ratios": [0.3, 0.3]}, "mixing_ratios"),  # validated even when σ = 0
])
def test_rdp_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rdp(*args, **kwargs)
