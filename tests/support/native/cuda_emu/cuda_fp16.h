// Host emulation of __half (tests/support/native/cuda_emu/cuda_runtime.h): IEEE binary16 via _Float16.
#pragma once
#include "cuda_runtime.h"
#include <cstdint>
#include <cstring>

struct __half { uint16_t bits; };
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);   // round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
