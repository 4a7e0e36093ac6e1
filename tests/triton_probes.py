"""Tiny Triton kernels that expose the kernels' device helpers to tests."""
import triton
import triton.language as tl

from lorafast.kernels.random import philox_uniform


@triton.jit
def draw_uniform(out, seed, base, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + i, philox_uniform(seed, base + i.to(tl.int64)), mask=i < n)


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
