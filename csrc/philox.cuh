// Counter-based randomness shared by every CUDA kernel: Philox4x32-10 (Salmon et al.,
// SC'11, "Parallel random numbers: as easy as 1, 2, 3") with the same (seed, counter)
// mapping as the Triton kernels (tl.philox) and lorafast/reference.py:
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(c), hi32(c), 0, 0)         for a 64-bit element counter c
// so that a dropout mask or a noise tensor drawn by either backend is the same.
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

// The four words for element counter `counter` under `seed` (seed < 2^63).
LORAFAST_HD Philox4 philox(uint64_t seed, uint64_t counter) {
  return philox4x32(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform in [0, 1): the top 24 bits of word 0 (exact in fp32).
LORAFAST_HD float philox_uniform(uint64_t seed, uint64_t counter) {
  return static_cast<float>(philox(seed, counter).x0 >> 8) * (1.0f / 16777216.0f);
}

// Inverted-dropout keep decision: kept iff uniform >= p.
LORAFAST_HD bool dropout_keep(uint64_t seed, uint64_t counter, float p) {
  return philox_uniform(seed, counter) >= p;
}

// Standard normal by Box–Muller on words 0 and 1:
//   u1 = (x0 + 1)·2⁻³² ∈ (0, 1],  u2 = (x1 >> 8)·2⁻²⁴,  z = √(−2 ln u1)·cos(2π u2).
// The words and u1, u2 are bit-identical across backends; z goes through each platform's
// fp32 log/cos/sqrt, so it agrees to a few ulp.
LORAFAST_HD float philox_normal(uint64_t seed, uint64_t counter) {
  const Philox4 w = philox(seed, counter);
  const float u1 = (static_cast<float>(w.x0) + 1.0f) * 2.3283064365386963e-10f;
  const float u2 = static_cast<float>(w.x1 >> 8) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

}  // namespace lorafast
