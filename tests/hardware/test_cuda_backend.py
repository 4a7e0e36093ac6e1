"""The CUDA backend's own properties, beyond the shared op matrices (where it runs as the
("cuda", "cpu") emulated pair and, on a GPU, as ("cuda", "cuda")):

- the Philox dropout mask is bit-identical to the Triton kernels' and the reference's;
- ranks above the kernel's 128 go through in slices; splitting K across blocks changes
  nothing but rounding;
- every tile plan of rank_reduce (padded rank 16, 32, 64, 128; both DW atomic layouts,
  samples that end inside a tile) and rank_update on ragged, strided and misaligned
  tensors, the DP step on chunks whose bounds are not multiples of 4, and privatize on long
  ragged rows, all against the reference (the thread owning four columns draws one call);
- on a GPU: the extension loads (prebuilt or JIT), and every op agrees with the Triton
  backend on the same inputs, bf16 included.
"""
import pytest
import torch

from support import cuda_emu
import lorafast
from support.common import HAS_CUDA, fresh_seed, rel_err
from lorafast import _ops, reference
from lorafast.plans import cuda as cuda_plan

emulated = pytest.mark.skipif(not cuda_emu.available(), reason="no C++ compiler for the CUDA emulation")


def _dropped_by_rank_reduce(x, p, seed, offset):
    """drop(x) through the CUDA projection pass: OUT = drop(x) · I."""
    eye = torch.eye(x.shape[1], device=x.device)
    out = torch.zeros(x.shape, device=x.device)
    cuda_plan.ops().rank_reduce(x, eye, out, 1.0, None, None, 1.0, 0, None, p, seed, offset)
    return out


def _dropped_by_triton(x, p, seed, offset):
    from lorafast.kernels import lora_linear as tk
    out = torch.zeros(x.shape, device=x.device)
    tk.project(x, P=torch.eye(x.shape[1], device=x.device), out=out, r=x.shape[1], dropout_p=p, seed=seed,
                offset=offset)
    return out


def test_launch_rewrite_for_the_emulation():
    src = "k<T, 16, 64><<<grid, kThreads, 0, stream>>>(args); plain<<<dim3(a, b), 256, 0, s>>>(x, y);"
    assert cuda_emu.rewrite_launches(src) == ("::emu::launch(grid, kThreads, 0, stream, k<T, 16, 64>, args); "
                                              "::emu::launch(dim3(a, b), 256, 0, s, plain, x, y);")


@emulated
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_the_triton_and_reference_mask(monkeypatch, p):
    cuda_emu.activate(monkeypatch)
    x = torch.randn(37, 45) + 3.0          # no zeros: a zero output means dropped
    seed, offset = fresh_seed(), 11
    keep = reference.dropout_keep(seed, offset, 37, 45, p)
    got = _dropped_by_rank_reduce(x, p, seed, offset)
    assert torch.equal(got != 0, keep)
    torch.testing.assert_close(got, torch.where(keep, x / (1 - p), 0.0), rtol=1e-6, atol=0)
    if "triton" in lorafast.available_backends() and not HAS_CUDA:
        assert torch.equal(_dropped_by_triton(x, p, seed, offset) != 0, keep)


@emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ranks_above_the_kernel_tile_go_in_slices(monkeypatch, dtype):
    """r = 130 > 128: the plan slices the rank; forward, backward and per-sample agree with float64."""
    cuda_emu.activate(monkeypatch)
    fresh_seed()
    batch, T, in_f, out_f, r, s, p = 2, 3, 20, 9, 130, 0.5, 0.2
    x = torch.randn(batch, T, in_f).to(dtype)
    W = (torch.randn(out_f, in_f) / in_f ** 0.5).to(dtype)
    A, B, R = torch.randn(r, in_f) / in_f ** 0.5, torch.randn(out_f, r) / r ** 0.5, torch.randn(r, r) / r ** 0.5
    gy = torch.randn(batch, T, out_f).to(dtype)
    kw = dict(scaling=s, dropout_p=p, seed=7, offset=0)
    y_ref, h_ref = reference.lora_linear_forward(x.double(), W.double(), A.double(), B.double(), None, R.double(), **kw)
    y, h = _ops.lora_linear_fwd(x, W, A, B, None, R, s, p, 7, 0, "cuda")
    assert rel_err(h, h_ref) < 1e-5 and rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    needs = [True, True, True, True, False]
    grads = _ops.lora_linear_bwd(gy, x, W, A, B, R, None, h, s, p, 7, 0, needs, "cuda")
    want = reference.lora_linear_backward(gy.double(), x.double(), W.double(), A.double(), B.double(), R.double(),
                                          h_ref, needs=tuple(needs), **kw)
    for name, g, w in zip("x A B R".split(), grads, want):
        assert rel_err(g, w) < (1e-5 if dtype == torch.float32 or name != "x" else 1e-2), name
    bufs = [torch.zeros(batch, r, in_f), torch.zeros(batch, out_f, r), torch.zeros(batch, r, r)]
    _ops.lora_linear_bwd_ps(gy, x, W, A, B, R, h, s, p, 7, 0, batch, False, *bufs, 1.0, "cuda")
    ps_want = reference.lora_linear_per_sample_grads(gy.double(), x.double(), A.double(), B.double(), R.double(),
                                                     h_ref, batch=batch, needs=(True, True, True), **kw)
    for got, w in zip(bufs, ps_want):
        assert rel_err(got, w) < 1e-5


@emulated
@pytest.mark.parametrize("needs", [[False, False, False, False, True], [False, False, True, False, False],
                                   [True, False, False, False, False], [False, True, False, False, True]],
                         ids=lambda n: "+".join(k for k, on in zip(["x", "A", "B", "R", "bias"], n) if on))
def test_each_gradient_alone(monkeypatch, needs):
    """Every subset of the backward's passes runs on its own (e.g. the bias gradient alone is a
    pass over dY with neither projection nor factor)."""
    cuda_emu.activate(monkeypatch)
    fresh_seed()
    M, in_f, out_f, r, s = 21, 13, 37, 3, 0.5
    x, gy = torch.randn(M, in_f), torch.randn(M, out_f)
    W, A, B, bias = torch.randn(out_f, in_f), torch.randn(r, in_f), torch.randn(out_f, r), torch.randn(out_f)
    _, h = _ops.lora_linear_fwd(x, W, A, B, bias, None, s, 0.0, 0, 0, "cuda")
    got = _ops.lora_linear_bwd(gy, x, W, A, B, None, bias, h, s, 0.0, 0, 0, needs, "cuda")
    want = reference.lora_linear_backward(gy.double(), x.double(), W.double(), A.double(), B.double(), None,
                                          h.double(), scaling=s, dropout_p=0.0, seed=0, offset=0,
                                          needs=tuple(needs))
    for g, w, n in zip(got, want, needs):
        assert (g.numel() == 0) != n
        if n:
            assert rel_err(g, w) < 1e-5


@emulated
def test_splitting_k_across_blocks_changes_only_rounding(monkeypatch):
    """The grid splits K when rows are few (OUT then sums partial products with atomics):
    one multiprocessor (no split) and many (split) give the same projection and gradients."""
    emu = cuda_emu.activate(monkeypatch)
    fresh_seed()
    x, P, L = torch.randn(40, 200), torch.randn(200, 5), torch.randn(40, 5)
    results = []
    for sms in (1, 64):
        emu.sms = sms
        out, dw, db = torch.zeros(40, 5), torch.zeros(200, 5), torch.zeros(200)
        cuda_plan.ops().rank_reduce(x, P, out, 0.5, L, dw, 2.0, 0, db, 0.0, 0, 0)
        results.append((out, dw, db))
    emu.sms = 2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][0], 0.5 * x @ P, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], 2.0 * x.T @ L, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][2], x.sum(0), rtol=1e-5, atol=1e-5)


def _drop64(x, p, seed, offset):
    x = x.double()
    if p == 0:
        return x
    return torch.where(reference.dropout_keep(seed, offset, *x.shape, p), x / (1 - p), 0.0)


@emulated
@pytest.mark.parametrize("r", [3, 16, 17, 32, 40, 64, 100, 128])
def test_rank_reduce_tile_plans_match_float64(monkeypatch, r):
    """OUT, per-sample DW and DB in one pass with dropout, for each padded rank's tile plan:
    samples of T = 7 rows end inside tiles, K = 70 is ragged (not a multiple of the tile or
    of 4), DW is dB-like (unit rank stride) or dA-like ((N, K, r) view of (N, r, K): unit k
    stride), X is row- or column-major, and K is split across blocks or not."""
    emu = cuda_emu.activate(monkeypatch)
    N, T, K, p, seed, offset = 19, 7, 70, 0.3, fresh_seed(), 2**33 + 5
    M = N * T
    x32 = torch.randn(M, K) + 0.5
    P, L = torch.randn(K, r), torch.randn(M, r)
    for layout, dtype, column_major, sms in [("rank", torch.float32, False, 2), ("k", torch.bfloat16, True, 64),
                                             ("k", torch.float16, False, 1)]:
        x = x32.to(dtype)
        if column_major:
            x = x.T.contiguous().T
        d = _drop64(x, p, seed, offset)
        out, db = torch.zeros(M, r), torch.zeros(K)
        dw = torch.zeros(N, K, r) if layout == "rank" else torch.zeros(N, r, K).transpose(1, 2)
        emu.sms = sms
        cuda_plan.ops().rank_reduce(x, P, out, 0.5, L, dw, 2.0, T, db, p, seed, offset)
        emu.sms = 2
        dw_want = 2.0 * torch.einsum("ntk,ntr->nkr", d.view(N, T, K), L.double().view(N, T, r))
        what = (layout, dtype, column_major, sms)
        assert rel_err(out, 0.5 * d @ P.double()) < 1e-5, what
        assert rel_err(dw, dw_want) < 1e-5, what
        assert rel_err(db, d.sum(0)) < 1e-5, what


@emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rank_update_on_ragged_misaligned_views(monkeypatch, dtype):
    """Y a column slice of a wider buffer (rows not 8- or 16-byte aligned, so no vector
    access) or not, N not a multiple of 4, r over one rank tile: the mask is the reference's
    and the columns around the view are untouched."""
    emu = cuda_emu.activate(monkeypatch)
    M, N, r, p, seed = 37, 131, 20, 0.4, fresh_seed()
    for shift in (0, 1):
        big = torch.randn(M, N + 2).to(dtype)
        before = big.clone()
        y = big[:, shift:shift + N]
        H, U, b = torch.randn(M, r), torch.randn(r, N), torch.randn(N)
        emu.rank_update_(y, H, U, b, 0.7, p, seed, 9)
        want = before[:, shift:shift + N].double() + _drop64(0.7 * H @ U, p, seed, 9) + b.double()
        assert rel_err(y, want) < (1e-6 if dtype == torch.float32 else 1e-3), shift
        rest = torch.ones(N + 2, dtype=torch.bool)
        rest[shift:shift + N] = False
        assert torch.equal(big[:, rest], before[:, rest]), shift


@emulated
def test_dp_step_on_chunks_not_aligned_to_four(monkeypatch):
    """Parameters of odd widths, two of them wider than a chunk: chunks that start inside a
    parameter start at a multiple of 4, no chunk touches more than CHUNK_WIDTH/4 groups, and
    the fused step (clipping, acc, Philox noise of the (1, D) vector) is the reference."""
    emu = cuda_emu.activate(monkeypatch)
    fresh_seed()
    segments = [0, 1, 3, 4103, 9001, 9002]
    rows = cuda_emu.chunk_rows(segments)
    for a, b, p in rows:
        assert segments[p] <= a < b <= segments[p + 1] and (a == segments[p] or a % 4 == 0)
        assert (b - 1) // 4 - a // 4 < cuda_emu.CHUNK_WIDTH // 4
    assert sum(b - a for a, b, _ in rows) == segments[-1]
    g = torch.randn(5, segments[-1])
    sq = reference.grad_sample_sq_norms(g, segments).float()
    torch.testing.assert_close(emu.grad_sample_norms(g, segments), sq, rtol=1e-5, atol=1e-5)
    acc = torch.randn(segments[-1])
    for per_layer, bounds in [(False, [2.0]), (True, [0.5, 1.0, 1.5, 2.0, 2.5])]:
        kw = dict(per_layer=per_layer, acc=acc, noise=None, noise_std=0.9, seed=2**62 + 1, offset=2**32 + 3,
                  out_scale=0.5)
        got = emu.clip_reduce_noise(g, sq, segments, bounds, per_layer, acc, None, 0.9, kw["seed"], kw["offset"], 0.5)
        assert rel_err(got, reference.clip_reduce_noise(g.double(), sq.double(), segments, bounds, **kw)) < 1e-6


@emulated
@pytest.mark.parametrize("shape, mode", [((2, 2103), "token"), ((3, 2, 1030), "sample"), ((2, 4099), "element")])
def test_privatize_long_ragged_rows(monkeypatch, shape, mode):
    """Rows of more than one block (2048 elements) and not a multiple of 4: every block's
    groups start calls at the right (row, column)."""
    emu = cuda_emu.activate(monkeypatch)
    fresh_seed()
    h = torch.randn(*shape)
    y, sq = emu.privatize(h, 3.0, 0.6, mode, 4242, 19)
    want, sq_want = reference.privatize(h.double(), 3.0, 0.6, mode=mode, seed=4242, offset=19)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq.double(), sq_want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ on a GPU


gpu = pytest.mark.gpu


def _cuda_ready():
    ok, why = lorafast._backend.cuda_status()
    if not ok:
        pytest.fail(f"the CUDA backend is not usable on this GPU machine: {why}")
    from lorafast import _cuda
    _cuda.load()


@gpu
def test_extension_loads_and_lists_every_op():
    _cuda_ready()
    assert "cuda" in lorafast.available_backends()
    for name in ("privatize", "grad_sample_norms", "clip_reduce_noise", "fedex_merge_", "rank_reduce",
                 "rank_update_"):
        assert hasattr(torch.ops.lorafast_cuda, name), name


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["lora", "xs"])
def test_lora_linear_agrees_with_triton(dtype, variant):
    _cuda_ready()
    fresh_seed()
    dev, M, in_f, out_f, r, s, p = "cuda", 300, 1000, 770, 16, 2.0, 0.1
    x = torch.randn(M, in_f, device=dev, dtype=dtype)
    W = (torch.randn(out_f, in_f, device=dev) / in_f ** 0.5).to(dtype)
    A = torch.randn(r, in_f, device=dev) / in_f ** 0.5
    B = torch.randn(out_f, r, device=dev) / r ** 0.5
    R = torch.randn(r, r, device=dev) if variant == "xs" else None
    bias = torch.randn(out_f, device=dev, dtype=dtype)
    gy = torch.randn(M, out_f, device=dev, dtype=dtype)
    outs = {}
    for backend in ("triton", "cuda"):
        y, h = _ops.lora_linear_fwd(x, W, A, B, bias, R, s, p, 99, 0, backend)
        needs = [True, True, True, R is not None, True]
        grads = _ops.lora_linear_bwd(gy, x, W, A, B, R, bias, h, s, p, 99, 0, needs, backend)
        outs[backend] = (y, h, *[g for g, n in zip(grads, needs) if n])
    tol = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]   # TF32 vs fp32 rank parts
    for i, (a, b) in enumerate(zip(outs["cuda"], outs["triton"])):
        assert rel_err(a, b) < tol, i


@gpu
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_bit_identical_to_triton_on_gpu(p):
    _cuda_ready()
    x = torch.randn(257, 129, device="cuda") + 3.0
    seed = fresh_seed()
    a = _dropped_by_rank_reduce(x, p, seed, 5)
    b = _dropped_by_triton(x, p, seed, 5)
    assert torch.equal(a != 0, b != 0)
    assert torch.equal((a != 0).cpu(), reference.dropout_keep(seed, 5, 257, 129, p))


@gpu
@pytest.mark.parametrize("mode", ["sample", "token", "element"])
def test_privatize_noise_agrees_with_triton(mode):
    _cuda_ready()
    h = torch.randn(8, 33, 300, device="cuda", dtype=torch.bfloat16)
    ya, sqa = _ops.privatize(h, 1.0, 0.5, mode, 123, 0, "cuda")
    yb, sqb = _ops.privatize(h, 1.0, 0.5, mode, 123, 0, "triton")
    assert rel_err(ya, yb) < 1e-2 and rel_err(sqa, sqb) < 1e-5
