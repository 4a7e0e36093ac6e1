"""lorafast.dp.implicit_noise: the variance formula against Monte Carlo over A, ∇W against a
float64 autograd reference with W trainable, σ_eff and ε against DP-SGD's formula and the
accountant, refusals, and a model left exactly as it was."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorafast
from lorafast.dp import PrivacyEngine, compute_epsilon, implicit_noise
from lorafast.dp.implicit_noise import GAUSSIAN_KURTOSIS, UNIFORM_KURTOSIS, implicit_noise_variance, summary
from lorafast.layers import draw_adapters
from support.common import fresh_seed

D_IN, D_OUT, DRAWS = 33, 7, 20000


def _draws(kind: str, r: int) -> torch.Tensor:
    """DRAWS matrices A (r, D_IN) float64: lorafast's own draw from DRAWS seeds, or Gaussian of
    the same variance 1/(3·in)."""
    if kind == "gaussian":
        return torch.randn(DRAWS, r, D_IN, dtype=torch.float64) / math.sqrt(3 * D_IN)
    base = int(torch.randint(0, 2**40, ()))
    return torch.stack([draw_adapters(D_IN, D_OUT, r, False, base + k)[0] for k in range(DRAWS)]).double()


def _check_moments(update: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """The empirical mean within 5.5 standard errors and the variance within 10%, per coordinate
    (231 of them, so each check is 5.5σ; over 25 seeds the worst seen were 4.3σ and 5.7%)."""
    emp_mean, emp_var = update.mean(0), update.var(0)
    z = (emp_mean - mean).abs() / (var / update.shape[0]).sqrt()
    assert z.max() < 5.5, f"mean off by {z.max():.2f} standard errors"
    rel = (emp_var / var - 1).abs()
    assert rel.max() < 0.10, f"variance off by {rel.max():.3f} (mean {rel.mean():.3f})"


@pytest.mark.parametrize("kind, kurtosis", [("uniform", UNIFORM_KURTOSIS), ("gaussian", GAUSSIAN_KURTOSIS)])
def test_variance_formula_against_monte_carlo(kind, kurtosis):
    """Var((∇W AᵀA/(r v))_oi) = (‖g_o‖² + (κ−2) g_oi²)/r; row 0 is nearly one coordinate, so the
    (κ−2) g² term (−16% there for uniform A, +80% for Gaussian) is tested, not just ‖g‖²/r; and
    the variance falls as 1/r (ranks 3 and 12 share their draws' first rows)."""
    fresh_seed()
    grad = torch.randn(D_OUT, D_IN, dtype=torch.float64)
    grad[0] = 0.05 * grad[0]
    grad[0, 5] = 3.0
    A12 = _draws(kind, 12)
    v = 1 / (3 * D_IN)
    variances = {}
    for r in (3, 12):
        A = A12[:, :r]
        update = (grad @ A.transpose(1, 2)) @ A / (r * v)
        variances[r] = implicit_noise_variance(grad, r, kurtosis)
        _check_moments(update - grad, torch.zeros_like(grad), variances[r])
        if kind == "uniform":    # the wrong (Gaussian) kurtosis is detectably wrong at row 0
            wrong = implicit_noise_variance(grad, r, GAUSSIAN_KURTOSIS)[0, 5]
            assert abs(update[:, 0, 5].var() / wrong - 1) > 0.3
    torch.testing.assert_close(variances[3], 4 * variances[12])


def test_layer_update_moments_against_monte_carlo():
    """For the ∇W that implicit_noise measures on a batch, the effective-weight step of SGD on B,
    s²·∇W·AᵀA over lorafast's A draws, has mean scale·ḡ and variance scale²·noise_var."""
    fresh_seed()
    r = 3
    model = lorafast.LoRALinear(D_IN, D_OUT, r=r, lora_alpha=5, variant="ffa").double()
    x, y = torch.randn(9, 4, D_IN, dtype=torch.float64), torch.randn(9, 4, D_OUT, dtype=torch.float64)
    rec = implicit_noise(model, (x, y), F.mse_loss)["<model>"]
    A = _draws("uniform", r)
    update = model.scaling ** 2 * (rec.grad @ A.transpose(1, 2)) @ A
    _check_moments(update, rec.scale * rec.grad, rec.scale ** 2 * rec.noise_var)
    assert rec.noise_var_total == pytest.approx(rec.noise_var.sum().item(), rel=1e-12)
    assert rec.noise_to_signal == pytest.approx(math.sqrt(rec.noise_var_total) / rec.grad_norm, rel=1e-12)


class Net(nn.Module):
    """Two FFA layers, the second applied twice (its ∇W sums both calls), tokens per sample."""

    def __init__(self):
        super().__init__()
        self.up = lorafast.LoRALinear(11, 13, r=3, lora_alpha=6, variant="ffa")
        self.mid = lorafast.LoRALinear(13, 13, r=2, variant="ffa")
        self.head = nn.Linear(13, 5)
        self.drop = nn.Dropout(0.5)
        with torch.no_grad():
            for layer in (self.up, self.mid):
                layer.lora_B.normal_(0, 0.5)

    def forward(self, x):     # (n, T, 11)
        h = torch.tanh(self.up(x))
        h = torch.tanh(self.mid(h)) + h
        h = torch.tanh(self.mid(self.drop(h)))
        return self.head(h.mean(1))


def _reference_forward(net: Net, x: torch.Tensor, weights: dict) -> torch.Tensor:
    """Net's eval forward in float64 with each LoRALinear replaced by F.linear on its effective
    weight W + s·B·A, given as trainable leaves."""
    up, mid = (lambda h, n=n: F.linear(h, weights[n], getattr(net, n).bias.double()) for n in ("up", "mid"))
    h = torch.tanh(up(x))
    h = torch.tanh(mid(h)) + h
    h = torch.tanh(mid(h))
    return F.linear(h.mean(1), net.head.weight.double(), net.head.bias.double())


def _data(n=6, T=4):
    return torch.randn(n, T, 11), torch.randint(0, 5, (n,))


def test_grad_and_per_sample_norms_match_float64_reference():
    fresh_seed()
    net, (x, y) = Net(), _data()
    layers = {n: getattr(net, n) for n in ("up", "mid")}
    weights = {n: (m.weight.double() + m.scaling * m.lora_B.double() @ m.lora_A.double()).detach().requires_grad_(True)
               for n, m in layers.items()}
    x64 = x.double()
    want = torch.autograd.grad(F.cross_entropy(_reference_forward(net, x64, weights), y), list(weights.values()))
    per_sample = [torch.autograd.grad(F.cross_entropy(_reference_forward(net, x64[i:i + 1], weights), y[i:i + 1]),
                                      list(weights.values())) for i in range(len(y))]
    for model, tol in ((net, 1e-5), (Net().double(), 1e-11)):
        if model is not net:
            model.load_state_dict(net.state_dict())
        got = implicit_noise(model, (x.to(model.up.weight.dtype), y), F.cross_entropy)
        assert set(got) == {"up", "mid"}
        for k, name in enumerate(("up", "mid")):
            rec = got[name]
            torch.testing.assert_close(rec.grad, want[k], rtol=tol, atol=tol * want[k].abs().max().item())
            norms = torch.stack([g[k].norm() for g in per_sample])
            assert rec.max_per_sample_norm == pytest.approx(norms.max().item(), rel=tol)
            assert rec.max_grad_norm == rec.max_per_sample_norm and rec.clipped == 0
            assert rec.batch_size == len(y) and rec.grad_norm == pytest.approx(want[k].norm().item(), rel=tol)
    # per-sample losses and "sum" give the same ḡ and gᵢ
    vec = implicit_noise(net, (x, y), lambda out, t: F.cross_entropy(out, t, reduction="none"))
    summed = implicit_noise(net, (x, y), lambda out, t: F.cross_entropy(out, t, reduction="sum"), loss_reduction="sum")
    for name in ("up", "mid"):
        for other in (vec[name], summed[name]):
            torch.testing.assert_close(other.grad, got[name].grad.float().double(), rtol=1e-5, atol=1e-7)
            assert other.max_per_sample_norm == pytest.approx(got[name].max_per_sample_norm, rel=1e-5)


def test_hugging_face_style_loss_matches_loss_fn():
    fresh_seed()
    net, (x, y) = Net(), _data()

    class HFLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, labels=None):
            logits = self.net(input_ids)
            return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))

    hf = implicit_noise(HFLike(), {"input_ids": x, "labels": y})
    plain = implicit_noise(net, (x, y), F.cross_entropy)
    assert set(hf) == {"net.up", "net.mid"}
    for name in ("up", "mid"):
        torch.testing.assert_close(hf[f"net.{name}"].grad, plain[name].grad)
    with pytest.raises(ValueError, match="no .loss"):
        implicit_noise(HFLike(), {"input_ids": x})


def test_sigma_eff_is_dp_sgd_noise_and_epsilon_is_the_accountants():
    """DP-SGD's update (Σ clip(gᵢ) + N(0, σ²C²))/n has variance σ²C²/n² per coordinate; σ_eff
    makes that the implicit noise's mean per-coordinate variance."""
    fresh_seed()
    net, (x, y) = Net(), _data(n=8)
    base = implicit_noise(net, (x, y), F.cross_entropy)
    # just under the largest per-sample norm: some samples are clipped, never all (at half of it, all 8 could be)
    C = 0.99 * base["up"].max_per_sample_norm
    q, steps, delta = 0.02, 300, 1e-5
    got = implicit_noise(net, (x, y), F.cross_entropy, max_grad_norm=C, sample_rate=q, steps=steps, delta=delta)
    for name, rec in got.items():
        assert rec.max_grad_norm == C
        assert (rec.noise_multiplier * C / rec.batch_size) ** 2 == pytest.approx(rec.noise_var.mean().item(), rel=1e-10)
        assert rec.noise_multiplier == pytest.approx(base[name].noise_multiplier * base[name].max_grad_norm / C)
        assert rec.epsilon == compute_epsilon(rec.noise_multiplier, q, steps, delta)
        assert (rec.delta, rec.sample_rate, rec.steps) == (delta, q, steps)
        assert any("frozen A" in a and "FALSE" in a for a in rec.assumptions)
        assert base[name].epsilon is None
    assert 1 <= got["up"].clipped < len(y)
    assert "σ_eff" in str(got["up"]) and "NOT a guarantee" in str(got["up"])
    table = summary(got)
    assert table.splitlines()[1].startswith("up ") and "no differential privacy" in table


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def _assert_unchanged(model, before):
    state, modes, flags = before
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_model_unchanged_on_success_and_error():
    fresh_seed()
    net, (x, y) = Net(), _data()
    net.train()
    net.head.eval()              # mixed modes come back as they were
    before = _state(net)
    implicit_noise(net, (x, y), F.cross_entropy, sample_rate=0.1, steps=10, delta=1e-5)
    _assert_unchanged(net, before)

    def failing(out, target):
        assert not net.training   # the forward ran in eval mode
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        implicit_noise(net, (x, y), failing)
    _assert_unchanged(net, before)
    with pytest.raises(ValueError, match="not finite"):
        implicit_noise(net, (x, y), lambda out, t: out.sum() * float("nan"))
    _assert_unchanged(net, before)


def test_refusals():
    fresh_seed()
    net, (x, y) = Net(), _data()
    before = _state(net)
    ok = (net, (x, y), F.cross_entropy)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="max_grad_norm"):
            implicit_noise(*ok, max_grad_norm=bad)
    with pytest.raises(ValueError, match="all three"):
        implicit_noise(*ok, sample_rate=0.1, steps=10)
    with pytest.raises(ValueError, match="sample_rate"):
        implicit_noise(*ok, sample_rate=1.5, steps=10, delta=1e-5)
    with pytest.raises(ValueError, match="steps"):
        implicit_noise(*ok, sample_rate=0.1, steps=0, delta=1e-5)
    with pytest.raises(ValueError, match="loss_reduction"):
        implicit_noise(*ok, loss_reduction="none")
    with pytest.raises(ValueError, match="dict of model inputs"):
        implicit_noise(net, (x, y))
    with pytest.raises(ValueError, match=r"\(inputs, target\)"):
        implicit_noise(net, x, F.cross_entropy)
    _assert_unchanged(net, before)

    lora = nn.Sequential(lorafast.LoRALinear(11, 5, r=2, variant="ffa"), lorafast.LoRALinear(5, 5, r=2, variant="lora"))
    with pytest.raises(ValueError, match=r"'1'.*lora_A trains"):
        implicit_noise(lora, (x, y), lambda out, t: F.cross_entropy(out.mean(1), t))
    for model in (nn.Sequential(nn.Linear(11, 5)), nn.Sequential(lorafast.LoRALinear(11, 5, r=2, variant="xs"))):
        with pytest.raises(ValueError, match="no LoRALinear"):
            implicit_noise(model, (x, y), lambda out, t: F.cross_entropy(out.mean(1), t))
    private = Net()
    opt = torch.optim.SGD([p for p in private.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    private, _, _ = PrivacyEngine().make_private(module=private, optimizer=opt, data_loader=loader,
                                                 noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    with pytest.raises(ValueError, match="per-sample mode"):
        implicit_noise(private, (x, y), F.cross_entropy)
    gauss = lorafast.LoRALinear(11, 5, r=2, variant="ffa")
    with torch.no_grad():
        gauss.lora_A.normal_()
    with pytest.raises(ValueError, match="not lorafast's Kaiming-uniform"):
        implicit_noise(gauss, (x, y), lambda out, t: F.cross_entropy(out.mean(1), t))
