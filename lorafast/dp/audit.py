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

Two ways to run one:

* ``PrivacyAudit(engine, canaries=m)`` (white box, automatic): gradient canaries. Each canary
  is a vector in the trainable parameters' space on the clipping sphere (a "Dirac" canary,
  ±C on one coordinate, or a random direction of norm C). An included canary joins every
  step's batch with the data's Poisson rate q, as one more sample, through the same fused
  clip-sum-noise kernel; its score is its inner product with the sum of the released noisy
  gradients, which is all that DP-SGD releases. The accountant's ε covers the run: the
  canaries are records of the dataset like any other.
* ``canary_membership`` + ``audit_scores`` (input canaries, any model): include the canary
  examples that ``canary_membership`` picks in the training data, train, score every canary
  (e.g. its loss before minus after training) and pass the scores.

The guesses: "included" for the k₊ highest scores, "excluded" for the k₋ lowest. With
``guesses=None`` the report takes the best of a fixed grid of (k₊, k₋), each bound computed at
a Bonferroni-corrected confidence, so that the maximum is still valid at ``confidence``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _ops
from .._checks import check_choice, check_count, check_delta, check_positive, check_seed
from .._random import os_seed

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
    level = 1.0 - _check_confidence(confidence)
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


# ------------------------------------------------------------------ the report

CANARIES = ("dirac", "gaussian")
_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)    # k₊ as fractions of m for guesses=None


def min_canaries(confidence: float = 0.95) -> int:
    """The fewest canaries with which any ε > 0 can be ruled out at ``confidence``: all m guesses
    right has probability 2⁻ᵐ under ε = 0, so 2⁻ᵐ < 1 − confidence."""
    confidence = _check_confidence(confidence)
    return math.floor(math.log2(1.0 / (1.0 - confidence))) + 1


def _check_confidence(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def _check_canaries(m, confidence: float) -> int:
    m = check_count("canaries", m, 1)
    need = min_canaries(confidence)
    if m < need:
        raise ValueError(f"canaries={m} is too few for confidence={confidence}: even {m} right guesses out of {m} "
                         f"(probability 2^-{m} under ε = 0) cannot rule out ε = 0; use at least {need}, and in "
                         "practice hundreds (the bound grows like log of the number of right guesses)")
    return m


@dataclass
class AuditReport:
    """What an audit measured. ``epsilon_lower_bound`` is ruled out at ``confidence``; ``epsilon``
    is the accountant's claim (None when not known). An honest mechanism keeps
    ``epsilon_lower_bound ≤ epsilon`` (with probability ≥ confidence); ``max_lower_bound`` is
    the most this audit could have shown (every guess right), its power ceiling."""
    epsilon_lower_bound: float
    epsilon: Optional[float]
    delta: float
    confidence: float
    canaries: int
    included: int
    guesses_included: int       # k₊: "included" guesses, the highest scores
    guesses_excluded: int       # k₋: "excluded" guesses, the lowest scores
    correct: int
    max_lower_bound: float
    hypotheses: int = 1         # (k₊, k₋) choices tried (Bonferroni), 1 when given
    steps: Optional[int] = None
    canary: Optional[str] = None
    scores: Optional[Tensor] = field(default=None, repr=False)
    membership: Optional[Tensor] = field(default=None, repr=False)

    @property
    def guesses(self) -> int:
        return self.guesses_included + self.guesses_excluded

    @property
    def consistent(self) -> bool:
        """The measured lower bound does not exceed the accountant's ε (True when ε is unknown)."""
        return self.epsilon is None or self.epsilon_lower_bound <= self.epsilon

    def __str__(self) -> str:
        claim = "unknown" if self.epsilon is None else f"{self.epsilon:.4g}"
        verdict = "consistent with" if self.consistent else "VIOLATES"
        return (f"privacy audit ({self.canary or 'input'} canaries: {self.canaries}, {self.included} included"
                + (f", {self.steps} steps" if self.steps is not None else "") + ")\n"
                f"  guesses: {self.guesses_included} included + {self.guesses_excluded} excluded, "
                f"{self.correct}/{self.guesses} right\n"
                f"  ε lower bound {self.epsilon_lower_bound:.4g} at {self.confidence:.0%} confidence "
                f"(at most {self.max_lower_bound:.4g} with these guesses) — {verdict} the accountant's "
                f"ε = {claim} at δ = {self.delta:g}")


def canary_membership(canaries: int, *, seed: Optional[int] = None, device=None) -> Tensor:
    """(m,) bool: which canaries to include, each independently with probability ½ (seed None:
    from the OS, so that the training run cannot know it)."""
    m = check_count("canaries", canaries, 1)
    gen = torch.Generator().manual_seed(os_seed() if seed is None else check_seed("seed", seed))
    return (torch.rand(m, generator=gen) < 0.5).to(device)


def _guess_grid(m: int) -> list[tuple[int, int]]:
    ks = sorted({max(1, round(m * f)) for f in _GUESS_FRACTIONS if round(m * f) <= m // 2} | {max(1, m // 2)})
    return [(k, k2) for k in ks for k2 in (0, k)]


def _check_guesses(guesses, m: int) -> tuple[int, int]:
    if isinstance(guesses, (tuple, list)) and len(guesses) == 2:
        k_in = check_count("guesses[0]", guesses[0])
        k_out = check_count("guesses[1]", guesses[1])
    else:
        total = check_count("guesses", guesses, 1)
        k_in, k_out = total - total // 2, total // 2
    if k_in + k_out > m or k_in + k_out == 0:
        raise ValueError(f"guesses must make between 1 and canaries={m} guesses in all, got {guesses!r}")
    return k_in, k_out


def audit_scores(membership: Tensor, scores: Tensor, *, delta: float, confidence: float = 0.95,
                 guesses: Union[None, int, Sequence[int]] = None, epsilon: Optional[float] = None) -> AuditReport:
    """The audit's verdict from each canary's membership (m,) bool and score (m,) (higher: more
    likely included). ``guesses``: a total (split evenly), a pair (k₊, k₋), or None for the best
    of a fixed grid at a Bonferroni-corrected confidence. ``epsilon``: the accountant's claim, to
    compare against."""
    if not isinstance(membership, Tensor) or membership.dim() != 1 or membership.dtype != torch.bool:
        raise ValueError("membership must be a 1-D bool tensor (which canaries were included), got "
                         + (f"{membership.dtype} of shape {tuple(membership.shape)}"
                            if isinstance(membership, Tensor) else type(membership).__name__))
    if not isinstance(scores, Tensor) or scores.shape != membership.shape or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating tensor of membership's shape {tuple(membership.shape)}, got "
                         + (f"{scores.dtype} of shape {tuple(scores.shape)}" if isinstance(scores, Tensor)
                            else type(scores).__name__))
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")
    confidence = _check_confidence(confidence)
    m = _check_canaries(membership.numel(), confidence)
    delta = check_delta("delta", delta)
    grid = _guess_grid(m) if guesses is None else [_check_guesses(guesses, m)]
    level = confidence if len(grid) == 1 else 1.0 - (1.0 - confidence) / len(grid)
    included = membership.cpu()
    order = torch.argsort(scores.detach().double().cpu(), descending=True, stable=True)
    ranked = included[order]
    hits_in = torch.cumsum(ranked.long(), 0)                     # right "included" guesses among the top k
    hits_out = torch.cumsum((~ranked).flip(0).long(), 0)         # right "excluded" among the bottom k
    best = None
    for k_in, k_out in grid:
        v = (int(hits_in[k_in - 1]) if k_in else 0) + (int(hits_out[k_out - 1]) if k_out else 0)
        bound = epsilon_lower_bound(m, k_in + k_out, v, delta, confidence=level)
        if best is None or bound > best[0]:
            best = (bound, k_in, k_out, v)
    bound, k_in, k_out, v = best
    ceiling = epsilon_lower_bound(m, k_in + k_out, k_in + k_out, delta, confidence=level)
    return AuditReport(bound, None if epsilon is None else float(epsilon), delta, confidence, m,
                       int(included.sum()), k_in, k_out, v, ceiling, len(grid),
                       scores=scores.detach().cpu(), membership=included)


# ------------------------------------------------------------------ gradient canaries in DP-SGD

class PrivacyAudit:
    """A one-run audit of a private training run, with gradient canaries (white box).

        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(...)
        audit = PrivacyAudit(engine, canaries=1000)
        ... train as usual ...
        print(audit.report(delta=1e-5))      # lower bound next to engine.get_epsilon(1e-5)

    Each included canary joins every step's batch with the engine's sample rate q, as one more
    per-sample gradient clipped (and then noised) by the same fused kernel as the data's, so
    it tests the code that runs. ``canary="dirac"`` puts ±scale·C on one coordinate per canary
    (distinct coordinates, so canaries never interfere; needs m ≤ D trainable scalars);
    ``"gaussian"`` a random direction of norm scale·C (held as an (m, D) fp32 matrix). Per-layer
    clipping: each parameter's part has norm scale·C_l. ``scale`` > 1 makes canaries larger than
    the clipping bound: clipping must shrink them back, which is what an audit of clipping checks.

    Canaries are extra samples: about m·q/2 of them join each step, next to the data's expected
    E; an audit run is for checking privacy, not for the model. A canary's score picks up the
    data's gradients on its coordinates too, so power is highest when E ≪ √D.
    """

    def __init__(self, engine, *, canaries: int = 1000, canary: str = "dirac", scale: float = 1.0,
                 confidence: float = 0.95, seed: Optional[int] = None):
        from .engine import PrivacyEngine
        from .optimizer import distributed_world
        if not isinstance(engine, PrivacyEngine):
            raise ValueError(f"engine must be a lorafast.dp.PrivacyEngine, got {type(engine).__name__}")
        if engine.client_accountants is not None:
            raise ValueError("engine made clients private (make_private_clients): the audit covers one DP-SGD "
                             "run made by make_private")
        opt = engine.optimizer
        if opt is None:
            raise ValueError("engine has no private optimizer yet: call engine.make_private first")
        if getattr(opt, "_lorafast_audit", None) is not None:
            raise ValueError("engine's optimizer is already audited: remove() the other PrivacyAudit first")
        if distributed_world()[1] > 1:
            raise ValueError("PrivacyAudit runs on one process (torch.distributed is initialised)")
        self.confidence = _check_confidence(confidence)
        m = _check_canaries(canaries, self.confidence)
        self.canary = check_choice("canary", canary, CANARIES)
        self.scale = check_positive("scale", scale)
        store = opt.store
        if self.canary == "dirac" and m > store.width:
            raise ValueError(f"canaries={m} Dirac canaries need as many trainable scalars; the model has "
                             f"{store.width}: use fewer, or canary='gaussian'")
        self.engine, self.optimizer, self.canaries = engine, opt, m
        self.sample_rate = float(engine.sample_rate)
        gen = torch.Generator().manual_seed(os_seed() if seed is None else check_seed("seed", seed))
        self._gen = gen
        self.membership = torch.rand(m, generator=gen) < 0.5
        bounds = torch.tensor(opt._bounds if opt.per_layer else opt._bounds * len(store.params),
                              dtype=torch.float32)
        seg = torch.tensor(store.segments)
        widths = seg[1:] - seg[:-1]
        # each coordinate's clipping bound: flat C, or its parameter's C_l (per layer)
        col_bound = torch.repeat_interleave(bounds, widths)
        device = store.device
        if self.canary == "dirac":
            self._coords = torch.randperm(store.width, generator=gen)[:m]
            signs = torch.randint(0, 2, (m,), generator=gen).float() * 2 - 1
            self._values = (signs * col_bound[self._coords] * self.scale).to(device)
            self._coords = self._coords.to(device)
            self._directions = None
        else:
            d = torch.randn(m, store.width, generator=gen)
            if opt.per_layer:   # every parameter's part on its own sphere, C_l
                for l, (a, b) in enumerate(zip(store.segments[:-1], store.segments[1:])):
                    d[:, a:b] *= bounds[l] / d[:, a:b].norm(dim=1, keepdim=True)
            else:
                d *= bounds[0] / d.norm(dim=1, keepdim=True)
            self._directions = (d * self.scale).to(device)
        self._scores = torch.zeros(m, dtype=torch.float64, device=device)
        self._included = self.membership.to(device)
        self.steps = 0
        self.inserted = 0           # canary samples put into batches so far
        opt._lorafast_audit = self
        opt._private_grad = self._private_grad      # shadows the method on this instance

    # the optimizer's private gradient, with this step's canaries in it, then scored
    def _private_grad(self) -> Tensor:
        opt = self.optimizer
        if opt.pending:                 # else the optimizer's own check raises
            self._insert()
        flat = type(opt)._private_grad(opt)
        if self._directions is None:
            self._scores += (flat[self._coords] * self._values).double()
        else:
            self._scores += (self._directions @ flat).double()
        self.steps += 1
        return flat

    def _insert(self) -> None:
        picked = self._included & (torch.rand(self.canaries, generator=self._gen) < self.sample_rate).to(
            self._included.device)
        idx = picked.nonzero().flatten()
        if idx.numel() == 0:
            return
        store = self.optimizer.store
        if self._directions is None:
            rows = torch.zeros(idx.numel(), store.width, device=store.device)
            rows[torch.arange(idx.numel(), device=store.device), self._coords[idx]] = self._values[idx]
        else:
            rows = self._directions[idx].contiguous()
        sq = _ops.grad_sample_norms(rows, store.segments, store.backend)
        self.optimizer.fold_samples(rows, sq)
        self.inserted += idx.numel()

    def remove(self) -> None:
        """Stop inserting canaries; the optimizer is private as before (idempotent)."""
        opt = self.optimizer
        if getattr(opt, "_lorafast_audit", None) is self:
            del opt._private_grad
            opt._lorafast_audit = None

    def __enter__(self) -> "PrivacyAudit":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def scores(self) -> Tensor:
        """(m,) each canary's inner product with the sum of the released gradients so far."""
        return self._scores.cpu()

    def report(self, delta: float, *, guesses: Union[None, int, Sequence[int]] = None) -> AuditReport:
        """The lower bound from the steps so far, next to the engine's ε at ``delta``."""
        delta = check_delta("delta", delta)
        out = audit_scores(self.membership, self.scores, delta=delta, confidence=self.confidence,
                           guesses=guesses, epsilon=self.engine.get_epsilon(delta))
        out.steps, out.canary = self.steps, self.canary
        return out
