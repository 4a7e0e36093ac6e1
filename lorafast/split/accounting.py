r"""Privacy accounting for noised smashed data in split learning, via ``dp_accounting``.

A client releases its activations ("smashed data") at the cut layer after
``privatize``: each example's activation is clipped with bound C and gets
N(0, σ²C²) noise per element, σ the noise multiplier. The assumptions:

- **Neighbouring:** add/remove one example (equivalently, replace its
  activation by zero). What is protected is that example's input as seen
  through its smashed data, and nothing else: not its label, not the
  server's outputs or the gradients sent back to the client.
- **The client model** maps each example on its own (no batch statistics
  across examples) and does not itself leak the data: it is frozen, or its
  updates are privatised and accounted separately (then compose the two ε's).
  Client weights trained without noise on the private data make every
  later activation depend on every example, which this bound does not cover.
- **Sensitivity** of one example's release, in units of C, by clipping mode:

  ========= ========================================= ===========================
  mode      clipping                                  L2 sensitivity s
  ========= ========================================= ===========================
  sample    the whole activation to L2 ≤ C            1
  token     each vector along the last dim to ≤ C     √T, T = ∏ sample_shape[:-1]
  element   each element to [−C, C] (DP-CutMixSL)     √D, D = ∏ sample_shape
  ========= ========================================= ===========================

  ``sample_shape`` is one example's shape, without the batch dim.
- **One step** releases each example's smashed data at most once. The Gaussian
  mechanism with noise std σC and sensitivity sC has Rényi DP

      ε(α) = α·s² / (2σ²),

  that of a Gaussian with noise multiplier σ/s. ``sample_rate`` q (optional)
  is the Poisson probability that an example takes part in a step, for
  amplification by subsampling; without it there is none.
- **CutMix** (DP-CutMixSL, arXiv 2210.15986, 2408.01040): when each
  client contributes the fraction λᵢ of the patches, the papers bound the
  smashed part's RDP by ε(α) = (α·max λᵢ / 2)·(Δ²·D_s / σ_s²), the element-mode
  Gaussian RDP times m = max λᵢ. Given ``mixing_ratios`` the factor m is applied
  to every mode, which is the Gaussian with noise multiplier σ/(s·√m). This is
  the papers' bound taken as stated; it assumes that the mixing positions are
  secret from the adversary and independent of the data.

  In "element" mode (and in "token" mode when every patch is whole clipped
  vectors) the same number also follows from sensitivity alone, positions
  public: a client releases nᵢ of P patches, so s² shrinks by nᵢ/P. For that
  reading pass the realised fractions ``[m.float().mean().item() for m in masks]``
  (nᵢ/P, which may exceed λᵢ by up to 1/P after rounding). In "sample" mode a
  clipped activation may hold all its norm in the released patches, so there
  the factor rests on the papers' secrecy assumption alone. ``cutmix`` draws a
  new λ every call; the bound needs one m for all steps, so fix the ratios or
  pass the largest max λᵢ of the run.

T steps compose: ``SelfComposedDpEvent(GaussianDpEvent(σ/(s√m)), T)``, inside
``PoissonSampledDpEvent(q, ·)`` when ``sample_rate`` is given, and
``RdpAccountant`` converts the RDP curve to (ε, δ).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import dp_accounting
from dp_accounting import rdp as dp_rdp

from .._checks import check_choice, check_count, check_delta, check_nonnegative, check_sample_rate, real
from .._layout import PRIVATIZE_MODES as MODES  # privatize's clipping modes
from .cutmix import check_ratios

__all__ = ["epsilon", "rdp"]


def _check_sample_shape(sample_shape) -> tuple[int, ...]:
    ok = isinstance(sample_shape, Sequence) and not isinstance(sample_shape, (str, bytes)) and len(sample_shape) > 0
    ok = ok and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in sample_shape)
    if not ok:
        raise ValueError("sample_shape must be one example's shape without the batch dim, a non-empty sequence "
                         f"of positive ints, got {sample_shape!r}")
    return tuple(int(n) for n in sample_shape)


def _sensitivity_squared(mode: str, sample_shape) -> int:
    """s², one example's squared L2 sensitivity in units of C²."""
    mode = check_choice("mode", mode, MODES)
    if sample_shape is None:
        if mode != "sample":
            raise ValueError(f"sample_shape is required for mode={mode!r}")
        return 1
    shape = _check_sample_shape(sample_shape)
    if mode == "sample":
        return 1
    if mode == "token":
        return math.prod(shape[:-1])  # T vectors, each of norm ≤ C
    return math.prod(shape)  # D elements, each in [−C, C]


def _scale(mode, sample_shape, mixing_ratios) -> float:
    """m·s², the factor on the RDP of a unit-sensitivity Gaussian."""
    s2 = _sensitivity_squared(mode, sample_shape)
    m = 1.0 if mixing_ratios is None else float(check_ratios("mixing_ratios", mixing_ratios).max())
    return m * s2


def rdp(noise_multiplier, order, *, mode: str = "sample", sample_shape=None, mixing_ratios=None) -> float:
    """One step's Rényi DP at order α (no subsampling): α·m·s² / (2σ²).

    s is the sensitivity of ``mode`` and m = max(``mixing_ratios``) (1 without);
    see the module docstring. σ = 0 gives ``inf``.
    """
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    alpha = real("order", order)
    if not (math.isfinite(alpha) and alpha > 1):
        raise ValueError(f"order must be a finite number > 1, got {order!r}")
    scale = _scale(mode, sample_shape, mixing_ratios)
    if sigma == 0:
        return math.inf
    return alpha * scale / (2 * sigma**2)


def epsilon(noise_multiplier, steps, delta, *, mode: str = "sample", sample_shape=None,
            mixing_ratios=None, sample_rate=None) -> float:
    """ε(δ) after ``steps`` releases of noised smashed data (RDP accountant).

    Args:
        noise_multiplier: σ; the noise std is σ·C.
        steps: number of releases T (an int ≥ 1).
        delta: δ in (0, 1).
        mode: the clipping mode, "sample", "token" or "element".
        sample_shape: one example's activation shape (no batch dim), required
            for "token" and "element".
        mixing_ratios: the clients' CutMix patch fractions (summing to 1);
            applies DP-CutMixSL's factor max λᵢ.
        sample_rate: Poisson sampling probability per step, in (0, 1].

    σ = 0 gives ``inf``. Assumptions and formulas: see the module docstring.
    """
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    steps = check_count("steps", steps, 1)
    delta = check_delta("delta", delta)
    scale = _scale(mode, sample_shape, mixing_ratios)
    q = None if sample_rate is None else check_sample_rate("sample_rate", sample_rate)
    if sigma == 0:
        return math.inf  # an unnoised release of a clipped activation
    event = dp_accounting.GaussianDpEvent(sigma / math.sqrt(scale))
    if q is not None:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    acc = dp_rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))
