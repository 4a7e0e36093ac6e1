"""DP-SGD on a QLoRA model (QLoRALinear over bitsandbytes bases): the engine's per-sample
gradients against float64 torch.func on the dequantised weights, the clipped and noised step,
the quantised weights left alone, and the same run as a dense LoRALinear model built on the
dequantised weights: DP works unchanged over a quantised base."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorafast  # noqa: F401  (before bitsandbytes: it sets up the Triton interpreter)
from lorafast import reference
from lorafast.dp import PrivacyEngine
from lorafast.qlora import QLoRALinear
from support.common import fresh_seed
from support.dp_models import clipped_mean, per_sample_grads
from support.qlora_models import assert_packed_equal, dequantised, packed_state, quantised_linear

BACKENDS = [b for b in ("torch", "triton") if b in lorafast.available_backends()]
D_IN, D_HID, N_CLASSES, T = 64, 128, 3, 4


class Net(nn.Module):
    """Two adapted layers (over a quantised or a dense base) and a trainable head."""

    def __init__(self, l1, l2, head):
        super().__init__()
        self.l1, self.l2, self.head = l1, l2, head

    def forward(self, x):            # x (N, T, D_IN)
        h = torch.tanh(self.l1(x))
        return self.head(torch.tanh(self.l2(h)).mean(1))


def qlora_and_dense(compute_dtype=torch.float32):
    """(a QLoRA Net, the same Net with LoRALinear layers on the dequantised weights): the
    same adapters, biases and head, B non-zero. l1 is NF4 with double quantisation, l2 FP4."""
    q1 = QLoRALinear.from_linear(quantised_linear(D_IN, D_HID, "nf4", True, compute_dtype), r=4, lora_alpha=8)
    q2 = QLoRALinear.from_linear(quantised_linear(D_HID, D_IN, "fp4", False, compute_dtype), r=2, lora_alpha=3)
    with torch.no_grad():
        for q in (q1, q2):
            q.lora_B.normal_(0, 0.3)
    qnet = Net(q1, q2, nn.Linear(D_IN, N_CLASSES))
    dense = []
    for q in (q1, q2):
        d = lorafast.LoRALinear(q.in_features, q.out_features, r=q.r, lora_alpha=q.lora_alpha)
        with torch.no_grad():
            d.weight.copy_(dequantised(q, compute_dtype))     # what the QLoRA layer computes on
            d.bias.copy_(q.bias)
            d.lora_A.copy_(q.lora_A)
            d.lora_B.copy_(q.lora_B)
        dense.append(d)
    head = nn.Linear(D_IN, N_CLASSES)
    head.load_state_dict(qnet.head.state_dict())
    return qnet, Net(*dense, head)


def batch(n):
    return torch.randn(n, T, D_IN), torch.randint(0, N_CLASSES, (n,))


def private(model, *, noise=0.0, C=1.0, seed=None, backend=None, lr=0.0, n=8):
    x, y = batch(4 * n)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    engine = PrivacyEngine()
    model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y),
                                                                                            batch_size=n),
                                        noise_multiplier=noise, max_grad_norm=C, poisson_sampling=False,
                                        noise_seed=seed, backend=backend)
    return engine, model, opt


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def engine_per_sample(opt, n):
    """{name: (N, *shape)} the engine's per-sample gradients of the sealed backward pass."""
    store = opt.store
    assert store.state == "sealed" and store.buf.shape == (n, store.width)
    return {name: store.buf[:, a:b].reshape(n, *p.shape)
            for name, p, a, b in zip(opt.parameter_names, store.params, store.segments[:-1], store.segments[1:])}


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_grads_equal_float64_on_the_dequantised_weight(backend):
    fresh_seed()
    qnet, dense = qlora_and_dense()
    x, y = batch(6)
    truth = per_sample_grads(dense, x, y)          # torch.func, float64, on deq(W)
    assert set(truth) == {"l1.lora_A", "l1.lora_B", "l2.lora_A", "l2.lora_B", "head.weight", "head.bias"}
    packed = {n: packed_state(getattr(qnet, n)) for n in ("l1", "l2")}
    _, qnet, opt = private(qnet, C=0.05, backend=backend, n=6)
    assert opt.parameter_names == list(truth)
    F.cross_entropy(qnet(x), y).backward()
    got = engine_per_sample(opt, 6)
    for name, want in truth.items():
        assert want.abs().max() > 0, name
        for i in range(6):
            err = _rel(got[name][i], want[i])
            assert err < 5e-5, f"{name}[{i}]: rel err {err:.2e}"
    opt.step()                                     # clipped (C small), no noise: the float64 clipped mean
    want = clipped_mean(truth, 0.05, 6)
    for name, p in qnet.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, want[name]) < 5e-5, name
    for n in ("l1", "l2"):
        assert_packed_equal(getattr(qnet, n), packed[n])
        assert getattr(qnet, n).weight.grad is None


def test_per_sample_grads_with_bf16_compute():
    """compute_dtype bfloat16: x and deq(W) in bf16, adapters in fp32; against float64 on the
    bf16 dequantised weight, within bf16's error."""
    fresh_seed()
    qnet, dense = qlora_and_dense(torch.bfloat16)
    x, y = batch(5)
    truth = per_sample_grads(dense, x.bfloat16().float(), y)
    _, qnet, opt = private(qnet, C=100.0, n=5)
    F.cross_entropy(qnet(x), y).backward()
    got = engine_per_sample(opt, 5)
    for name, want in truth.items():
        err = _rel(got[name], want)
        assert err < 3e-2, f"{name}: rel err {err:.2e}"


def test_noisy_private_steps_match_the_dense_model_and_leave_the_base_quantised():
    """Three clipped, noised steps (σ = 1.3, the same noise seed) over a QLoRA model and over
    the dense model on its dequantised weights: the same gradients, noise and adapters; the
    packed weights do not change; the noise is σC·ξ/E with ξ the Philox normals of the seed."""
    fresh_seed()
    qnet, dense = qlora_and_dense()
    packed = {n: packed_state(getattr(qnet, n)) for n in ("l1", "l2")}
    biases = {n: getattr(qnet, n).bias.detach().clone() for n in ("l1", "l2")}
    reference_net = copy.deepcopy(dense)                  # not private: torch.func's truth runs on it
    sigma, C, seed = 1.3, 0.5, 1234
    eq, qnet, q_opt = private(qnet, noise=sigma, C=C, seed=seed, lr=0.1)
    ed, dense, d_opt = private(dense, noise=sigma, C=C, seed=seed, lr=0.1)
    D = q_opt.store.width
    for step in range(3):
        x, y = batch(8)
        reference_net.load_state_dict(dense.state_dict())   # the adapters before this step
        truth = per_sample_grads(reference_net, x, y)
        for model, opt in ((qnet, q_opt), (dense, d_opt)):
            F.cross_entropy(model(x), y).backward()
            opt.step()
        q_grad = torch.cat([p.grad.flatten() for p in q_opt.store.params])
        d_grad = torch.cat([p.grad.flatten() for p in d_opt.store.params])
        torch.testing.assert_close(q_grad, d_grad, rtol=1e-5, atol=1e-6)
        clean = torch.cat([v.flatten() for v in clipped_mean(truth, C, 8).values()]).float()
        xi = reference.normal_grid(seed, step * reference.philox_calls(1, D), 1, D)[0]
        torch.testing.assert_close(q_grad - clean, sigma * C * xi / 8, rtol=1e-4, atol=1e-5)
        q_opt.zero_grad()
        d_opt.zero_grad()
    for name, p in dense.named_parameters():
        if p.requires_grad:
            q = dict(qnet.named_parameters())[name]
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    for n in ("l1", "l2"):
        layer = getattr(qnet, n)
        assert_packed_equal(layer, packed[n])
        assert torch.equal(layer.bias, biases[n])
        assert type(layer.weight).__name__ == "Params4bit"
    assert eq.get_epsilon(1e-5) == pytest.approx(ed.get_epsilon(1e-5)) and eq.get_epsilon(1e-5) > 0
