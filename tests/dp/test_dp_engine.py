"""PrivacyEngine end to end: the gradient a private step applies, against torch.func and
Opacus; accumulation, non-finite samples, empty batches, noise, accounting, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorafast
from support.dp_models import TinyNet, clipped_mean, make_batch, per_sample_grads
from support.common import fresh_seed
from lorafast.dp import DPDataLoader, PrivacyEngine, compute_epsilon, get_noise_multiplier

BACKENDS = [b for b in ("torch", "triton") if b in lorafast.available_backends()]


def _private(model, *, batch_size=6, n_data=60, noise=0.0, C=1.0, backend=None, **kw):
    x, y = make_batch(n_data)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = PrivacyEngine()
    kw.setdefault("poisson_sampling", False)
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise,
                                             max_grad_norm=C, backend=backend, **kw)
    return engine, model, opt, loader


def _grads(model):
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads(got, want, tol=5e-5):
    """fp32 against float64; a sum of clipped per-sample gradients can partly cancel (the
    excess over fp32 rounding reached 6e-6 over 300 random inputs), a real bug is O(1)."""
    assert set(got) == set(want)
    for k in want:
        err = ((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)).item()
        assert err < tol, f"{k}: rel err {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("C", [0.05, 100.0], ids=["clipped", "unclipped"])
def test_step_matches_torch_func(backend, clipping, C):
    fresh_seed()
    model = TinyNet()
    x, y = make_batch(6)
    truth_ps = per_sample_grads(model, x, y)
    n_params = len(truth_ps)
    bounds = [C * (1 + 0.3 * i) for i in range(n_params)] if clipping == "per_layer" else C
    _, model, opt, _ = _private(model, clipping=clipping, C=bounds, backend=backend)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    want = clipped_mean(truth_ps, torch.tensor(bounds, dtype=torch.float64) if clipping == "per_layer" else C,
                        6, per_layer=clipping == "per_layer")
    _assert_grads(_grads(model), want)
    assert opt.parameter_names == list(truth_ps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_reduction_and_poisson_expected_batch(backend):
    """loss_reduction='sum' needs no rescaling; with Poisson sampling E = q·len(dataset)."""
    fresh_seed()
    model = TinyNet()
    x, y = make_batch(5)
    truth_ps = per_sample_grads(model, x, y)
    _, model, opt, loader = _private(model, batch_size=6, n_data=60, C=0.3, backend=backend, loss_reduction="sum",
                                     poisson_sampling=True)
    assert isinstance(loader, DPDataLoader)
    assert math.isclose(loader.sample_rate, 0.1)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    _assert_grads(_grads(model), clipped_mean(truth_ps, 0.3, 6.0))


def test_matches_opacus_on_plain_linear_layers():
    """Opacus on the same model written with nn.Linear layers (PEFT's LoRA recipe): with σ = 0
    both apply the same clipped gradients."""
    opacus = pytest.importorskip("opacus")
    fresh_seed()

    class PlainLoRA(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.base = nn.Linear(layer.in_features, layer.out_features)
            self.lora_A = nn.Linear(layer.in_features, layer.r, bias=False)
            self.lora_B = nn.Linear(layer.r, layer.out_features, bias=False)
            self.scaling = layer.scaling
            with torch.no_grad():
                self.base.weight.copy_(layer.weight)
                self.base.bias.copy_(layer.bias)
                self.lora_A.weight.copy_(layer.lora_A)
                self.lora_B.weight.copy_(layer.lora_B)
            self.base.requires_grad_(False)
            self.lora_A.weight.requires_grad_(layer.lora_A.requires_grad)
            self.lora_B.weight.requires_grad_(layer.lora_B.requires_grad)

        def forward(self, x):
            return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))

    class Net(nn.Module):
        def __init__(self, d_in=7, d=9, classes=3):
            super().__init__()
            self.l1 = lorafast.LoRALinear(d_in, d, r=3, lora_alpha=6, variant="lora")
            self.l2 = lorafast.LoRALinear(d, d, r=2, variant="ffa")
            self.head = nn.Linear(d, classes)
            with torch.no_grad():
                self.l1.lora_B.normal_(0, 0.5)
                self.l2.lora_B.normal_(0, 0.5)

        def forward(self, x):
            return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))).mean(1))

    ours = Net()
    plain = Net()
    plain.l1, plain.l2 = PlainLoRA(ours.l1), PlainLoRA(ours.l2)
    plain.head.load_state_dict(ours.head.state_dict())

    x, y = make_batch(40, T=5)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    kw = dict(noise_multiplier=0.0, max_grad_norm=0.2, poisson_sampling=False)
    o_model, o_opt, _ = opacus.PrivacyEngine().make_private(
        module=plain, optimizer=torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.0),
        data_loader=loader, **kw)
    l_model, l_opt, _ = PrivacyEngine().make_private(
        module=ours, optimizer=torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.0),
        data_loader=loader, **kw)
    xb, yb = x[:8], y[:8]
    for model, opt in ((o_model, o_opt), (l_model, l_opt)):
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    pairs = [(ours.l1.lora_A, plain.l1.lora_A.weight), (ours.l1.lora_B, plain.l1.lora_B.weight),
             (ours.l2.lora_B, plain.l2.lora_B.weight), (ours.head.weight, plain.head.weight),
             (ours.head.bias, plain.head.bias)]
    for mine, theirs in pairs:
        assert theirs.grad is not None and mine.grad is not None
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_clips_each_pass(backend):
    """Two backward passes then one step: Σ over both passes of clipped per-sample gradients."""
    fresh_seed()
    model = TinyNet()
    x, y = make_batch(7)
    truth_ps = per_sample_grads(model, x, y)
    _, model, opt, _ = _private(model, batch_size=7, C=0.1, backend=backend)
    for sl in (slice(0, 3), slice(3, 7)):
        F.cross_entropy(model(x[sl]), y[sl]).backward()
    opt.step()
    _assert_grads(_grads(model), clipped_mean(truth_ps, 0.1, 7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_sample_contributes_zero(backend):
    fresh_seed()
    model = TinyNet()
    x, y = make_batch(6)
    x[2, 1, 3] = float("inf")
    x[4, 0, 0] = float("nan")
    keep = torch.tensor([0, 1, 3, 5])
    truth_ps = per_sample_grads(model, x[keep], y[keep])
    _, model, opt, _ = _private(model, batch_size=6, C=0.5, backend=backend, loss_reduction="sum")
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    got = _grads(model)
    assert all(torch.isfinite(g).all() for g in got.values())
    _assert_grads(got, clipped_mean(truth_ps, 0.5, 6))
    assert opt.nonfinite_samples == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_steps_with_noise_only(backend):
    model = TinyNet()
    _, model, opt, _ = _private(model, batch_size=4, noise=1.3, C=0.7, backend=backend, noise_seed=11,
                                loss_reduction="sum")
    x, y = make_batch(0)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    flat = torch.cat([p.grad.flatten() for p in opt.store.params])
    from lorafast import reference
    noise = reference.normal_grid(11, 0, 1, flat.numel())[0]
    torch.testing.assert_close(flat, noise * 1.3 * 0.7 / 4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_std_seed_and_replay(backend):
    """grad = clean + σC·ξ/E, ξ Philox normals from (noise_seed, counter); each step moves the
    counter on; the same seed replays, and the default seed comes from the OS."""
    fresh_seed()
    x, y = make_batch(6)
    results = {}
    for run, seed in (("a", 5), ("b", 5), ("c", 6), ("clean", 5)):
        model = TinyNet(seed=1)
        noise = 0.0 if run == "clean" else 2.0
        _, model, opt, _ = _private(model, noise=noise, C=0.4, backend=backend, noise_seed=seed)
        steps = []
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps.append(torch.cat([p.grad.flatten().clone() for p in opt.store.params]))
            opt.zero_grad()
        results[run] = steps
    a, b, c, clean = results["a"], results["b"], results["c"], results["clean"]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    from lorafast import reference
    D = a[0].numel()
    for step in range(2):
        xi = reference.normal_grid(5, step * reference.philox_calls(1, D), 1, D)[0]
        torch.testing.assert_close(a[step] - clean[step], 2.0 * 0.4 * xi / 6, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(a[0], c[0])
    seeds = {PrivacyEngine().make_private(module=TinyNet(), optimizer=torch.optim.SGD(TinyNet().head.parameters()),
                                          data_loader=DataLoader(TensorDataset(*make_batch(8)), batch_size=2),
                                          noise_multiplier=1.0, max_grad_norm=1.0)[1].noise_seed
             for _ in range(3)}
    assert len(seeds) == 3


def test_default_noise_seed_comes_from_os(monkeypatch):
    import os
    calls = []
    real = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: calls.append(n) or real(n))
    lorafast.manual_seed(0)   # must not make DP noise predictable
    _, _, opt, _ = _private(TinyNet(), noise=1.0)
    assert calls, "the noise seed was not drawn from os.urandom"
    assert 0 <= opt.noise_seed < 2**63


def test_secure_mode_draws_from_os(monkeypatch):
    stats = pytest.importorskip("scipy.stats")
    from lorafast.dp import noise as noise_mod
    z = noise_mod.secure_standard_normal(100_000, "cpu").double()
    assert abs(z.mean().item()) < 6 / math.sqrt(1e5)
    assert abs(z.std().item() - 1) < 6 * math.sqrt(0.5 / 1e5)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4

    drawn = []
    real = noise_mod.secure_standard_normal
    monkeypatch.setattr("lorafast.dp.optimizer.secure_standard_normal", lambda n, d: drawn.append(n) or real(n, d))
    x, y = make_batch(6)
    grads = []
    for _ in range(2):   # the same noise_seed does not matter: the noise is not Philox's
        model = TinyNet(seed=3)
        engine = PrivacyEngine(secure_mode=True)
        loader = DataLoader(TensorDataset(x, y), batch_size=6)
        model, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.head.parameters(), lr=0),
                                            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                            poisson_sampling=False, noise_seed=1)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        grads.append(model.head.weight.grad.clone())
    assert drawn and drawn[0] == opt.store.width
    assert not torch.allclose(grads[0], grads[1])


def test_accountant_counts_steps_taken():
    fresh_seed()
    engine, model, opt, loader = _private(TinyNet(), batch_size=5, n_data=50, noise=1.1, poisson_sampling=True)
    steps = 0
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    assert steps == len(loader) == 10
    assert math.isclose(engine.get_epsilon(1e-5), compute_epsilon(1.1, 0.1, steps, 1e-5), rel_tol=1e-9)


def test_make_private_with_epsilon_picks_sigma():
    x, y = make_batch(100)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    model = TinyNet()
    engine = PrivacyEngine()
    _, opt, _ = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.head.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=3.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0)
    assert opt.noise_multiplier == pytest.approx(get_noise_multiplier(3.0, 1e-5, 0.1, 30), rel=1e-9)
    assert compute_epsilon(opt.noise_multiplier, 0.1, 30, 1e-5) <= 3.0


def _unchanged(model):
    return not any(hasattr(m, "_lorafast_grad_sample_store") for m in model.modules())


@pytest.mark.parametrize("kw,match", [
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(clipping="per_layer", max_grad_norm=[1.0, 1.0]), "max_grad_norm"),
    (dict(clipping="per_layer", max_grad_norm=1.0), "max_grad_norm"),
    (dict(clipping="flat", max_grad_norm=[1.0]), "max_grad_norm"),
    (dict(clipping="nope"), "clipping"),
    (dict(loss_reduction="max"), "loss_reduction"),
    (dict(noise_seed=-3), "noise_seed"),
])
def test_bad_arguments_raise_and_change_nothing(kw, match):
    model = TinyNet()
    args = dict(module=model, optimizer=torch.optim.SGD(model.head.parameters(), lr=0.1),
                data_loader=DataLoader(TensorDataset(*make_batch(8)), batch_size=2), noise_multiplier=1.0,
                max_grad_norm=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        PrivacyEngine().make_private(**args)
    assert _unchanged(model)


def test_untrainable_parameter_kinds_are_named():
    model = TinyNet()
    model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="norm.weight"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(TensorDataset(*make_batch(8)), batch_size=2),
                                     noise_multiplier=1.0, max_grad_norm=1.0)
    assert _unchanged(model)


def test_bad_epsilon_and_engine_arguments():
    model = TinyNet()
    loader = DataLoader(TensorDataset(*make_batch(8)), batch_size=2)
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="target_epsilon"):
            PrivacyEngine().make_private_with_epsilon(module=model, optimizer=torch.optim.SGD(model.head.parameters()),
                                                      data_loader=loader, target_epsilon=eps, target_delta=1e-5,
                                                      epochs=1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyEngine(accountant="gdp")
    assert _unchanged(model)


def test_step_without_backward_raises():
    _, model, opt, _ = _private(TinyNet())
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()


def test_batch_must_be_first_dimension():
    _, model, opt, _ = _private(TinyNet())
    with pytest.raises(ValueError, match="batch dimension"):
        model.lora(torch.randn(7))


class _CheckpointedNet(TinyNet):
    """TinyNet with every layer in a checkpointed segment of its own, as transformers checkpoints each block."""

    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant

    def forward(self, x):
        def ckpt(fn, *args):
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=self.use_reentrant)

        h = ckpt(lambda t: torch.tanh(self.lora(t)), x)
        h = ckpt(lambda t: torch.tanh(self.ffa(t)) + t, h)
        h = ckpt(lambda t: self.norm(self.xs(t)), h)
        return ckpt(lambda t: self.head(t.mean(1)), h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_reentrant_checkpointing_gives_the_same_private_step(backend):
    """Checkpointing recomputes the saved tensors as new objects; the per-sample gradients still
    land in their parameters' columns and the whole pass is clipped once."""
    fresh_seed()
    model = _CheckpointedNet(use_reentrant=False)
    x, y = make_batch(5)
    truth_ps = per_sample_grads(TinyNet(), x, y)     # the same weights (seed 0), no checkpointing
    _, model, opt, _ = _private(model, C=0.2, backend=backend)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    _assert_grads(_grads(model), clipped_mean(truth_ps, 0.2, 6))


def test_reentrant_checkpointing_is_refused():
    """Reentrant checkpointing runs each segment's backward nested in its own pass: clipping would
    see partial gradients, so the backward fails and names the fix."""
    model = _CheckpointedNet(use_reentrant=True)
    x, y = make_batch(5)
    _, model, opt, _ = _private(model, C=0.2)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        F.cross_entropy(model(x.requires_grad_()), y).backward()
