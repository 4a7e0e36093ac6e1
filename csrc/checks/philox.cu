// Compile check of philox.cuh as device code (make cuda-check): every function instantiated
// in a kernel, for sm_80 and sm_90a. Not part of the extension build.
#include <cstdint>

#include "../philox.cuh"

__global__ void philox_check(float* out, uint32_t* words, uint64_t seed, uint64_t offset, float p, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint64_t c = offset + static_cast<uint64_t>(i);
  const lorafast::Philox4 w = lorafast::philox(seed, c);
  words[4 * i] = w.x0;
  words[4 * i + 1] = w.x1;
  words[4 * i + 2] = w.x2;
  words[4 * i + 3] = w.x3;
  out[i] = lorafast::philox_normal(seed, c) + lorafast::philox_uniform(seed, c) +
           (lorafast::dropout_keep(seed, c, p) ? 1.0f : 0.0f);
}
