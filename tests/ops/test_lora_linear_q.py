"""lora_linear_q (QLoRA: the LoRA linear over a bitsandbytes-quantised frozen base) on every
backend present, the scratch path (dequantise, then the LoRA linear) and the fused one
(fused=True: the Triton GEMM decodes W's tiles), against the float64 reference applied to
``reference.dequantize(qw, x.dtype)``; the FedEx correction; which gradients are formed;
torch.library.opcheck of ``lorafast::lora_linear_q_fwd`` / ``lora_linear_q_bwd``."""
import types

import pytest
import torch

import lorafast  # noqa: F401  (before bitsandbytes: it sets up the Triton interpreter)
from lorafast import _ops, quant, reference
from support.common import ATOL, DTYPES, assert_close, backend_devices, fresh_seed, rel_err
from support.lora_inputs import assert_matches_reference, baseline_forward, leaves, make_params, make_x, truth

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402


def _q_backends():
    """(backend, device, fused): every backend of the op on the scratch path, and Triton fused."""
    pairs = backend_devices("lora_linear_q_fwd")
    return [(b, d, False) for b, d in pairs] + [(b, d, True) for b, d in pairs if b == "triton"]


def _q_id(case):
    backend, device, fused = case
    return f"{'fused' if fused else backend}-{device}"


@pytest.fixture(params=_q_backends(), ids=_q_id)
def q_backend(request):
    return request.param


@pytest.fixture(params=[c for c in _q_backends() if not c[2]], ids=_q_id)
def scratch_backend(request):
    """The backends of the scratch path (the only one that takes a FedEx correction)."""
    return request.param


def make_qw(kind, out_f, in_f, device, *, nested=True, blocksize=64):
    """A QuantWeight of a random (out, in) weight, from bitsandbytes' own quantisation:
    kind "nf4" / "fp4" (quantize_4bit, read by quant.quant_weight from a stand-in layer) or
    "int8" (a Linear8bitLt quantised by .to("cpu"))."""
    w = torch.randn(out_f, in_f) / in_f ** 0.5
    if kind == "int8":
        m = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
        m.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        qw = quant.quant_weight(m.to("cpu"))
    else:
        packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=kind)
        layer = types.SimpleNamespace(weight=types.SimpleNamespace(data=packed, quant_state=state),
                                      out_features=out_f, in_features=in_f)
        qw = quant.quant_weight(layer)
    return qw._replace(**{f: getattr(qw, f).to(device) for f in qw._fields[:6] if getattr(qw, f) is not None})


def q_fn(qw, backend, fused, scaling, dropout_p=0.0, seed=None, correction=None):
    def fn(x, p):
        return _ops.lora_linear_q(x, qw, p["A"], p["B"], p["bias"], scaling=scaling, lora_R=p["R"],
                                  dropout_p=dropout_p, correction=correction, fused=fused, backend=backend, seed=seed)
    return fn


def run(fn, x, p, gy):
    y = fn(x, p)
    ls = leaves(x, p)
    grads = torch.autograd.grad(y, [t for _, t in ls], gy) if ls else ()
    return y, {n: g for (n, _), g in zip(ls, grads)}


def check_against_reference(fn, x, p, gy, s, dtype, dropout_p=0.0, seed=0):
    """fn's y and gradients against the float64 reference on p["weight"] (the dequantised base),
    within the tolerance table of PyTorch's own error in dtype."""
    y, grads = run(fn, x, p, gy)
    assert_matches_reference(y, grads, x, p, truth(x, p, s, gy, dropout_p, seed),
                             run(lambda x, p: baseline_forward(x, p, s, dropout_p, seed), x, p, gy), dtype)
    return y, grads


CASES = [  # (x layout, quant kind, nested, blocksize, in, out, r, variant, bias, bias trains)
    ("2d", "nf4", True, 32, 33, 47, 3, "lora", True, True),
    ("3d", "fp4", False, 64, 71, 47, 1, "xs", False, False),
    ("strided", "int8", False, None, 33, 47, 3, "ffa", True, False),
    ("transposed", "nf4", False, 128, 71, 47, 3, "xs", True, True),
    ("3d", "fp4", True, 256, 33, 47, 1, "lora", True, False),
]


def _case_id(c):
    q = c[1] if c[1] == "int8" else f"{c[1]}{'-nested' if c[2] else ''}-b{c[3]}"
    return f"{c[0]}-{q}-in{c[4]}-out{c[5]}-r{c[6]}-{c[7]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(q_backend, dtype, case):
    backend, device, fused = q_backend
    fresh_seed()
    layout, kind, nested, block, in_f, out_f, r, variant, bias, bias_grad = case
    qw = make_qw(kind, out_f, in_f, device, nested=nested, blocksize=block)
    x = make_x(layout, in_f, dtype, device).requires_grad_(True)
    p = make_params(in_f, out_f, r, dtype, device, variant=variant, bias=bias, bias_grad=bias_grad)
    p["weight"] = reference.dequantize(qw, dtype)     # what the reference computes on
    gy = torch.randn((*x.shape[:-1], out_f), device=device).to(dtype)
    check_against_reference(q_fn(qw, backend, fused, 0.75), x, p, gy, 0.75, dtype)
    for t in qw[:6]:
        assert t is None or (not t.requires_grad and t.grad is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["lora", "xs"])
def test_dropout_matches_reference(q_backend, dtype, variant):
    backend, device, fused = q_backend
    fresh_seed()
    qw = make_qw("nf4", 47, 33, device, nested=True, blocksize=32)
    x = make_x("3d", 33, dtype, device).requires_grad_(True)
    p = make_params(33, 47, 3, dtype, device, variant=variant, bias=True, bias_grad=True)
    p["weight"] = reference.dequantize(qw, dtype)
    gy = torch.randn(2, 7, 47, device=device).to(dtype)
    seed, pdrop = 1234567, 0.4
    y, _ = check_against_reference(q_fn(qw, backend, fused, 0.5, pdrop, seed), x, p, gy, 0.5, dtype, pdrop, seed)
    y_other = q_fn(qw, backend, fused, 0.5, pdrop, seed + 1)(x, p)   # the mask depends on the seed
    assert rel_err(y_other, y) > 1e-3


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_scratch_and_fused_agree_at_a_seed(kind):
    """The same seed draws the same dropout mask on the scratch path and the fused one."""
    if "triton" not in lorafast.available_backends():
        pytest.skip("triton not installed")
    fresh_seed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qw = make_qw(kind, 47, 71, device, nested=False, blocksize=64)
    x = make_x("2d", 71, torch.float32, device).requires_grad_(True)
    p = make_params(71, 47, 3, torch.float32, device, variant="xs", bias=True, bias_grad=True)
    p["A"].requires_grad_(True)
    gy = torch.randn(13, 47, device=device)
    y_s, g_s = run(q_fn(qw, "triton", False, 0.5, 0.3, 99), x, p, gy)
    y_f, g_f = run(q_fn(qw, "triton", True, 0.5, 0.3, 99), x, p, gy)
    assert rel_err(y_f, y_s) <= ATOL[torch.float32]
    assert set(g_f) == set(g_s) == {"x", "A", "R", "bias"}
    for name in g_s:
        assert rel_err(g_f[name], g_s[name]) <= ATOL[torch.float32], name


@pytest.mark.parametrize("trains", [("A", "B"), ("B",), ("R",), ("x",), ("bias",)], ids="+".join)
def test_only_needed_grads_are_computed(q_backend, trains):
    """Gradients for what requires grad and nothing else, right: x frozen gives no dx (and its
    backward reads no W), only x trainable gives dx alone. The base weight never gets one."""
    backend, device, fused = q_backend
    fresh_seed()
    m = bnb.nn.Linear4bit(33, 47, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                          quant_type="nf4").to(device)
    qw = quant.quant_weight(m)
    qw = qw._replace(absmax=qw.absmax.clone().requires_grad_(False), offset=qw.offset.clone().requires_grad_(True))
    x = make_x("3d", 33, torch.float32, device).requires_grad_("x" in trains)
    p = make_params(33, 47, 3, torch.float32, device, variant="xs" if "R" in trains else "lora", bias=True)
    for k in ("A", "B", "R", "bias"):
        if p[k] is not None:
            p[k].requires_grad_(k in trains)
    p["weight"] = reference.dequantize(qw, torch.float32).detach()
    gy = torch.randn(2, 7, 47, device=device)
    _, grads = check_against_reference(q_fn(qw, backend, fused, 0.5), x, p, gy, 0.5, torch.float32)
    assert set(grads) == set(trains)
    y = q_fn(qw, backend, fused, 0.5)(x, p)
    quant.release_scratch()
    (y * gy).sum().backward()
    assert (quant.scratch_bytes() > 0) == ("x" in trains and not fused), "the backward dequantises W for dx alone"
    for k in ("A", "B", "R", "bias"):
        if p[k] is not None:
            assert (p[k].grad is not None) == (k in trains), k
    assert (x.grad is not None) == ("x" in trains)
    assert m.weight.grad is None
    assert qw.offset.grad is None    # a float tensor of the weight that requires grad still gets none


def test_fused_writes_no_dense_weight(q_backend):
    """The scratch path dequantises into the shared scratch buffer; the fused one never does."""
    backend, device, fused = q_backend
    fresh_seed()
    qw = make_qw("fp4", 47, 33, device)
    x = make_x("2d", 33, torch.float16, device).requires_grad_(True)
    p = make_params(33, 47, 3, torch.float16, device)
    quant.release_scratch()
    q_fn(qw, backend, fused, 1.0)(x, p).sum().backward()
    assert (quant.scratch_bytes() == 0) == fused
    quant.release_scratch()


def test_empty_batch(q_backend):
    backend, device, fused = q_backend
    qw = make_qw("nf4", 47, 33, device)
    p = make_params(33, 47, 3, torch.float32, device)
    x = torch.randn(0, 33, device=device, requires_grad=True)
    y = q_fn(qw, backend, fused, 1.0)(x, p)
    assert y.shape == (0, 47)
    y.sum().backward()
    assert p["B"].grad.abs().sum() == 0 and x.grad.shape == (0, 33)


@pytest.mark.parametrize("backend", ["torch", "hybrid"])
def test_fused_refuses_another_backend(backend):
    """fused=True runs only in lorafast's Triton GEMM: asked for with another backend, it is
    refused rather than run on Triton behind the caller's back."""
    qw = make_qw("nf4", 47, 33, "cpu")
    p = make_params(33, 47, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="fused"):
        q_fn(qw, backend, True, 1.0)(torch.randn(5, 33), p)


# ------------------------------------------------------------------ the FedEx correction


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_correction_adds_u_v_to_the_base(scratch_backend, dtype, kind):
    """With correction (U, V) the layer computes on dequantize(qw) + U V: y and dx (the only
    gradient that reads W) against the float64 reference on that weight."""
    backend, device, _ = scratch_backend
    fresh_seed()
    qw = make_qw(kind, 47, 33, device, nested=True, blocksize=32)
    U, V = 0.1 * torch.randn(47, 2, device=device), 0.1 * torch.randn(2, 33, device=device)
    U0, V0 = U.clone(), V.clone()
    x = make_x("3d", 33, dtype, device).requires_grad_(True)
    p = make_params(33, 47, 3, dtype, device, variant="lora", bias=True, bias_grad=True)
    gy = torch.randn(2, 7, 47, device=device).to(dtype)
    w_hat = reference.dequantize(qw, dtype)
    fn = q_fn(qw, backend, False, 0.5, correction=(U, V))
    y, grads = run(fn, x, p, gy)
    y_base, g_base = run(lambda x, p: baseline_forward(x, p, 0.5), x,
                         dict(p, weight=(w_hat.float() + U @ V).to(dtype)), gy)
    y_ref, g_ref = truth(x, dict(p, weight=w_hat.double() + U.double() @ V.double()), 0.5, gy)
    assert_close("y", y, y_ref, y_base, dtype)
    assert set(grads) == set(g_ref) == {"x", "A", "B", "bias"}
    for name, g in grads.items():
        assert_close(f"d{name}", g, g_ref[name], g_base[name], dtype)
    assert torch.equal(U, U0) and torch.equal(V, V0) and U.grad is None
    # the same layer without the correction is another one
    y_plain = q_fn(qw, backend, False, 0.5)(x, p)
    assert rel_err(y_plain, y_ref) > 10 * rel_err(y, y_ref)


def _bad_corrections(out_f, in_f):
    U, V = torch.randn(out_f, 2), torch.randn(2, in_f)
    return {
        "U-rows": ((torch.randn(out_f + 1, 2), V), "correction U"),
        "U-fp16": ((U.half(), V), "correction U"),
        "U-vector": ((torch.randn(out_f), V), "correction U"),
        "V-cols": ((U, torch.randn(2, in_f - 1)), "correction V"),
        "V-fp64": ((U, V.double()), "correction V"),
        "rank": ((U, torch.randn(3, in_f)), r"correction U .* and V"),
    }


@pytest.mark.parametrize("case", list(_bad_corrections(1, 1)))
def test_bad_correction_is_refused_and_nothing_is_modified(case):
    fresh_seed()
    qw = make_qw("nf4", 47, 33, "cpu")
    x = torch.randn(4, 33, requires_grad=True)
    p = make_params(33, 47, 3, torch.float32, "cpu", bias=True, bias_grad=True)
    q_fn(qw, "torch", False, 1.0)(x, p)          # the scratch buffer holds this layer's weight now
    scratch = quant.scratch(qw.shape, "cpu", torch.float32)
    (U, V), message = _bad_corrections(47, 33)[case]
    tensors = [x, p["A"], p["B"], p["bias"], U, V, scratch, *(t for t in qw[:6] if t is not None)]
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(ValueError, match=message):
        q_fn(qw, "torch", False, 1.0, correction=(U, V))(x, p)
    for t, t0 in zip(tensors, before):
        assert torch.equal(t, t0)
    assert all(t.grad is None for t in (x, p["A"], p["B"], p["bias"]))


def test_fused_with_a_correction_is_refused():
    fresh_seed()
    qw = make_qw("nf4", 47, 33, "cpu")
    x = torch.randn(4, 33)
    p = make_params(33, 47, 3, torch.float32, "cpu")
    U, V = torch.randn(47, 2), torch.randn(2, 33)
    before = [t.clone() for t in (x, U, V, qw.data, qw.absmax)]
    with pytest.raises(ValueError, match="correction"):
        q_fn(qw, "triton", True, 1.0, correction=(U, V))(x, p)
    assert all(torch.equal(t, t0) for t, t0 in zip((x, U, V, qw.data, qw.absmax), before))


# ------------------------------------------------------------------ torch.library.opcheck

M, T, IN, OUT, R = 2, 3, 13, 9, 3


def _opcheck_args(op, backend, fused, variant):
    """Tiny arguments of the op: variant 0 a nested NF4 base, no lora_R, dropout or correction;
    variant 1 an int8 base with lora_R, dropout and (on the scratch path) a correction."""
    fresh_seed()
    qw = make_qw("int8", OUT, IN, "cpu") if variant else make_qw("nf4", OUT, IN, "cpu", nested=True, blocksize=32)
    grad = op == "lora_linear_q_fwd"
    x = torch.randn(M, T, IN).requires_grad_(grad)
    A, B = torch.randn(R, IN).requires_grad_(grad), torch.randn(OUT, R).requires_grad_(grad)
    b = torch.randn(OUT).requires_grad_(grad)
    Rm = torch.randn(R, R).requires_grad_(grad) if variant else None
    U, V = (torch.randn(OUT, 2), torch.randn(2, IN)) if variant and not fused else (None, None)
    p = 0.2 * variant
    if grad:
        return (x, *_ops.quant_args(qw), A, B, b, Rm, U, V, 0.5, p, 17, 4, fused, backend)
    gy, h = torch.randn(M, T, OUT), torch.randn(M * T, R)
    needs = [True, True, True, Rm is not None, True]
    return (gy, x, *_ops.quant_args(qw), A, B, Rm, b, h, U, V, 0.5, p, 17, 4, needs, fused, backend)


OPCHECK_CASES = [(b, f) for b, d, f in _q_backends() if d == "cpu"]


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("op", ["lora_linear_q_fwd", "lora_linear_q_bwd"])
@pytest.mark.parametrize("backend, fused", OPCHECK_CASES, ids=[_q_id((b, "cpu", f)) for b, f in OPCHECK_CASES])
def test_opcheck(op, backend, fused, variant):
    torch.library.opcheck(_ops.REGISTERED[op], _opcheck_args(op, backend, fused, variant))
