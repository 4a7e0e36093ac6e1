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
