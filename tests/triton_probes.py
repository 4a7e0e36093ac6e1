"""Tiny Triton kernels that expose the kernels' device helpers to tests."""
import triton
import triton.language as tl

from lorafast.kernels.random import philox_uniform


@triton.jit
def draw_uniform(out, seed, base, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + i, philox_uniform(seed, base + i.to(tl.int64)), mask=i < n)
