"""Inputs and PyTorch baselines for lora_linear tests."""
import torch
import torch.nn.functional as F

from lorafast import reference

# which adapter tensors train in each variant (README: the layer variants)
TRAINS = {"lora": ("A", "B"), "ffa": ("B",), "xs": ("R",)}


def make_x(case: str, in_f: int, dtype, device) -> torch.Tensor:
    """x for a layout case: contiguous 2-D or 3-D, strided last dim, or transposed."""
    if case == "2d":
        x = torch.randn(13, in_f)
    elif case == "3d":
        x = torch.randn(2, 7, in_f)
    elif case == "strided":       # every other column of a wider tensor
        x = torch.randn(11, 2 * in_f)[:, ::2]
    elif case == "transposed":    # column-major rows, 3-D, not viewable as 2-D
        x = torch.randn(in_f, 3, 5).permute(2, 1, 0)
    else:
        raise ValueError(case)
    return x.to(device=device, dtype=dtype)


def make_params(in_f, out_f, r, dtype, device, *, variant="lora", bias=True, bias_grad=False):
    """weight/bias in dtype, fp32 adapters (PEFT's default), random B (never zeros)."""
    p = dict(
        weight=(torch.randn(out_f, in_f) / in_f ** 0.5).to(device, dtype),
        A=(torch.randn(r, in_f) / in_f ** 0.5).to(device),
        B=torch.randn(out_f, r).to(device),
        R=torch.randn(r, r).to(device) if variant == "xs" else None,
        bias=torch.randn(out_f).to(device, dtype) if bias else None,
    )
    for k in TRAINS[variant]:
        p[k].requires_grad_(True)
    if bias and bias_grad:
        p["bias"].requires_grad_(True)
    return p


def baseline_forward(x, p, scaling, dropout_p=0.0, seed=0):
    """What plain PyTorch computes in x's dtype (PEFT's recipe): the base GEMM in dtype,
    the adapter path in fp32, cast back and added."""
    d = x.reshape(-1, x.shape[-1]).float()
    if dropout_p:
        keep = reference.dropout_keep(seed, 0, d.shape[0], d.shape[1], dropout_p, d.device)
        d = torch.where(keep, d / (1 - dropout_p), torch.zeros((), device=d.device))
    h = d @ p["A"].T
    if p["R"] is not None:
        h = h @ p["R"].T
    low = (scaling * (h @ p["B"].T)).reshape(*x.shape[:-1], -1)
    return F.linear(x, p["weight"], p["bias"]) + low.to(x.dtype)


def leaves(x, p):
    """Tensors that require grad, in a fixed order, with their names."""
    named = [("x", x)] + [(k, p[k]) for k in ("A", "B", "R", "bias")]
    return [(n, t) for n, t in named if t is not None and t.requires_grad]


def truth(x, p, scaling, gy, dropout_p=0.0, seed=0):
    """Float64 reference output and gradients, keyed by name."""
    d = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in p.items()}
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    y = reference.lora_linear(x64, d["weight"], d["A"], d["B"], d["bias"], scaling=scaling, lora_R=d["R"],
                              dropout_p=dropout_p, seed=seed)
    ls = leaves(x64, d)
    grads = torch.autograd.grad(y, [t for _, t in ls], gy.double()) if ls else ()
    return y, {n: g for (n, _), g in zip(ls, grads)}


def assert_matches_reference(y, grads, x, p, ref, base, dtype) -> None:
    """y and each gradient (``grads``: {name: tensor}) in their input's dtype and shape, and
    within the tolerance table of ``ref`` (float64 truth) given ``base`` (PyTorch's own error in
    dtype); ref and base are (y, {name: grad}) pairs."""
    from support.common import assert_close
    (y_ref, g_ref), (y_base, g_base) = ref, base
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close("y", y, y_ref, y_base, dtype)
    assert set(grads) == set(g_ref)
    for name, g in grads.items():
        ref_param = x if name == "x" else p[name]
        assert g.dtype == ref_param.dtype and g.shape == ref_param.shape, name
        assert_close(f"d{name}", g, g_ref[name], g_base[name], dtype)
