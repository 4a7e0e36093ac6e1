"""The one-run audit around DP-SGD (PrivacyAudit) and from scores (audit_scores): power on a
broken mechanism, no false alarm on the real engine (torch and fused Triton paths), the
canaries' bookkeeping, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorafast
from lorafast import _ops
from lorafast.dp import DPOptimizer, PrivacyEngine, compute_epsilon
from lorafast.dp.audit import (AuditReport, PrivacyAudit, audit_scores, canary_membership, epsilon_lower_bound,
                               min_canaries)

DELTA = 1e-5
TRITON = "triton" in lorafast.available_backends()


def _run(*, sigma=2.0, width=64, r=8, canaries=500, canary="dirac", scale=1.0, clipping="flat", epochs=5,
         backend=None, accumulate=1, seed=None, poisson=False, train=None):
    """A LoRA layer and a frozen head trained privately for ``epochs`` over 40 samples in batches
    of 4 (q = 0.1), audited; returns (engine, optimizer, audit)."""
    model = nn.Sequential(lorafast.LoRALinear(width, width, r=r, variant="lora"), nn.Tanh(), nn.Linear(width, 3))
    model[2].requires_grad_(False)
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.1)
    x, y = torch.randn(40, width), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine()
    bounds = 1.0 if clipping == "flat" else [1.0, 0.5]
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                                             max_grad_norm=bounds, clipping=clipping, backend=backend,
                                             poisson_sampling=poisson)
    audit = PrivacyAudit(engine, canaries=canaries, canary=canary, scale=scale, seed=seed)
    for _ in range(epochs):
        for xb, yb in loader:
            for part in range(accumulate):
                F.cross_entropy(model(xb[part::accumulate]), yb[part::accumulate]).backward()
            opt.step()
            opt.zero_grad()
    return engine, opt, audit


@pytest.fixture
def noise_off(monkeypatch):
    """A broken mechanism: the accountant is told σ but no noise is added."""
    monkeypatch.setattr(DPOptimizer, "noise_std", property(lambda self: 0.0))


@pytest.fixture
def clipping_off(monkeypatch):
    """A broken mechanism: the clipping bound is not applied (the noise still is σC)."""
    original = _ops.clip_reduce_noise

    def unclipped(grad_sample, sq_norms, segments, max_norms, *args, **kw):
        return original(grad_sample, sq_norms, segments, [1e30] * len(max_norms), *args, **kw)
    monkeypatch.setattr(_ops, "clip_reduce_noise", unclipped)


@pytest.mark.parametrize("canary,clipping", [("dirac", "flat"), ("gaussian", "flat"), ("dirac", "per_layer"),
                                             ("gaussian", "per_layer")])
def test_real_engine_stays_below_the_accountant(canary, clipping):
    engine, opt, audit = _run(canary=canary, clipping=clipping)
    report = audit.report(DELTA)
    eps = engine.get_epsilon(DELTA)
    assert report.epsilon == eps and math.isfinite(eps)
    assert report.epsilon_lower_bound < eps, str(report)
    assert report.consistent


@pytest.mark.parametrize("canary,clipping", [("dirac", "flat"), ("gaussian", "flat"), ("dirac", "per_layer"),
                                             ("gaussian", "per_layer")])
def test_missing_noise_is_caught(noise_off, canary, clipping):
    engine, opt, audit = _run(canary=canary, clipping=clipping, sigma=4.0)
    report = audit.report(DELTA)
    # the accountant still claims σ = 4 (ε ≈ 0.6); the guesses rule out far more (Gaussian
    # canaries, which pick up each other and the data, reached 1.2 at worst, Dirac ones ≈ 3)
    assert 0.3 < report.epsilon < 1.0
    assert report.epsilon_lower_bound > report.epsilon, str(report)
    assert not report.consistent and "VIOLATES" in str(report)


def test_missing_clipping_is_caught(clipping_off):
    engine, _, audit = _run(scale=20.0, sigma=3.0)
    report = audit.report(DELTA)
    assert report.epsilon_lower_bound > report.epsilon, str(report)


def test_oversized_canaries_are_clipped_back():
    """The same canaries, 20× the bound, with clipping working: no violation."""
    engine, _, audit = _run(scale=20.0, sigma=3.0)
    report = audit.report(DELTA)
    assert report.epsilon_lower_bound < report.epsilon, str(report)


@pytest.mark.skipif(not TRITON, reason="no Triton backend")
def test_fused_triton_path_stays_below_the_accountant():
    engine, opt, audit = _run(width=32, r=4, canaries=200, epochs=3, backend="triton")
    assert opt.store.backend == "triton"
    report = audit.report(DELTA)
    assert report.epsilon_lower_bound < report.epsilon, str(report)
    # the canaries did go through: included ones score higher on average (≈ 3 insertions each,
    # against noise of std σC·√steps per score)
    s, inc = audit.scores, audit.membership
    assert audit.inserted > 0
    assert s[inc].mean() - s[~inc].mean() > 0


@pytest.mark.skipif(not TRITON, reason="no Triton backend")
def test_missing_noise_is_caught_on_the_fused_triton_path(noise_off):
    engine, opt, audit = _run(width=32, r=4, canaries=200, epochs=3, backend="triton", sigma=3.0)
    report = audit.report(DELTA)
    assert report.epsilon_lower_bound > report.epsilon, str(report)


def test_accounting_is_the_engines():
    """Canaries are records like any other: ε is the accountant's for σ, q and the steps taken."""
    engine, opt, audit = _run(epochs=2)
    assert audit.steps == opt.steps == 20
    report = audit.report(DELTA)
    assert report.epsilon == pytest.approx(compute_epsilon(2.0, 0.1, 20, DELTA), rel=1e-9)
    assert report.steps == 20 and report.canary == "dirac" and report.canaries == 500
    assert report.included == int(audit.membership.sum())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_canaries_join_each_step_at_the_sample_rate(accumulate):
    """Each included canary joins a step with probability q, once per step however many
    backward passes it accumulates."""
    engine, opt, audit = _run(epochs=10, accumulate=accumulate, canaries=400)
    n = audit.steps * int(audit.membership.sum())
    mean, sd = n * 0.1, math.sqrt(n * 0.1 * 0.9)
    assert abs(audit.inserted - mean) < 5 * sd


def test_canaries_enter_the_released_gradient_exactly():
    """σ = 0, lr = 0: the released gradient is the clipped data sum plus the canaries, over E."""
    torch.manual_seed(0)
    layer = lorafast.LoRALinear(16, 16, r=2, variant="ffa")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 16)
    loader = DataLoader(TensorDataset(x), batch_size=8)
    opt = torch.optim.SGD([layer.lora_B], lr=0.0)
    engine = PrivacyEngine()
    layer, opt, loader = engine.make_private(module=layer, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
                                             max_grad_norm=1e3, poisson_sampling=False)
    engine.sample_rate = 1.0                 # every included canary joins the one step
    audit = PrivacyAudit(engine, canaries=20, seed=3)
    layer(x).sum().backward()
    opt.step()
    with_canaries = layer.lora_B.grad.clone()
    audit.remove()
    layer(x).sum().backward()
    opt.step()
    without = layer.lora_B.grad.clone()
    want = without.flatten().clone()
    inc = audit.membership
    want.index_add_(0, audit._coords[inc], audit._values[inc] / 8)
    torch.testing.assert_close(with_canaries.flatten(), want, rtol=1e-6, atol=1e-7)
    assert audit.inserted == int(inc.sum())


def test_remove_restores_the_optimizer():
    engine, opt, audit = _run(epochs=1)
    inserted, steps = audit.inserted, audit.steps
    audit.remove()
    audit.remove()                                   # idempotent
    assert "_private_grad" not in vars(opt)
    assert opt._private_grad.__func__ is DPOptimizer._private_grad
    PrivacyAudit(engine, canaries=10).remove()       # may be audited again
    with PrivacyAudit(engine, canaries=10) as again:
        assert again.optimizer is opt
    assert "_private_grad" not in vars(opt)
    assert (audit.inserted, audit.steps) == (inserted, steps)


# ------------------------------------------------------------------ audit_scores


def test_audit_scores_counts_and_grid():
    m = 301
    membership = canary_membership(m)
    scores = torch.randn(m, dtype=torch.float64) + 1.5 * membership.double()
    report = audit_scores(membership, scores, delta=DELTA, guesses=(40, 25))
    order = torch.argsort(scores, descending=True)
    want = int(membership[order[:40]].sum()) + int((~membership[order[-25:]]).sum())
    assert (report.guesses_included, report.guesses_excluded, report.correct) == (40, 25, want)
    assert report.epsilon_lower_bound == epsilon_lower_bound(m, 65, want, DELTA)
    assert report.max_lower_bound == epsilon_lower_bound(m, 65, 65, DELTA)
    assert report.hypotheses == 1 and report.epsilon is None and report.consistent

    best = audit_scores(membership, scores, delta=DELTA)           # the grid, Bonferroni-corrected
    level = 1 - 0.05 / best.hypotheses
    assert best.hypotheses > 1
    k_in, k_out = best.guesses_included, best.guesses_excluded
    v = int(membership[order[:k_in]].sum()) + (int((~membership[order[m - k_out:]]).sum()) if k_out else 0)
    assert best.correct == v
    assert best.epsilon_lower_bound == epsilon_lower_bound(m, k_in + k_out, v, DELTA, confidence=level)
    assert best.epsilon_lower_bound <= epsilon_lower_bound(m, k_in + k_out, v, DELTA)


def test_audit_scores_perfect_and_chance():
    m = 400
    membership = canary_membership(m)
    perfect = audit_scores(membership, membership.double() + 0.01 * torch.rand(m, dtype=torch.float64),
                           delta=DELTA, guesses=100)
    assert perfect.correct == 100 and perfect.epsilon_lower_bound == perfect.max_lower_bound > 2
    inverted = audit_scores(membership, -membership.double(), delta=DELTA, guesses=100)
    assert inverted.correct == 0 and inverted.epsilon_lower_bound == 0.0


def test_canary_membership():
    a, b = canary_membership(2000, seed=5), canary_membership(2000, seed=5)
    assert a.dtype == torch.bool and torch.equal(a, b)
    assert abs(a.float().mean().item() - 0.5) < 0.05
    assert not torch.equal(canary_membership(2000), canary_membership(2000))


def test_input_canaries_on_a_private_run():
    """Input canaries (random points with random labels) put into the training data by
    canary_membership, scored by their loss drop: the real engine is not flagged."""
    torch.manual_seed(1)
    n, m, d = 40, 100, 16
    x, y = torch.randn(n, d), torch.randint(0, 3, (n,))
    cx, cy = torch.randn(m, d), torch.randint(0, 3, (m,))
    membership = canary_membership(m)
    data = TensorDataset(torch.cat([x, cx[membership]]), torch.cat([y, cy[membership]]))
    model = nn.Sequential(lorafast.LoRALinear(d, 8, r=2, variant="lora"), nn.Tanh(), nn.Linear(8, 3))
    model[2].requires_grad_(False)

    def losses():
        with torch.no_grad():
            return F.cross_entropy(model(cx), cy, reduction="none")
    before = losses()
    engine = PrivacyEngine()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=8),
                                             noise_multiplier=1.5, max_grad_norm=1.0)
    for _ in range(3):
        for xb, yb in loader:
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
    report = audit_scores(membership, before - losses(), delta=DELTA, epsilon=engine.get_epsilon(DELTA))
    assert isinstance(report, AuditReport) and report.canaries == m
    assert report.epsilon_lower_bound < report.epsilon


# ------------------------------------------------------------------ bad input


def _engine(width=8):
    model = lorafast.LoRALinear(width, width, r=2, variant="ffa")
    loader = DataLoader(TensorDataset(torch.randn(10, width)), batch_size=2)
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=torch.optim.SGD([model.lora_B], lr=0.1), data_loader=loader,
                        noise_multiplier=1.0, max_grad_norm=1.0)
    return engine


@pytest.mark.parametrize("kwargs,match", [
    (dict(canaries=4), "canaries=4 is too few for confidence=0.95"),
    (dict(canaries=9, confidence=0.999), "canaries=9 is too few for confidence=0.999"),
    (dict(canaries=0), "canaries must be"),
    (dict(canaries=17), "Dirac canaries need as many trainable scalars"),
    (dict(canaries=10, canary="laplace"), "canary must be one of"),
    (dict(canaries=10, scale=0.0), "scale"),
    (dict(canaries=10, confidence=1.0), "confidence must be in"),
    (dict(canaries=10, seed=-1), "seed"),
])
def test_bad_audit_arguments(kwargs, match):
    engine = _engine()                       # 16 trainable scalars
    opt = engine.optimizer
    with pytest.raises(ValueError, match=match):
        PrivacyAudit(engine, **kwargs)
    assert "_private_grad" not in vars(opt) and getattr(opt, "_lorafast_audit", None) is None


def test_min_canaries():
    assert min_canaries(0.95) == 5 and min_canaries(0.999) == 10
    for c in (0.9, 0.95, 0.99):
        m = min_canaries(c)
        assert epsilon_lower_bound(m, m, m, 0.0, confidence=c) > 0
        assert epsilon_lower_bound(m - 1, m - 1, m - 1, 0.0, confidence=c) == 0


def test_bad_engines():
    with pytest.raises(ValueError, match="engine must be a lorafast.dp.PrivacyEngine"):
        PrivacyAudit(object(), canaries=10)
    with pytest.raises(ValueError, match="no private optimizer yet"):
        PrivacyAudit(PrivacyEngine(), canaries=10)
    engine = _engine()
    PrivacyAudit(engine, canaries=10)
    with pytest.raises(ValueError, match="already audited"):
        PrivacyAudit(engine, canaries=10)


def test_bad_report_and_scores():
    engine = _engine()
    audit = PrivacyAudit(engine, canaries=10)
    with pytest.raises(ValueError, match="delta"):
        audit.report(0.0)
    with pytest.raises(ValueError, match="guesses must make between 1 and canaries=10"):
        audit.report(DELTA, guesses=(8, 3))
    membership = canary_membership(10)
    with pytest.raises(ValueError, match="membership must be a 1-D bool tensor"):
        audit_scores(membership.float(), torch.randn(10), delta=DELTA)
    with pytest.raises(ValueError, match="scores must be a floating tensor of membership's shape"):
        audit_scores(membership, torch.randn(9), delta=DELTA)
    with pytest.raises(ValueError, match="scores must be finite"):
        audit_scores(membership, torch.full((10,), float("nan")), delta=DELTA)
    with pytest.raises(ValueError, match="canaries=3 is too few"):
        audit_scores(canary_membership(3), torch.randn(3), delta=DELTA)


def test_example_runs(capsys):
    """examples/privacy_audit.py --tiny: three audited runs of a tiny Llama; the real engine's
    lower bound stays below its ε, the unnoised FFA run's accountant says ∞."""
    import runpy

    from support.common import ROOT
    pytest.importorskip("transformers")
    main = runpy.run_path(str(ROOT / "examples" / "privacy_audit.py"))["main"]
    out = main(["--tiny"])
    reports = out["reports"]
    assert set(reports) == {"dp-sgd", "noise removed", "ffa, no noise"}
    assert reports["dp-sgd"].epsilon_lower_bound < reports["dp-sgd"].epsilon < math.inf
    assert reports["ffa, no noise"].epsilon == math.inf
    assert reports["noise removed"].epsilon_lower_bound > reports["dp-sgd"].epsilon_lower_bound
    printed = capsys.readouterr().out
    assert "accountant ε" in printed and "dp-sgd" in printed
