// Counter-based randomness shared by every CUDA kernel: Philox4x32-10 (Salmon et al.,
// SC'11, "Parallel random numbers: as easy as 1, 2, 3") with the same (seed, call) mapping
// as the Triton kernels (kernels/random.py) and lorafast/reference.py:
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(c), hi32(c), 0, 0)         for a 64-bit call counter c
// Every call's four words are used: element (m, k) of a row-major (M, K) tensor takes word
// k mod 4 of call offset + m·⌈K/4⌉ + ⌊k/4⌋ (a vector is one row), so a thread that owns
// four consecutive columns 4q..4q+3 of a row makes one call for all four. A dropout mask or
// a noise tensor drawn by either backend is the same.
//
// Header-only and host/device: CPU builds (tests, tools) include it too. It needs no
// curand header and nothing from torch.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define LORAFAST_HD __host__ __device__ __forceinline__
#else
#define LORAFAST_HD inline
#endif

namespace lorafast {

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

// The four numbers of one call, v[i] from word i (uniforms) or in Box–Muller order (normals).
struct Float4 {
  float v[4];
};

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // multipliers of the two S-boxes
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;    // Weyl key increments (golden ratio, √3 − 1)
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

LORAFAST_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// The Philox4x32 block function, `rounds` rounds (10 is the standard, crush-resistant choice).
LORAFAST_HD Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                               int rounds = 10) {
  for (int i = 0; i < rounds; ++i) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxRoundA, c0, hi0, lo0);
    mulhilo32(kPhiloxRoundB, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// The four words of call counter `call` under `seed` (seed < 2^63).
LORAFAST_HD Philox4 philox(uint64_t seed, uint64_t call) {
  return philox4x32(static_cast<uint32_t>(call), static_cast<uint32_t>(call >> 32), 0u, 0u,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Calls one row of a (·, n_cols) tensor uses: ⌈n_cols/4⌉.
LORAFAST_HD uint64_t philox_calls_per_row(int64_t n_cols) { return static_cast<uint64_t>((n_cols + 3) >> 2); }

// The call holding element (row, col) of a row-major (·, n_cols) tensor drawn from `offset`;
// the element is number col mod 4 of it.
LORAFAST_HD uint64_t philox_call(uint64_t offset, int64_t row, int64_t col, int64_t n_cols) {
  return offset + static_cast<uint64_t>(row) * philox_calls_per_row(n_cols) + static_cast<uint64_t>(col >> 2);
}

// Top 24 bits of a word as a uniform in [0, 1) (exact in fp32).
LORAFAST_HD float philox_word_uniform(uint32_t x) { return static_cast<float>(x >> 8) * (1.0f / 16777216.0f); }

// The call's four uniforms (x_i >> 8)·2⁻²⁴, bit-identical across backends. Dropout keeps an
// element iff its uniform >= p.
LORAFAST_HD Float4 philox_uniform4(uint64_t seed, uint64_t call) {
  const Philox4 w = philox(seed, call);
  return {{philox_word_uniform(w.x0), philox_word_uniform(w.x1), philox_word_uniform(w.x2),
           philox_word_uniform(w.x3)}};
}

// Box–Muller on one word pair (a, b): u1 = (a + 1)·2⁻³² ∈ (0, 1], u2 = (b >> 8)·2⁻²⁴,
// ρ = √(−2 ln u1), θ = 2π u2 → (ρ cos θ, ρ sin θ). u1 and θ are bit-identical across
// backends; the results go through each platform's fp32 log/sqrt/sin/cos, so they agree to a
// few ulp. 32 bits in u1 put the largest |z| at √(64 ln 2) ≈ 6.66.
LORAFAST_HD void box_muller(uint32_t a, uint32_t b, float& z_cos, float& z_sin) {
  const float u1 = (static_cast<float>(a) + 1.0f) * 2.3283064365386963e-10f;
  const float theta = 6.283185307179586f * philox_word_uniform(b);
  const float rho = sqrtf(-2.0f * logf(u1));
  float s, c;
#if defined(__CUDA_ARCH__)
  sincosf(theta, &s, &c);
#else
  s = sinf(theta);
  c = cosf(theta);
#endif
  z_cos = rho * c;
  z_sin = rho * s;
}

// The call's four standard normals: (cos, sin) of the pair (x0, x1), then of (x2, x3).
LORAFAST_HD Float4 philox_normal4(uint64_t seed, uint64_t call) {
  const Philox4 w = philox(seed, call);
  Float4 z;
  box_muller(w.x0, w.x1, z.v[0], z.v[1]);
  box_muller(w.x2, w.x3, z.v[2], z.v[3]);
  return z;
}

}  // namespace lorafast
