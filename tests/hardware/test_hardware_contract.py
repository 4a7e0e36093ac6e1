"""What the interpreter does not show by itself, proven on CPU: the hint and int32 checks catch
what they are for, every kernel indexes past 2³¹ elements correctly, and importing lorafast
leaks no TRITON_INTERPRET into child processes.

Offsets past 2³¹ need no 4 GiB of memory: a buffer that large is only reserved (the kernel
touches a few pages of it), and views with a row stride of about 2²⁹ put row 4 beyond 2³¹.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lorafast
from lorafast import _backend, reference
from support.interpreter_checks import ContractViolation, check_hint, checking
from support.common import ROOT, fresh_seed

interpreted = pytest.mark.skipif(not _backend._INTERPRETER, reason="checks of the Triton interpreter (CPU only)")
STRIDE = 2**29 + 64      # row 4 of a view with this row stride starts at 2³¹ + 256 elements
ROWS = 5


# ------------------------------------------------------------------ the checks themselves


def test_hint_semantics_on_arrays():
    run = np.arange(64, 96)                              # an aligned run of 32
    check_hint("tt.contiguity", run, [32])
    check_hint("tt.divisibility", run, [32])             # of the first element of the run
    with pytest.raises(ContractViolation, match="max_contiguous"):
        check_hint("tt.contiguity", np.r_[32:47, 0:17], [32])
    with pytest.raises(ContractViolation, match=r"multiple_of\(x, 32\)"):
        check_hint("tt.divisibility", np.r_[32:47, 0:17], [32])
    check_hint("tt.constancy", np.repeat([3, 7], 8), [8])
    with pytest.raises(ContractViolation, match="max_constancy"):
        check_hint("tt.constancy", np.repeat([3, 7], 8), [16])
    tile = np.arange(4)[:, None] * 48 + np.arange(16)[None, :]   # rows of 16 at a stride of 48
    check_hint("tt.contiguity", tile, [1, 16])
    check_hint("tt.divisibility", tile, [1, 16])
    check_hint("tt.divisibility", tile[:, :1], [16, 1])       # the rows' starts: 0, 48, 96, 144
    with pytest.raises(ContractViolation, match="dim 0"):
        check_hint("tt.contiguity", tile, [2, 16])
    with pytest.raises(ContractViolation, match="dim 1"):
        check_hint("tt.divisibility", tile + 8, [1, 16])
    addresses = 4096 + 4 * np.arange(8)                  # fp32 pointers: bytes
    check_hint("tt.contiguity", addresses, [8], elem_bytes=4)
    check_hint("tt.divisibility", addresses, [16], elem_bytes=4)
    with pytest.raises(ContractViolation, match="bytes"):
        check_hint("tt.divisibility", addresses + 4, [16], elem_bytes=4)


@interpreted
@pytest.mark.no_contract_checks
def test_checker_catches_the_wrapped_bias_load_hint():
    """The fused GEMM's old bias load (wrapped columns promised aligned and contiguous): with
    out_features = 47 and tiles of 32 the last tile's promise is false; a GPU faults on it
    ("misaligned address") and the bare interpreter passes it."""
    from support.triton_probes import wrapped_bias_load
    bias, out = torch.randn(47), torch.empty(47)
    wrapped_bias_load[(2,)](bias, out, 47, BN=32)        # the interpreter alone sees nothing
    assert torch.equal(out, bias)
    with checking(), pytest.raises(Exception, match=r"multiple_of\(x, 32\) is false"):
        wrapped_bias_load[(2,)](bias, out, 47, BN=32)
    bias64, out64 = torch.randn(64), torch.empty(64)     # 32 divides 64: every promise holds
    with checking():
        wrapped_bias_load[(2,)](bias64, out64, 64, BN=32)
    assert torch.equal(out64, bias64)


@interpreted
@pytest.mark.no_contract_checks
def test_checker_accepts_true_hints():
    from support.triton_probes import aligned_tile_copy
    src, out = torch.randn(47), torch.zeros(47)
    with checking():
        aligned_tile_copy[(3,)](src, out, 47, BN=16)
    assert torch.equal(out, src)


@interpreted
@pytest.mark.no_contract_checks
def test_checker_catches_int32_offset_overflow():
    from support.triton_probes import strided_rows
    x, out = torch.zeros(8), torch.zeros(8)
    with checking(), pytest.raises(Exception, match="int32 overflow in mul"):
        strided_rows[(1,)](x, out, 2**29, ROWS=8, WIDE=False)   # 7 · 2²⁹ > 2³¹ − 1
    with checking():
        strided_rows[(1,)](x, out, 1, ROWS=8, WIDE=False)       # in range: no complaint


def test_contract_checks_are_on_for_kernel_tests():
    """The autouse fixture really wraps tests: the interpreter's hint hook is the checking one."""
    if not _backend._INTERPRETER:
        pytest.skip("the checks run under the interpreter")
    from triton.runtime import interpreter
    assert interpreter.TensorHandle.set_attr.__name__ == "checked_set_attr"


# ------------------------------------------------------------------ offsets past 2³¹


def reserve(numel: int, dtype) -> torch.Tensor:
    """An uninitialised buffer of ``numel`` elements: address space, not memory."""
    if Path("/proc/sys/vm/overcommit_memory").exists() and \
            Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "2":
        pytest.skip("strict overcommit: a reserved 4 GiB buffer would be committed memory")
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as e:
        pytest.skip(f"cannot reserve {numel} elements here: {e}")


def far_apart(t: torch.Tensor) -> torch.Tensor:
    """A copy of the 2-D ``t`` whose rows lie STRIDE elements apart (row 4 past 2³¹)."""
    rows, cols = t.shape
    assert (rows - 1) * STRIDE >= 2**31 and cols <= STRIDE
    buf = reserve((rows - 1) * STRIDE + cols, t.dtype)
    view = buf.as_strided((rows, cols), (STRIDE, 1))
    view.copy_(t)
    return view


needs_triton = pytest.mark.skipif("triton" not in lorafast.available_backends(), reason="needs Triton")


@needs_triton
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("xs", [False, True], ids=["lora", "xs"])
def test_lora_linear_rows_past_2_31(dropout_p, xs):
    """x, dY and the weight with rows past 2³¹ elements give bit for bit the results of their
    contiguous copies: every offset of the projection and the GEMM (forward and backward) is
    int64. Under the interpreter an int32 offset would raise (or read a wild address)."""
    fresh_seed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16
    in_f, out_f, r = 33, ROWS, 3
    x = torch.randn(ROWS, in_f).to(dtype)
    W = (torch.randn(out_f, in_f) / 6).to(dtype)
    A, B = torch.randn(r, in_f) / 6, torch.randn(out_f, r)
    R = torch.randn(r, r) if xs else None
    bias = torch.randn(out_f).to(dtype)
    gy = torch.randn(ROWS, out_f).to(dtype)

    def step(x, W, gy):
        x = x.detach().to(device).requires_grad_(True)      # detach keeps the strides
        params = [p.to(device).requires_grad_(True) for p in (A, B, bias)]
        y = lorafast.lora_linear(x, W.to(device), *params[:2], params[2], scaling=0.5, lora_R=R,
                                 dropout_p=dropout_p, seed=1234, backend="triton")
        y.backward(gy.to(device))
        return [y.detach(), x.grad, *(p.grad for p in params)]

    want = step(x, W, gy)
    got = step(far_apart(x), far_apart(W), far_apart(gy))
    for name, g, w in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        assert torch.equal(g, w), name


@needs_triton
def test_kernel_outputs_past_2_31():
    """The projection and the GEMM write rows past 2³¹ where they should (launcher level: the op
    allocates its outputs, so only a caller's view can be that far apart)."""
    if torch.cuda.is_available():
        pytest.skip("CPU views of a reserved buffer")
    from lorafast.kernels import lora_linear as K
    fresh_seed()
    x = torch.randn(ROWS, 33)
    W, A, B = torch.randn(7, 33), torch.randn(3, 33), torch.randn(7, 3)
    h_want = torch.empty(ROWS, 3)
    K.project(x, P=A.T, out=h_want, r=3)
    h = far_apart(torch.zeros(ROWS, 3))
    K.project(x, P=A.T, out=h, r=3)
    assert torch.equal(h, h_want)
    y_want = torch.empty(ROWS, 7)
    K.gemm(x, W.T, H=h_want, U=B.T, Y=y_want, r=3, scale=0.5)
    y = far_apart(torch.zeros(ROWS, 7))
    K.gemm(x, W.T, H=h_want, U=B.T, Y=y, r=3, scale=0.5)
    assert torch.equal(y, y_want)
    torch.testing.assert_close(y_want, x @ W.T + 0.5 * (x @ A.T) @ B.T)


@needs_triton
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "columns"])
def test_fedex_merge_past_2_31(transposed):
    """W += U V on a weight whose rows (or, as GPT-2's Conv1D stores it, columns) lie past 2³¹."""
    from lorafast import _ops
    fresh_seed()
    U, V = torch.randn(ROWS, 6), torch.randn(6, 9)
    W0 = torch.randn(ROWS, 9)
    W = far_apart(W0.T.contiguous()).T if transposed else far_apart(W0)
    _ops.fedex_merge_(W, U, V, None, "triton")
    want = W0.clone()
    reference.fedex_merge_(want, U, V)
    torch.testing.assert_close(W, want, rtol=1e-6, atol=1e-5)


@needs_triton
def test_dp_step_rows_past_2_31():
    """Per-sample norms and clip·reduce·noise over a gradient buffer with rows past 2³¹."""
    from lorafast import _ops
    fresh_seed()
    g = torch.randn(ROWS, 40)
    segments = [0, 24, 40]
    far = far_apart(g)
    sq = _ops.grad_sample_norms(far, segments, "triton")
    torch.testing.assert_close(sq, reference.grad_sample_sq_norms(g, segments).float())
    kw = dict(per_layer=False, acc=None, noise=None, noise_std=0.0, seed=0, offset=0, out_scale=0.5)
    got = _ops.clip_reduce_noise(far, sq, segments, [1.0], backend="triton", **kw)
    want = reference.clip_reduce_noise(g, sq, segments, [1.0], **kw).float()
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ no leaked interpreter switch


def test_child_processes_do_not_inherit_the_interpreter():
    """After `import lorafast` on a CPU-only machine the Triton kernels here are interpreted, but
    a child process (which may have a GPU) gets no TRITON_INTERPRET in its environment."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, subprocess, sys, lorafast\n"
            "from lorafast import _backend\n"
            "print('parent', os.environ.get('TRITON_INTERPRET'), _backend._INTERPRETER)\n"
            "if _backend._INTERPRETER:\n"
            "    from lorafast.kernels import common\n"
            "    print('kernels interpreted', common.interpreted())\n"
            "sys.stdout.flush()\n"
            "subprocess.run([sys.executable, '-c', "
            "\"import os; print('child', os.environ.get('TRITON_INTERPRET'))\"], check=True)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "parent None" in out and "child None" in out, out
    if not torch.cuda.is_available() and "triton" in lorafast.available_backends():
        assert "parent None True" in out and "kernels interpreted True" in out, out


def test_an_explicit_interpreter_setting_is_kept():
    """TRITON_INTERPRET=1 set by the user stays (theirs), and =0 keeps the interpreter off."""
    for value, on in (("1", "True"), ("0", "False")):
        env = dict(os.environ, TRITON_INTERPRET=value)
        out = subprocess.run([sys.executable, "-c", "import os, lorafast; from lorafast import _backend; "
                              "print(os.environ.get('TRITON_INTERPRET'), _backend._INTERPRETER)"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
        assert out.split() == [value, on], out
