"""Counter-based randomness shared by the kernels (spec: lorafast/reference.py).

Philox4x32-10 gives four 32-bit words per call and every one is used: element (m, k) of
a row-major (·, K) tensor takes word k mod 4 of call offset + m·⌈K/4⌉ + ⌊k/4⌋. A tile
whose first column is a multiple of 4 therefore needs one call per four elements: the
helpers take a (..., n) tile of calls and return the (..., 4n) tile of numbers, column
4j + i holding number i of call j.
"""
import triton
import triton.language as tl


@triton.jit
def _words(seed, calls):
    """The four Philox4x32-10 words of each int64 call counter: key (lo32(seed), hi32(seed)),
    counter (lo32(c), hi32(c), 0, 0)."""
    c_lo = (calls & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (calls >> 32).to(tl.uint32)
    zero = c_lo * 0
    return tl.philox(seed, c_lo, c_hi, zero, zero)


@triton.jit
def _spread(a0, a1, a2, a3):
    """(..., n) tiles a0..a3 as one (..., 4n) tile whose column 4j + i is a_i[..., j]."""
    return tl.interleave(tl.interleave(a0, a2), tl.interleave(a1, a3))


@triton.jit
def _uniform(x):
    return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def uniforms(seed, calls):
    """Uniform float32 in [0, 1), (x >> 8)·2⁻²⁴ of each word: four per call."""
    x0, x1, x2, x3 = _words(seed, calls)
    return _spread(_uniform(x0), _uniform(x1), _uniform(x2), _uniform(x3))


@triton.jit
def normals(seed, calls):
    """Standard normals, four per call: Box–Muller on (x0, x1) and on (x2, x3),
    u1 = (a + 1)·2⁻³² ∈ (0, 1], u2 = (b >> 8)·2⁻²⁴, ρ = √(−2 ln u1), θ = 2π u2, giving
    ρ cos θ and ρ sin θ, in the order (cos₀₁, sin₀₁, cos₂₃, sin₂₃)."""
    x0, x1, x2, x3 = _words(seed, calls)
    rho01 = tl.sqrt(-2.0 * tl.log((x0.to(tl.float32) + 1.0) * 2.3283064365386963e-10))
    rho23 = tl.sqrt(-2.0 * tl.log((x2.to(tl.float32) + 1.0) * 2.3283064365386963e-10))
    th01 = 6.283185307179586 * _uniform(x1)
    th23 = 6.283185307179586 * _uniform(x3)
    return _spread(rho01 * tl.cos(th01), rho01 * tl.sin(th01), rho23 * tl.cos(th23), rho23 * tl.sin(th23))


@triton.jit
def row_calls(offset, rows, col0, n_cols, BC: tl.constexpr):
    """(len(rows), BC/4) call counters of the tile (rows, col0 + arange(BC)) of a row-major
    (·, n_cols) tensor; col0 and BC are multiples of 4."""
    per_row = (n_cols + 3) // 4
    return (offset + rows.to(tl.int64)[:, None] * per_row
            + (col0 // 4 + tl.arange(0, BC // 4)).to(tl.int64)[None, :])


@triton.jit
def dropout_keep(seed, offset, rows, col0, n_cols, p, BC: tl.constexpr):
    """Keep mask of the (rows[:, None], col0 + arange(BC)[None, :]) tile of a row-major
    (·, n_cols) tensor: kept iff the element's uniform >= p. col0 is a multiple of 4."""
    return uniforms(seed, row_calls(offset, rows, col0, n_cols, BC)) >= p
