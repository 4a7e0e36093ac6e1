"""lora_linear_multi (k clients' adapters over one base) on every backend present: each
sample gets lora_linear with its client's adapter, against float64 per-sample truth; the
spec against lora_linear itself; dropout masks; empty clients; bad input."""
import pytest
import torch

import lorafast
from lorafast import _ops, reference
from support.common import DTYPES, assert_close, backend_devices, backend_ids, fresh_seed, rel_err
from support.lora_inputs import TRAINS, baseline_forward, make_x


@pytest.fixture(params=backend_devices("lora_linear_multi_fwd"), ids=backend_ids)
def backend_device(request):
    return request.param


def make_stack(k, in_f, out_f, r, dtype, device, *, variant="lora", bias=True):
    """Stacked adapters (k, ·, ·) fp32, random (B never zero), the base in dtype."""
    p = dict(
        weight=(torch.randn(out_f, in_f) / in_f ** 0.5).to(device, dtype),
        A=(torch.randn(k, r, in_f) / in_f ** 0.5).to(device),
        B=torch.randn(k, out_f, r).to(device),
        R=torch.randn(k, r, r).to(device) if variant == "xs" else None,
        bias=torch.randn(out_f).to(device, dtype) if bias else None,
    )
    for name in TRAINS[variant]:
        p[name].requires_grad_(True)
    return p


def client(p, c):
    """Client c's lora_linear parameters: views of the stacks (gradients reach them)."""
    R = p["R"][c] if p["R"] is not None else None
    return dict(weight=p["weight"], bias=p["bias"], A=p["A"][c], B=p["B"][c], R=R)


def per_sample(fn, x, p, ids, scales):
    """Sample by sample with its client's adapter: what lora_linear_multi must equal."""
    return torch.stack([fn(x[i], client(p, int(c)), float(scales[int(c)])) for i, c in enumerate(ids)])


def grads_of(y, x, p, gy):
    names = [n for n in ("x", "A", "B", "R") if (x if n == "x" else p[n]) is not None
             and (x if n == "x" else p[n]).requires_grad]
    leaves = [x if n == "x" else p[n] for n in names]
    return dict(zip(names, torch.autograd.grad(y, leaves, gy)))


def float64(x, p):
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    p64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in p.items()}
    return x64, p64


def multi(backend, x, p, ids, scaling, **kw):
    return lorafast.lora_linear_multi(x, p["weight"], p["A"], p["B"], p["bias"], client_ids=ids, scaling=scaling,
                                      lora_R=p["R"], backend=backend, **kw)


def single(x, q, s):
    return reference.lora_linear(x, q["weight"], q["A"], q["B"], q["bias"], scaling=s, lora_R=q["R"])


SHAPES = [  # (x layout, in, out, r, k)
    ("3d", 33, 47, 3, 3),
    ("strided", 40, 24, 1, 2),
    ("transposed", 17, 33, 5, 4),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["lora", "ffa", "xs"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-in{s[1]}-out{s[2]}-r{s[3]}-k{s[4]}")
def test_each_client_gets_lora_linear(backend_device, dtype, variant, shape):
    """Outputs and gradients against float64 per-sample lora_linear, clients shuffled, one
    client without samples, per-client scales."""
    backend, device = backend_device
    fresh_seed()
    case, in_f, out_f, r, k = shape
    x = make_x(case, in_f, dtype, device)
    if case == "3d":
        x = torch.randn(6, 5, in_f).to(device, dtype)
    x.requires_grad_(True)
    batch = x.shape[0]
    ids = torch.randint(0, k - 1, (batch,), device=device)     # client k-1 has no samples
    ids[torch.randperm(batch)[:2]] = torch.tensor([0, k - 2], device=device)
    scales = torch.rand(k) + 0.25
    p = make_stack(k, in_f, out_f, r, dtype, device, variant=variant)
    gy = torch.randn(*x.shape[:-1], out_f, device=device).to(dtype)

    y = multi(backend, x, p, ids, scales.to(device))
    got = grads_of(y, x, p, gy)
    y_base = per_sample(lambda xi, q, s: baseline_forward(xi, q, s), x, p, ids, scales)
    base = grads_of(y_base, x, p, gy)
    x64, p64 = float64(x, p)
    y_ref = per_sample(single, x64, p64, ids, scales.double())
    ref = grads_of(y_ref, x64, p64, gy.double())

    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close("y", y, y_ref, y_base, dtype)
    for name, g in got.items():
        assert g.shape == ref[name].shape, name
        assert_close(f"d{name}", g, ref[name], base[name], dtype)
    for name in ("A", "B", "R"):   # no samples, no gradient
        if name in got:
            assert torch.count_nonzero(got[name][k - 1]) == 0, name


def test_spec_is_lora_linear_per_client():
    """reference.lora_linear_multi_forward/backward: client c's rows get lora_linear_forward and
    lora_linear_backward with its adapter, in float64."""
    fresh_seed()
    k, M, in_f, out_f, r = 3, 11, 9, 7, 2
    x = torch.randn(M, in_f, dtype=torch.float64)
    W = torch.randn(out_f, in_f, dtype=torch.float64)
    A, B, R = (torch.randn(k, *s, dtype=torch.float64) for s in ((r, in_f), (out_f, r), (r, r)))
    b = torch.randn(out_f, dtype=torch.float64)
    clients = torch.randint(0, k, (M,))
    s = torch.rand(k, dtype=torch.float64)
    y, h = reference.lora_linear_multi_forward(x, W, A, B, b, R, row_clients=clients, scaling=s)
    G = torch.randn(M, out_f, dtype=torch.float64)
    needs = (True, True, True, True, True)
    dx, dA, dB, dR, db = reference.lora_linear_multi_backward(G, x, W, A, B, R, h, row_clients=clients, scaling=s,
                                                              dropout_p=0.0, seed=0, offset=0, needs=needs)
    assert torch.allclose(db, G.sum(0))
    for c in range(k):
        rows = clients == c
        yc, hc = reference.lora_linear_forward(x[rows], W, A[c], B[c], b, R[c], scaling=float(s[c]))
        assert torch.allclose(y[rows], yc) and torch.allclose(h[rows], hc)
        g = reference.lora_linear_backward(G[rows], x[rows], W, A[c], B[c], R[c], hc, scaling=float(s[c]),
                                           dropout_p=0.0, seed=0, offset=0, needs=needs)
        assert torch.allclose(dx[rows], g[0])
        for got, want in zip((dA[c], dB[c], dR[c]), g[1:4]):
            assert torch.allclose(got, want)


def test_dropout_mask_is_the_whole_batchs(backend_device):
    """With one client, lora_linear_multi is lora_linear, dropout mask included (the mask of
    each row of the batch, whatever its client); with several, each backend draws the
    spec's mask."""
    backend, device = backend_device
    fresh_seed()
    x = torch.randn(4, 3, 12, device=device, requires_grad=True)
    p = make_stack(1, 12, 10, 3, torch.float32, device)
    gy = torch.randn(4, 3, 10, device=device)
    y = multi(backend, x, p, torch.zeros(4, dtype=torch.int64, device=device), 0.5, dropout_p=0.4, seed=123)
    y1 = lorafast.lora_linear(x, p["weight"], p["A"][0], p["B"][0], p["bias"], scaling=0.5, dropout_p=0.4, seed=123,
                              backend="torch")
    assert rel_err(y, y1) < 1e-5
    ga, gb = grads_of(y, x, p, gy), grads_of(y1, x, p, gy)
    for name in ga:
        assert rel_err(ga[name], gb[name]) < 1e-5, name

    k = 3
    p = make_stack(k, 12, 10, 3, torch.float32, device)
    ids = torch.tensor([2, 0, 1, 2], device=device)
    y = multi(backend, x, p, ids, 0.5, dropout_p=0.4, seed=9)
    ref = multi("torch", x, p, ids, 0.5, dropout_p=0.4, seed=9)
    assert rel_err(y, ref) < 1e-5
    ga, gb = grads_of(y, x, p, gy), grads_of(ref, x, p, gy)
    for name in ga:
        assert rel_err(ga[name], gb[name]) < 1e-5, name


def test_client_order_and_segments():
    """client_segments: positions in client order, samples' rows together, stable within a client."""
    ids = torch.tensor([1, 0, 1, 2, 0])
    rows, seg = _ops.client_segments(ids, 2)
    assert seg.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert rows.tolist() == [2, 3, 8, 9, 0, 1, 4, 5, 6, 7]


def test_compiles_without_graph_breaks():
    p = make_stack(2, 8, 6, 2, torch.float32, "cpu")
    x = torch.randn(3, 4, 8)
    ids = torch.tensor([1, 0, 1])

    def f(x, A, B, ids):
        return lorafast.lora_linear_multi(x, p["weight"], A, B, p["bias"], client_ids=ids, scaling=0.5,
                                          backend="torch")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, p["A"], p["B"], ids), f(x, p["A"], p["B"], ids), atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(client_ids=torch.tensor([0, 3, 1])), r"client_ids must be in \[0, 3\)"),
    (dict(client_ids=torch.tensor([0, -1, 1])), r"client_ids must be in \[0, 3\)"),
    (dict(client_ids=torch.tensor([0, 1])), r"client_ids must be \(batch,\)=\(3,\)"),
    (dict(client_ids=torch.tensor([[0, 1, 2]])), r"client_ids must be \(batch,\)"),
    (dict(client_ids=torch.tensor([0.0, 1.0, 2.0])), "client_ids must be int64"),
    (dict(client_ids=[0, 1, 2]), "client_ids must be a"),
    (dict(scaling=torch.ones(2)), r"scaling must be a number or a \(3,\)"),
    (dict(lora_B=torch.zeros(2, 6, 2)), "lora_B must stack the same 3 clients"),
    (dict(lora_A=torch.zeros(2, 8)), "lora_A must be 3-D"),
])
def test_bad_input_names_the_argument(bad, match):
    p = make_stack(3, 8, 6, 2, torch.float32, "cpu")
    kw = dict(x=torch.randn(3, 4, 8), weight=p["weight"], lora_A=p["A"], lora_B=p["B"], bias=p["bias"],
              client_ids=torch.tensor([0, 2, 1]), scaling=0.5)
    kw.update(bad)
    before = {name: t.clone() for name, t in kw.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError, match=match):
        lorafast.lora_linear_multi(**kw)
    for name, t in before.items():
        assert torch.equal(kw[name], t), f"{name} was modified"
