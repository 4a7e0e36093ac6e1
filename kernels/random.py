"""Counter-based randomness shared by the kernels (spec: lorafast/reference.py)."""
import triton
import triton.language as tl


@triton.jit
def philox_uniform(seed, counter):
    """Uniform float32 in [0, 1) for int64 ``counter``: Philox4x32-10 with key
    (lo32(seed), hi32(seed)), counter (lo32(c), hi32(c), 0, 0); top 24 bits of word 0."""
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0
    x0, _, _, _ = tl.philox(seed, c_lo, c_hi, zero, zero)
    return (x0 >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def dropout_keep(seed, offset, rows, cols, n_cols, p):
    """Keep mask of the (rows[:, None], cols[None, :]) tile of a row-major (·, n_cols) tensor."""
    counter = offset + rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    return philox_uniform(seed, counter) >= p


@triton.jit
def philox_normal(seed, counter):
    """Standard normal float32 per int64 ``counter`` by Box–Muller on Philox words 0 and 1:
    u1 = (x0 + 1)·2⁻³² ∈ (0, 1], u2 = (x1 >> 8)·2⁻²⁴, z = √(−2 ln u1)·cos(2π u2).
    32 bits in u1 put the largest |z| at √(64 ln 2) ≈ 6.66 (a tail of mass ~3e-11)."""
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0
    x0, x1, _, _ = tl.philox(seed, c_lo, c_hi, zero, zero)
    u1 = (x0.to(tl.float32) + 1.0) * 2.3283064365386963e-10
    u2 = (x1 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
