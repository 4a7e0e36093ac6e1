"""Tiny Triton kernels that expose the kernels' device helpers to tests."""
import triton
import triton.language as tl

from lorafast.kernels.philox import dropout_keep, normals, row_calls, uniforms


@triton.jit
def draw_grid(out, seed, offset, M, N, BM: tl.constexpr, BN: tl.constexpr, NORMAL: tl.constexpr):
    """The uniforms (or normals) of a row-major (M, N) tensor, tile by tile."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    calls = row_calls(offset, rm, tl.program_id(1) * BN, N, BN)
    if NORMAL:
        v = normals(seed, calls)
    else:
        v = uniforms(seed, calls)
    tl.store(out + rm[:, None] * N + rn[None, :], v, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def draw_keep(out, seed, offset, M, N, p, BM: tl.constexpr, BN: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    keep = dropout_keep(seed, offset, rm, tl.program_id(1) * BN, N, p, BN)
    tl.store(out + rm[:, None] * N + rn[None, :], keep.to(tl.int8), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def wrapped_bias_load(BIAS, OUT, N, BN: tl.constexpr):
    """The fused GEMM's bias load before the fix: columns wrapped mod N, then promised to be
    aligned runs of BN. In the last tile of an N that BN does not divide, the promise is false."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rn_l = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    tl.store(OUT + rn, tl.load(BIAS + rn_l), mask=rn < N)


@triton.jit
def aligned_tile_copy(SRC, OUT, N, BN: tl.constexpr):
    """True hints: each tile's columns are an aligned run of BN."""
    rn = tl.max_contiguous(tl.multiple_of(tl.program_id(0) * BN + tl.arange(0, BN), BN), BN)
    tl.store(OUT + rn, tl.load(SRC + rn, mask=rn < N), mask=rn < N)


@triton.jit
def strided_rows(X, OUT, stride, ROWS: tl.constexpr, WIDE: tl.constexpr):
    """Row i of X at i·stride, with the offset in int32 (the overflowing pattern) or int64."""
    rows = tl.arange(0, ROWS)
    if WIDE:
        rows = rows.to(tl.int64)
    tl.store(OUT + tl.arange(0, ROWS), tl.load(X + rows * stride))
