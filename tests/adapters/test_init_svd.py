"""SVD-based adapter initialisations: lorafast.init.lora_xs_ (LoRA-XS) and lora_sb_ (LoRA-SB).

The references are computed independently in float64: the rank-r truncation of the base
weight (LoRA-XS), and, for LoRA-SB, autograd's gradient of the base weights of a plain copy
of the model (nn.Linear / Conv1D weights that require grad), weighted by batch size.
"""
import copy
import math

import pytest
import torch
from torch import nn

import lorafast
from lorafast import LoRALinear
from lorafast.init import lora_sb_, lora_xs_
from support.common import fresh_seed

IN, HID, OUT, T = 33, 47, 29, 7


# ------------------------------------------------------------------ helpers


def spectrum_weight(out_f, in_f, decay=0.7):
    """A random (out, in) weight with well-separated singular values σᵢ = decayⁱ / 2, so that
    its rank-r truncation is a well-conditioned function of it (no near-ties at σ_r)."""
    k = min(out_f, in_f)
    U, _ = torch.linalg.qr(torch.randn(out_f, k, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_f, k, dtype=torch.float64))
    s = 0.5 * decay ** torch.arange(k, dtype=torch.float64)
    return (U * s) @ V.T


def mlp(dims=(IN, HID, OUT), spectral=False):
    """Linear → Tanh → Linear (fp32) with odd sizes."""
    model = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.Tanh(), nn.Linear(dims[1], dims[2]))
    if spectral:
        with torch.no_grad():
            for i in (0, 2):
                model[i].weight.copy_(spectrum_weight(*model[i].weight.shape))
    return model


def truncate64(M, r):
    """Rank-r truncation U_r Σ_r V_rᵀ of M in float64, and all of M's singular values."""
    U, S, Vh = torch.linalg.svd(M.detach().double(), full_matrices=False)
    k = min(r, S.shape[0])
    return (U[:, :k] * S[:k]) @ Vh[:k], S


def assert_truncation(got, M, r, tag=""):
    """got (float64) is the rank-r truncation of M, to fp32 accuracy. The tolerance grows with
    the conditioning of the rank-r subspace, σ₁ / (σ_r − σ_{r+1}), since lorafast works in fp32."""
    trunc, S = truncate64(M, r)
    k = min(r, S.shape[0])
    gap = (S[k - 1] - S[k]).item() if k < S.shape[0] else S[k - 1].item()
    assert gap > 0, f"{tag}: degenerate reference spectrum {S[:k + 1].tolist()}"
    tol = 1e-5 * (1 + 2 * S[0].item() / gap)
    err = rel(got, trunc)
    assert err <= tol, f"{tag}: rank-{r} truncation: rel err {err:.3e} > {tol:.3e}"


def delta64(layer):
    """s·B·R·A of a LoRALinear in float64: the adapter's update of the (out, in) weight."""
    B, R, A = (t.detach().double() for t in (layer.lora_B, layer.lora_R, layer.lora_A))
    return layer.scaling * B @ R @ A


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def mse_loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def token_batches(sizes, in_f=IN, out_f=OUT, dtype=torch.float32):
    """Batches of (x, y): x (n, T, in) tokens, y (n, T, out) targets."""
    return [(torch.randn(n, T, in_f, dtype=dtype), torch.randn(n, T, out_f, dtype=dtype)) for n in sizes]


class CountingBatches:
    """An iterable over batches that records how many were taken."""

    def __init__(self, batches):
        self.batches, self.taken = list(batches), 0

    def __iter__(self):
        for b in self.batches:
            self.taken += 1
            yield b


def reference_delta(ref_model, weights, batches, loss_fn, lr, transpose=()):
    """ΔW = −lr·(1/n)Σ_b n_b ∇_W L_b in float64 by autograd, for each named weight of ref_model
    (a float64 copy with plain layers). Names in ``transpose`` are (in, out) Conv1D weights:
    their gradient is transposed to the (out, in) orientation."""
    params = {n: ref_model.get_parameter(n) for n in weights}
    for p in ref_model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    n_ex = 0
    for batch in batches:
        nb = batch[0].shape[0]
        grads = torch.autograd.grad(loss_fn(ref_model, batch), list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            total[n] += nb * g
        n_ex += nb
    out = {}
    for n, g in total.items():
        d = -lr * g / n_ex
        out[n] = d.T if n in transpose else d
    return out, n_ex


def as64(batches):
    return [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]


def assert_sb_factors(layer, ref_delta, tag=""):
    """s·B·R·A is the rank-r truncation of ref_delta (float64); B, A orthonormal; R diagonal,
    non-negative and sorted."""
    r = layer.r
    _, S = truncate64(ref_delta, r)
    k = min(r, S.shape[0])
    B, R, A = (t.detach().double() for t in (layer.lora_B, layer.lora_R, layer.lora_A))
    # singular values: well-conditioned whatever the gaps (Weyl)
    torch.testing.assert_close(layer.scaling * torch.diagonal(R)[:k], S[:k], rtol=1e-4, atol=1e-6 * S[0].item())
    assert_truncation(delta64(layer), ref_delta, r, tag=f"{tag}: s·B·R·A")
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(B[:, :k].T @ B[:, :k], eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(A[:k] @ A[:k].T, eye, atol=1e-5, rtol=0)
    assert torch.count_nonzero(R - torch.diag(torch.diagonal(R))) == 0, f"{tag}: R is not diagonal"
    d = torch.diagonal(R)
    assert (d >= 0).all(), f"{tag}: negative diagonal {d.tolist()}"
    assert (d[:-1] >= d[1:]).all(), f"{tag}: diagonal not sorted {d.tolist()}"


# ------------------------------------------------------------------ lora_xs_


@pytest.mark.parametrize("r, targets", [(3, ["0", "2"]), (40, ["0"])])   # 40: in (33) < r <= out (47)
def test_lora_xs_factors_are_the_truncated_svd(r, targets):
    fresh_seed()
    model = mlp(spectral=True)
    base = copy.deepcopy(model)
    lorafast.inject_adapters(model, targets, r=r, lora_alpha=7, variant="xs")
    assert lora_xs_(model) is model
    layers = adapters(model)
    assert set(layers) == set(targets)
    for name, layer in layers.items():
        W = base.get_submodule(name).weight.detach()
        assert torch.equal(layer.base_weight, W), "lora_xs_ changed the base weight"
        _, S = truncate64(W, r)
        k = min(r, S.shape[0])
        B, A = layer.lora_B.detach().double(), layer.lora_A.detach().double()
        assert B.shape == (W.shape[0], r) and A.shape == (r, W.shape[1])
        torch.testing.assert_close(B[:, :k].T @ B[:, :k], torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)
        assert_truncation(B @ A, W, r, tag=name)
        # A = Σ_r V_rᵀ: its row norms are the singular values
        torch.testing.assert_close(A[:k].norm(dim=1), S[:k], rtol=1e-5, atol=1e-7)
        if k < r:       # W has fewer singular vectors than r: the rest is zero padding
            assert torch.count_nonzero(B[:, k:]) == 0 and torch.count_nonzero(A[k:]) == 0
            torch.testing.assert_close(B @ A, W.double(), rtol=0, atol=1e-5)
        R = layer.lora_R.detach()
        assert R.shape == (r, r)
        assert 0 < R.abs().max().item() <= 6e-5, R.abs().max().item()


@pytest.mark.parametrize("variant", ["xs", "sb"])
def test_lora_xs_rank_above_out_features(variant):
    """r > out (> in is covered above): only out singular vectors exist; B and A are zero-padded."""
    fresh_seed()
    model = nn.Sequential(nn.Linear(11, 4))
    W = model[0].weight.detach().clone()
    lorafast.inject_adapters(model, ["0"], r=6, lora_alpha=6, variant=variant)
    lora_xs_(model, r_std=0.0)
    layer = model[0]
    assert torch.count_nonzero(layer.lora_B[:, 4:]) == 0 and torch.count_nonzero(layer.lora_A[4:]) == 0
    torch.testing.assert_close(layer.lora_B.detach().double() @ layer.lora_A.detach().double(), W.double(),
                               rtol=0, atol=1e-5)


def test_lora_sb_rank_above_out_features():
    fresh_seed()
    model = nn.Sequential(nn.Linear(11, 4), nn.Tanh())
    ref = copy.deepcopy(model).double()
    lorafast.inject_adapters(model, ["0"], r=6, lora_alpha=3, variant="sb")
    batches = token_batches([3, 4], in_f=11, out_f=4)
    lora_sb_(model, batches, mse_loss_fn, num_samples=7, lr=1e-2)
    deltas, _ = reference_delta(ref, ["0.weight"], as64(batches), mse_loss_fn, 1e-2)
    layer = model[0]
    err = rel(delta64(layer), deltas["0.weight"])
    assert err < 1e-4, err                                  # rank 4 < r: all of ΔW
    assert torch.count_nonzero(layer.lora_B[:, 4:]) == 0 and torch.count_nonzero(layer.lora_A[4:]) == 0
    assert torch.count_nonzero(layer.lora_R[4:]) == 0
    assert_sb_factors(layer, deltas["0.weight"], tag="0")


def test_lora_xs_r_std_scales_the_seeded_R():
    fresh_seed()
    model = mlp()
    lorafast.inject_adapters(model, ["0", "2"], r=3, lora_alpha=3, variant="xs")
    other = copy.deepcopy(model)
    lora_xs_(model)
    lora_xs_(other, r_std=1e-2)
    for name, layer in adapters(model).items():
        R, R2 = layer.lora_R.detach().double(), adapters(other)[name].lora_R.detach().double()
        torch.testing.assert_close(R2, 1e3 * R, rtol=1e-5, atol=0)
    # the two layers draw from different seeds
    r0, r2 = (m.lora_R.detach() for m in adapters(model).values())
    assert not torch.equal(r0, r2)
    # a second call gives the same R (seeded by layer.seed, not the global generator)
    before = {n: m.lora_R.detach().clone() for n, m in adapters(model).items()}
    torch.randn(5)
    lora_xs_(model)
    for n, m in adapters(model).items():
        assert torch.equal(m.lora_R, before[n])


def test_lora_xs_zero_std_keeps_the_base_output_and_only_R_trains():
    fresh_seed()
    model = mlp()
    base = copy.deepcopy(model)
    lorafast.inject_adapters(model, ["0", "2"], r=3, lora_alpha=5, variant="xs")
    x = torch.randn(4, T, IN)
    with torch.no_grad():
        y_placeholder = model(x)        # placeholder init (R = 0)
    lora_xs_(model, r_std=0.0)
    for layer in adapters(model).values():
        assert torch.count_nonzero(layer.lora_R) == 0
        assert torch.count_nonzero(layer.lora_B) > 0 and torch.count_nonzero(layer.lora_A) > 0
    with torch.no_grad():
        y = model(x)
    assert torch.equal(y, y_placeholder)
    torch.testing.assert_close(y, base(x), rtol=1e-6, atol=1e-6)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_R", "2.lora_R"}
    before = snapshot(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = (model(x) - torch.randn(4, T, OUT)).square().mean()
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) != k.endswith("lora_R"), k


def test_lora_xs_on_sb_layers_and_conv1d():
    """'sb' layers have an R too; GPT-2's Conv1D weight is (in, out): B·A must be the
    truncation of the (out, in) view."""
    transformers = pytest.importorskip("transformers")
    fresh_seed()
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    W = model.transformer.h[0].attn.c_attn.weight.detach().clone()     # (in=32, out=96)
    lorafast.inject_adapters(model, ["c_attn"], r=3, lora_alpha=6, variant="sb")
    lora_xs_(model, r_std=0.0)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_B.shape == (96, 3)
    assert_truncation(layer.lora_B.detach().double() @ layer.lora_A.detach().double(), W.T, 3, tag="c_attn")


@pytest.mark.parametrize("r_std", [-1e-5, float("nan"), float("inf"), "1e-5", True])
def test_lora_xs_rejects_bad_r_std(r_std):
    model = mlp()
    lorafast.inject_adapters(model, ["0"], r=3, variant="xs")
    before = snapshot(model)
    with pytest.raises(ValueError, match="r_std"):
        lora_xs_(model, r_std=r_std)
    assert_unchanged(model, before)


def test_lora_xs_needs_layers_with_R():
    model = mlp()
    lorafast.inject_adapters(model, ["0", "2"], r=3, variant="lora")
    before = snapshot(model)
    with pytest.raises(ValueError, match="variant 'xs' or 'sb'"):
        lora_xs_(model)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="variant 'xs' or 'sb'"):
        lora_xs_(mlp())             # no adapters at all


# ------------------------------------------------------------------ lora_sb_


def sb_model(r=3, lora_alpha=7, variant="sb"):
    model = mlp()
    ref = copy.deepcopy(model).double()
    lorafast.inject_adapters(model, ["0", "2"], r=r, lora_alpha=lora_alpha, variant=variant)
    return model, ref


def test_lora_sb_is_the_truncated_first_step_of_full_fine_tuning():
    fresh_seed()
    model, ref = sb_model()
    model.train()
    batches = token_batches([5, 3, 4, 6])
    it = CountingBatches(batches)
    lr = 3e-2
    assert lora_sb_(model, it, mse_loss_fn, num_samples=10, lr=lr) is model
    assert it.taken == 3, "a 4th batch was consumed after reaching num_samples"
    assert model.training

    deltas, n = reference_delta(ref, ["0.weight", "2.weight"], as64(batches[:3]), mse_loss_fn, lr)
    assert n == 12
    for name, layer in adapters(model).items():
        assert_sb_factors(layer, deltas[f"{name}.weight"], tag=name)
    # nothing but R, A, B changed
    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear):
            assert torch.equal(adapters(model)[name].base_weight.double(), m.weight.detach())


def test_lora_sb_weights_batches_by_size():
    """A mean of the per-batch means (ignoring batch sizes) is a different ΔW: the layer must
    match the size-weighted reference and not the unweighted one."""
    fresh_seed()
    model, ref = sb_model()
    lora_xs_(model, r_std=0.5)          # R ≠ 0 before: the gradient must still be taken at the base weights
    batches = token_batches([1, 6])
    lr = 1e-2
    lora_sb_(model, batches, mse_loss_fn, num_samples=7, lr=lr)
    weighted, _ = reference_delta(ref, ["0.weight"], as64(batches), mse_loss_fn, lr)
    g1, _ = reference_delta(ref, ["0.weight"], as64(batches[:1]), mse_loss_fn, lr)
    g2, _ = reference_delta(ref, ["0.weight"], as64(batches[1:]), mse_loss_fn, lr)
    unweighted = (g1["0.weight"] + g2["0.weight"]) / 2
    layer = adapters(model)["0"]
    assert_sb_factors(layer, weighted["0.weight"], tag="0")
    t_w, _ = truncate64(weighted["0.weight"], 3)
    t_u, _ = truncate64(unweighted, 3)
    assert rel(t_u, t_w) > 1e-2          # the two estimators differ here
    err = rel(delta64(layer), t_u)
    assert err > 1e-3, err


def test_lora_sb_rslora_and_rank_above_min_dim():
    """Layer "0" has in (5) < r (6) <= out (11): its factors are zero-padded and s·B·R·A is
    all of ΔW; layer "2" (11 → 7) is a proper truncation. The rsLoRA scaling must be
    divided out of R."""
    fresh_seed()
    model = nn.Sequential(nn.Linear(5, 11), nn.GELU(), nn.Linear(11, 7))
    ref = copy.deepcopy(model).double()
    lorafast.inject_adapters(model, ["0", "2"], r=6, lora_alpha=5, variant="sb", use_rslora=True)
    assert adapters(model)["0"].scaling == pytest.approx(5 / math.sqrt(6))
    batches = token_batches([3, 2], in_f=5, out_f=7)
    lr = 1e-2
    lora_sb_(model, batches, mse_loss_fn, num_samples=5, lr=lr)
    deltas, _ = reference_delta(ref, ["0.weight", "2.weight"], as64(batches), mse_loss_fn, lr)
    for name, layer in adapters(model).items():
        d = deltas[f"{name}.weight"]
        if name == "0":                                      # full rank: the truncation is ΔW itself
            k = min(d.shape)
            assert k == 5
            err = rel(delta64(layer), d)
            assert err < 1e-4, (name, err)
            assert torch.count_nonzero(layer.lora_B[:, k:]) == 0
            assert torch.count_nonzero(layer.lora_A[k:]) == 0
            assert torch.count_nonzero(layer.lora_R[k:]) == 0
        assert_sb_factors(layer, d, tag=name)


def gpt2_tiny():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def lm_loss_fn(model, batch):
    ids = batch[0]
    return model(input_ids=ids, labels=ids).loss


def test_lora_sb_on_gpt2_conv1d_uses_the_out_in_gradient():
    fresh_seed()
    model = gpt2_tiny()
    ref = copy.deepcopy(model).double()
    lorafast.inject_adapters(model, ["c_attn"], r=3, lora_alpha=5, variant="sb")
    batches = [(torch.randint(0, 64, (n, 11)),) for n in (4, 2, 3)]
    it = CountingBatches(batches)
    lr = 1e-1
    lora_sb_(model, it, lm_loss_fn, num_samples=6, lr=lr)
    assert it.taken == 2
    name = "transformer.h.0.attn.c_attn.weight"
    assert tuple(ref.get_parameter(name).shape) == (32, 96)          # Conv1D: (in, out)
    deltas, n = reference_delta(ref, [name], batches[:2], lm_loss_fn, lr, transpose={name})
    assert n == 6
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert tuple(deltas[name].shape) == (96, 32)
    assert_sb_factors(layer, deltas[name], tag="c_attn")


def weighted_loss64(model, batches):
    n = sum(b[0].shape[0] for b in batches)
    with torch.no_grad():
        return sum(b[0].shape[0] * mse_loss_fn(model, b).item() for b in batches) / n


def test_lora_sb_lowers_the_loss_on_its_batches():
    """To first order the loss falls by Σ_layers ‖T‖²/lr (T the truncated ΔW); with a small lr
    the actual fall (in float64) is close to that."""
    fresh_seed()
    model, ref = sb_model()
    batches = token_batches([6, 6])
    lr = 1e-3
    lora_sb_(model, batches, mse_loss_fn, num_samples=12, lr=lr)
    b64 = as64(batches)
    before = weighted_loss64(ref, b64)
    after = weighted_loss64(copy.deepcopy(model).double(), b64)
    deltas, _ = reference_delta(ref, ["0.weight", "2.weight"], b64, mse_loss_fn, lr)
    predicted = sum(truncate64(d, 3)[0].square().sum().item() for d in deltas.values()) / lr
    assert predicted > 0
    fall = before - after
    assert 0.5 * predicted < fall < 1.5 * predicted, (before, after, predicted)


def test_lora_sb_leaves_grad_fields_alone():
    fresh_seed()
    model, _ = sb_model()
    marker = torch.randn(3, 3)
    adapters(model)["2"].lora_R.grad = marker.clone()
    lora_sb_(model, token_batches([4]), mse_loss_fn, num_samples=4)
    for n, p in model.named_parameters():
        if n == "2.lora_R":
            assert torch.equal(p.grad, marker)
        else:
            assert p.grad is None, n
    for layer in adapters(model).values():
        assert not layer._forward_hooks, "lora_sb_ left a forward hook behind"


def test_lora_sb_warns_when_batches_run_out():
    fresh_seed()
    model, ref = sb_model()
    batches = token_batches([5, 3])
    lr = 1e-2
    with pytest.warns(UserWarning, match="ran out"):
        lora_sb_(model, batches, mse_loss_fn, num_samples=100, lr=lr)
    deltas, n = reference_delta(ref, ["0.weight", "2.weight"], as64(batches), mse_loss_fn, lr)
    assert n == 8
    for name, layer in adapters(model).items():
        assert_sb_factors(layer, deltas[f"{name}.weight"], tag=name)


@pytest.mark.parametrize("kwargs", [dict(num_samples=0), dict(num_samples=-3), dict(num_samples=2.5),
                                    dict(lr=0.0), dict(lr=-1e-3), dict(lr=float("nan")), dict(lr=float("inf")),
                                    dict(loss_fn="mse")], ids=str)
def test_lora_sb_rejects_bad_arguments(kwargs):
    fresh_seed()
    model, _ = sb_model()
    lora_xs_(model, r_std=1e-2)         # R ≠ 0, so that a reset of R would show
    before = snapshot(model)
    it = CountingBatches(token_batches([4, 4]))
    kw = dict(loss_fn=mse_loss_fn)
    kw.update(kwargs)
    loss_fn = kw.pop("loss_fn")
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        lora_sb_(model, it, loss_fn, **kw)
    assert_unchanged(model, before)
    assert it.taken == 0


def test_lora_sb_needs_trainable_layers_with_R():
    fresh_seed()
    model, _ = sb_model(variant="lora")
    before = snapshot(model)
    with pytest.raises(ValueError, match="variant 'xs' or 'sb'"):
        lora_sb_(model, token_batches([4]), mse_loss_fn)
    assert_unchanged(model, before)

    model, _ = sb_model(variant="xs")       # xs layers work too
    lora_sb_(model, token_batches([4]), mse_loss_fn, num_samples=4)

    model, _ = sb_model()
    adapters(model)["0"].lora_R.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="frozen"):
        lora_sb_(model, token_batches([4]), mse_loss_fn, num_samples=4)
    assert_unchanged(model, before)


def test_lora_sb_restores_R_when_loss_fn_fails():
    fresh_seed()
    model, _ = sb_model()
    lora_xs_(model, r_std=1e-2)
    before = snapshot(model)

    class Boom(RuntimeError):
        pass

    calls = []

    def failing(model, batch):
        calls.append(1)
        if len(calls) == 2:
            # R is zero while the gradient is taken
            assert all(torch.count_nonzero(m.lora_R) == 0 for m in adapters(model).values())
            raise Boom("loss failed")
        return mse_loss_fn(model, batch)

    with pytest.raises(Boom):
        lora_sb_(model, token_batches([3, 3, 3]), failing, num_samples=9)
    assert len(calls) == 2
    assert_unchanged(model, before)
    for layer in adapters(model).values():
        assert not layer._forward_hooks and layer.lora_R.grad is None
    # and the model still works: a later lora_sb_ runs normally
    lora_sb_(model, token_batches([3]), mse_loss_fn, num_samples=3)
    assert not torch.equal(adapters(model)["0"].lora_R, before["0.lora_R"])


def test_lora_sb_with_no_examples_restores_R():
    fresh_seed()
    model, _ = sb_model()
    lora_xs_(model, r_std=1e-2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="no examples"):
        lora_sb_(model, [], mse_loss_fn)
    assert_unchanged(model, before)
