"""Backend selection, input validation, opcheck and torch.compile."""
import pytest
import torch

import lorafast
from lorafast import _backend, _ops
from support.lora_inputs import make_params


def call(x, p, **kw):
    return lorafast.lora_linear(x, p["weight"], p["A"], p["B"], p["bias"], lora_R=p["R"], **kw)


# ------------------------------------------------------------------ backends

def test_available_backends():
    names = lorafast.available_backends()
    assert names[0] == "torch" and set(names) <= {"torch", "triton", "cuda"}


def test_automatic_selection_never_picks_the_interpreter():
    assert _backend.select("privatize", torch.device("cpu"), torch.float32) == "torch"
    assert _backend.select("privatize", torch.device("cpu"), torch.float64) == "torch"


def test_precedence_argument_override_env(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LORAFAST_BACKEND", "torch")
    assert _backend.select("privatize", cpu, torch.float32) == "torch"
    if "triton" in lorafast.available_backends() and not torch.cuda.is_available():
        monkeypatch.setenv("LORAFAST_BACKEND", "triton")
        assert _backend.select("privatize", cpu, torch.float32) == "triton"
        with lorafast.use_backend("torch"):
            assert _backend.select("privatize", cpu, torch.float32) == "torch"
            assert _backend.select("privatize", cpu, torch.float32, "triton") == "triton"
        assert _backend.select("privatize", cpu, torch.float32) == "triton"
    monkeypatch.setenv("LORAFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LORAFAST_BACKEND"):
        _backend.select("privatize", cpu, torch.float32)


def test_set_backend_roundtrip():
    lorafast.set_backend("torch")
    try:
        assert _backend.requested() == "torch"
    finally:
        lorafast.set_backend(None)
    assert _backend._override is None
    with pytest.raises(ValueError, match="backend"):
        lorafast.set_backend("tpu")


def test_explicit_backend_refuses_what_it_cannot_run():
    p = make_params(8, 6, 2, torch.float64, "cpu")
    x = torch.randn(3, 8, dtype=torch.float64)
    if "triton" in lorafast.available_backends():
        with pytest.raises(ValueError, match="float64"):
            call(x, p, backend="triton")
    with pytest.raises(RuntimeError, match="cuda"):
        call(x, p, backend="cuda")
    assert call(x, p, backend="torch").dtype == torch.float64


# ------------------------------------------------------------------ validation

def _valid():
    p = make_params(33, 47, 3, torch.float32, "cpu", variant="xs")
    return torch.randn(4, 33), p


@pytest.mark.parametrize("mutate,argname", [
    (lambda x, p: p.update(weight=p["weight"].clone().requires_grad_(True)), "weight"),
    (lambda x, p: p.update(weight=torch.randn(47, 34)), "x"),
    (lambda x, p: p.update(A=torch.randn(3, 34)), "lora_A"),
    (lambda x, p: p.update(A=torch.randn(0, 33), B=torch.randn(47, 0), R=None), "lora_A"),
    (lambda x, p: p.update(B=torch.randn(46, 3)), "lora_B"),
    (lambda x, p: p.update(B=torch.randn(47, 2)), "lora_B"),
    (lambda x, p: p.update(R=torch.randn(3, 2)), "lora_R"),
    (lambda x, p: p.update(bias=torch.randn(46)), "bias"),
    (lambda x, p: p.update(A=torch.randn(3, 33, 1)), "lora_A"),
    (lambda x, p: p.update(weight=p["weight"].half()), "weight"),
    (lambda x, p: p.update(A=torch.randint(0, 3, (3, 33))), "lora_A"),
])
def test_bad_input_raises_value_error_naming_the_argument(mutate, argname):
    x, p = _valid()
    mutate(x, p)
    with pytest.raises(ValueError, match=argname):
        call(x, p, scaling=0.5)


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0, 1.5])
def test_bad_dropout(dropout_p):
    x, p = _valid()
    with pytest.raises(ValueError, match="dropout_p"):
        call(x, p, dropout_p=dropout_p)


def test_bad_scaling():
    x, p = _valid()
    with pytest.raises(ValueError, match="scaling"):
        call(x, p, scaling=float("nan"))


def test_refused_input_modifies_nothing():
    x, p = _valid()
    before = {k: v.clone() for k, v in p.items() if v is not None}
    p["bias"] = torch.randn(46)
    with pytest.raises(ValueError):
        call(x, p)
    for k, v in before.items():
        if k != "bias":
            assert torch.equal(p[k], v) and p[k].grad is None


# ------------------------------------------------------------------ torch.library

def _op_args(backend, dropout_p, with_r):
    p = make_params(13, 9, 3, torch.float32, "cpu", variant="xs" if with_r else "lora", bias_grad=True)
    x = torch.randn(2, 5, 13, requires_grad=True)
    return (x, p["weight"], p["A"], p["B"], p["bias"], p["R"], 0.5, dropout_p, 17, 0, backend)


@pytest.mark.parametrize("with_r", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck(backend_device, dropout_p, with_r):
    backend, device = backend_device
    if device != "cpu":
        pytest.skip("opcheck on CPU tensors")
    torch.library.opcheck(_ops.REGISTERED["lora_linear_fwd"], _op_args(backend, dropout_p, with_r))


def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    p = make_params(13, 9, 3, torch.float32, device, variant="xs", bias_grad=True)
    x = torch.randn(2, 5, 13, device=device, requires_grad=True)

    def f(x, A, B, R, b):
        return lorafast.lora_linear(x, p["weight"], A, B, b, scaling=0.5, lora_R=R, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    args = (x, p["A"], p["B"], p["R"], p["bias"])
    out_c = compiled(*args)
    g_c = torch.autograd.grad(out_c, [x, p["R"], p["bias"]])
    out_e = f(*args)
    g_e = torch.autograd.grad(out_e, [x, p["R"], p["bias"]])
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)
