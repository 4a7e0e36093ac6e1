"""Per-client DP for k clients in one model: the per-sample kernel against float64, each
client's private gradient equal to a separate PrivacyEngine run for that client alone, a
noise draw for a client without samples, ε per client, the loader, and bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lorafast import MultiLoRALinear, _ops, clients, reference
from lorafast.dp import PrivacyEngine
from lorafast.dp.clients import ClientDPDataLoader
from support.common import backend_devices, backend_ids, fresh_seed, rel_err

K, IN, OUT, R = 3, 10, 4, 2


@pytest.mark.parametrize("backend_device", backend_devices("lora_linear_multi_bwd_ps"), ids=backend_ids)
@pytest.mark.parametrize("with_R", [False, True])
def test_per_sample_kernel_matches_float64(backend_device, with_R):
    """Sample i's slot holds its gradient of its own client's adapter (shuffled clients)."""
    backend, device = backend_device
    fresh_seed()
    n, T = 5, 3
    x, gy = torch.randn(n, T, IN, device=device), torch.randn(n, T, OUT, device=device)
    W = torch.randn(OUT, IN, device=device) / IN ** 0.5
    A, B = torch.randn(K, R, IN, device=device), torch.randn(K, OUT, R, device=device)
    Rm = torch.randn(K, R, R, device=device) if with_R else None
    ids = torch.tensor([2, 0, 2, 1, 0], device=device)
    scale = torch.tensor([0.5, 1.5, 2.0], device=device)
    rows, seg = _ops.client_segments(ids, T)
    h = torch.empty(n * T, R, device=device)
    for p, row in enumerate(rows.tolist()):   # h in client order: drop(x)[row] A_cᵀ
        h[p] = x.reshape(-1, IN)[row] @ A[seg[p]].T
    bufs = [torch.zeros(n, R, IN, device=device), torch.zeros(n, OUT, R, device=device),
            torch.zeros(n, R, R, device=device) if with_R else None]
    _ops.lora_linear_multi_bwd_ps(gy, x, W, A, B, Rm, h, rows, seg, scale, 0.0, 0, 0, False, *bufs, 0.5,
                                  backend=backend)
    for i, c in enumerate(ids.tolist()):
        hi = x[i].double() @ A[c].double().T
        want = reference.lora_linear_per_sample_grads(
            gy[i:i + 1].double(), x[i:i + 1].double(), A[c].double(), B[c].double(),
            Rm[c].double() if with_R else None, hi, batch=1, scaling=float(scale[c]), dropout_p=0.0, seed=0,
            offset=0, needs=(True, True, with_R))
        for buf, w in zip(bufs, want):
            if buf is not None:
                assert rel_err(buf[i], 0.5 * w[0]) < 1e-5, (i, c)


def _model():
    m = nn.Sequential(MultiLoRALinear(IN, OUT, K, r=R, lora_alpha=4))
    with torch.no_grad():
        m[0].lora_B.normal_()
    return m


def _datasets(sizes=(12, 8, 20)):
    return [TensorDataset(torch.randn(n, IN), torch.randint(0, OUT, (n,))) for n in sizes]


def test_each_client_equals_its_own_private_run():
    """One private step: client c's slice of every gradient is what make_private computes for
    client c alone (same samples, σ, C, E_c and noise key); a client without samples gets its
    noise alone."""
    fresh_seed()
    data = _datasets()
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine()
    model, dp_opt, loader = engine.make_private_clients(module=model, optimizer=opt, client_datasets=data,
                                                        expected_batch_size=[3, 2, 5], noise_multiplier=0.8,
                                                        max_grad_norm=0.7, noise_seed=1000, sampling_seed=4)
    (x, y), ids = next(iter(loader))
    keep = ids != 1           # client 1 sits this step out
    x, y, ids = x[keep], y[keep], ids[keep]
    with clients(model, ids):
        per = F.cross_entropy(model(x), y, reduction="none")
    counts = torch.bincount(ids, minlength=K).clamp_min(1).float()
    (torch.zeros(K).index_add_(0, ids, per) / counts).sum().backward()
    dp_opt.pre_step()
    layer = model[0]
    assert dp_opt.expected_batch_sizes == [3.0, 2.0, 5.0]

    for c in (0, 2):
        single = nn.Sequential(layer.client_layer(c))
        single[0].lora_A.requires_grad_(True)
        single[0].lora_B.requires_grad_(True)
        mine = ids == c
        solo = DataLoader(TensorDataset(x[mine], y[mine]), batch_size=int(dp_opt.expected_batch_sizes[c]))
        single_opt = torch.optim.SGD([single[0].lora_A, single[0].lora_B], lr=0.1)
        single, single_opt, _ = PrivacyEngine().make_private(module=single, optimizer=single_opt, data_loader=solo,
                                                             noise_multiplier=0.8, max_grad_norm=0.7,
                                                             poisson_sampling=False, noise_seed=1000 + c)
        F.cross_entropy(single(x[mine]), y[mine]).backward()
        single_opt.pre_step()
        assert rel_err(layer.lora_A.grad[c], single[0].lora_A.grad) < 1e-5, c
        assert rel_err(layer.lora_B.grad[c], single[0].lora_B.grad) < 1e-5, c

    D = R * IN + OUT * R
    noise = reference.normal_grid(1001, 0, 1, D)[0] * 0.8 * 0.7 / 2.0      # client 1: σ·C·ξ / E₁
    got = torch.cat([layer.lora_A.grad[1].flatten(), layer.lora_B.grad[1].flatten()])
    assert rel_err(got, noise) < 1e-6


def test_epsilon_per_client_follows_its_sampling_rate():
    data = _datasets((40, 40, 40))
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine()
    model, dp_opt, loader = engine.make_private_clients(module=model, optimizer=opt, client_datasets=data,
                                                        expected_batch_size=[2, 4, 8], noise_multiplier=1.0,
                                                        max_grad_norm=1.0, steps=3)
    assert loader.sample_rates == [0.05, 0.1, 0.2] and len(loader) == 3
    for (x, y), ids in loader:
        assert torch.equal(ids, ids.sort().values)        # client order
        with clients(model, ids):
            F.cross_entropy(model(x), y, reduction="sum").backward()
        dp_opt.step()
    eps = engine.client_epsilons(1e-5)
    assert eps[0] < eps[1] < eps[2] and engine.get_epsilon(1e-5) == eps[2]


def test_bad_input():
    engine = PrivacyEngine()
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="make_private_clients"):
        engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(_datasets()[0], batch_size=2),
                            noise_multiplier=1.0, max_grad_norm=1.0)
    kw = dict(module=model, optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="list of 3 datasets"):
        engine.make_private_clients(client_datasets=_datasets()[:2], expected_batch_size=2, **kw)
    with pytest.raises(ValueError, match=r"expected_batch_size\[1\] = 9 exceeds client 1's 8 samples"):
        engine.make_private_clients(client_datasets=_datasets(), expected_batch_size=[2, 9, 2], **kw)
    with pytest.raises(ValueError, match="noise_multiplier must be one value or a list of 3"):
        engine.make_private_clients(client_datasets=_datasets(), expected_batch_size=2,
                                    **(kw | dict(noise_multiplier=[1.0, 2.0])))
    shared = nn.Sequential(MultiLoRALinear(IN, OUT, K, r=R), nn.Linear(OUT, 2))
    opt2 = torch.optim.SGD(shared.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="shared by every client"):
        engine.make_private_clients(module=shared, optimizer=opt2, client_datasets=_datasets(),
                                    expected_batch_size=2, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="no MultiLoRALinear"):
        engine.make_private_clients(module=nn.Linear(2, 2), optimizer=opt, client_datasets=_datasets(),
                                    expected_batch_size=2, noise_multiplier=1.0, max_grad_norm=1.0)
    assert not any(hasattr(m, "_lorafast_grad_sample_store") for m in model.modules())
    with pytest.raises(ValueError, match=r"client_datasets\[1\] is empty"):
        ClientDPDataLoader([_datasets()[0], TensorDataset(torch.zeros(0, IN))], 2)


def test_gradient_accumulation_is_one_logical_batch():
    """Two backward passes before a step (each clipped with its own norms, one noise draw)
    give what one pass over both halves gives (loss_reduction="sum")."""
    fresh_seed()
    data = _datasets()
    grads = []
    for split in (False, True):
        torch.manual_seed(5)
        model = _model()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model, dp_opt, _ = PrivacyEngine().make_private_clients(
            module=model, optimizer=opt, client_datasets=data, expected_batch_size=2, noise_multiplier=0.5,
            max_grad_norm=0.3, noise_seed=7, loss_reduction="sum")
        x = torch.cat([d.tensors[0][:4] for d in data])
        y = torch.cat([d.tensors[1][:4] for d in data])
        ids = torch.arange(K).repeat_interleave(4)
        parts = [slice(0, 6), slice(6, 12)] if split else [slice(0, 12)]
        for s in parts:
            with clients(model, ids[s]):
                F.cross_entropy(model(x[s]), y[s], reduction="sum").backward()
        dp_opt.pre_step()
        grads.append(torch.cat([model[0].lora_A.grad.flatten(), model[0].lora_B.grad.flatten()]))
    assert rel_err(grads[1], grads[0]) < 1e-6
