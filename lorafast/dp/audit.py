"""Empirical privacy auditing: a lower bound on ε from what one training run actually did.

The accountant's ε is an upper bound that holds only if the code is right. The one-run audit
of Steinke, Nasr & Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run")
inserts m canaries, each included independently with probability ½, trains once, guesses
"included" or "excluded" for r of them (abstaining on the rest) and counts the v correct
guesses. Under (ε, δ)-DP the count is stochastically dominated by Binomial(r, q),
q = e^ε/(1+e^ε) (randomised response's accuracy), up to a δ term:

    P[V ≥ v] ≤ P[Binom(r, q) ≥ v] + 2m·δ·max_{1≤i≤v} P[v−i ≤ Binom(r, q) < v] / i

The largest ε at which observing v correct guesses has a p-value below 1 − confidence is
ruled out: ``epsilon_lower_bound`` returns it (0 when none is).
"""
from __future__ import annotations

import math

import torch

_SEARCH_STEPS = 40   # bisection steps over ε; each halves the bracket


def _check_int(name: str, value, lo: int, hi: int, hi_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi_name}={hi}], got {value!r}")
    return value


def _log_binom_pmf(r: int, q_log: float, q_log1m: float) -> torch.Tensor:
    """log P[Binom(r, q) = k] for k = 0..r, in float64 (log q and log(1 − q) given)."""
    k = torch.arange(r + 1, dtype=torch.float64)
    log_choose = math.lgamma(r + 1) - torch.lgamma(k + 1) - torch.lgamma(r - k + 1)
    return log_choose + k * q_log + (r - k) * q_log1m


def p_value(n_canaries: int, n_guesses: int, n_correct: int, epsilon: float, delta: float) -> float:
    """P[at least ``n_correct`` of ``n_guesses`` guesses are right] under (ε, δ)-DP: the bound of
    the module docstring, capped at 1."""
    # q = σ(ε): log q = −softplus(−ε), log(1 − q) = −softplus(ε), stable for any ε ≥ 0
    log_q, log_1mq = -math.log1p(math.exp(-epsilon)), -(epsilon + math.log1p(math.exp(-epsilon)))
    pmf = _log_binom_pmf(n_guesses, log_q, log_1mq).exp()
    v = n_correct
    beta = float(pmf[v:].sum())
    alpha = 0.0
    if delta > 0 and v > 0:
        below = torch.cumsum(pmf[:v].flip(0), 0)            # P[v−i ≤ Binom < v] for i = 1..v
        alpha = float((below / torch.arange(1, v + 1, dtype=torch.float64)).max())
    return min(beta + alpha * delta * 2 * n_canaries, 1.0)


def epsilon_lower_bound(n_canaries: int, n_guesses: int, n_correct: int, delta: float, *,
                        confidence: float = 0.95) -> float:
    """The ε that an audit's guesses rule out at ``confidence``: the largest ε ≥ 0 at which
    ``n_correct`` right out of ``n_guesses`` guesses (on ``n_canaries`` canaries, each included
    with probability ½) has a p-value below 1 − confidence under (ε, δ)-DP (Steinke, Nasr &
    Jagielski 2023). Monotone non-decreasing in ``n_correct``; 0 when the guesses are no
    better than chance at that confidence."""
    m = _check_int("n_canaries", n_canaries, 1, 2**62, "max")
    r = _check_int("n_guesses", n_guesses, 0, m, "n_canaries")
    v = _check_int("n_correct", n_correct, 0, r, "n_guesses")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    level = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0    # p_value(lo) < level ≤ p_value(hi): the p-value grows with ε
    while p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, 2 * hi
        if hi > 1e4:     # the p-value tends to 1 as ε grows: only rounding could keep it below
            return lo
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo
