// Host emulation of __nv_bfloat16 (tests/support/native/cuda_emu/cuda_runtime.h): the top 16 bits of
// an fp32, rounded to nearest even.
#pragma once
#include "cuda_runtime.h"
#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 h;
  if (std::isnan(v)) {
    h.bits = 0x7FC0;
  } else {
    u += 0x7FFFu + ((u >> 16) & 1u);
    h.bits = static_cast<uint16_t>(u >> 16);
  }
  return h;
}
