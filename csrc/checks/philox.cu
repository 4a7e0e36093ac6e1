// Compile check of philox.cuh (and the noise helper of privatize_math.cuh) as device code
// (make cuda-check): every function instantiated in a kernel, for sm_80 and sm_90a. Not part
// of the extension build.
#include <cstdint>

#include "../philox.cuh"
#include "../privatize_math.cuh"

// Thread i handles columns 4i..4i+3 of row `row` of a (·, cols) tensor, one call (buffers of
// 4⌈cols/4⌉ floats).
__global__ void philox_check(float* out, uint32_t* words, uint64_t seed, uint64_t offset, int64_t row,
                             int64_t cols, float p) {
  const int64_t col = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (col >= cols) return;
  const uint64_t call = lorafast::philox_call(offset, row, col, cols);
  const lorafast::Philox4 w = lorafast::philox(seed, call);
  words[col] = w.x0;
  words[col + 1] = w.x1;
  words[col + 2] = w.x2;
  words[col + 3] = w.x3;
  const lorafast::Float4 u = lorafast::philox_uniform4(seed, call), z = lorafast::philox_normal4(seed, call);
  const lorafast::Float4 n = lorafast::privatize_noise4(0.5f, seed, offset, row, col, cols);
  for (int k = 0; k < 4; ++k)
    out[col + k] = (u.v[k] >= p ? 1.0f : 0.0f) + z.v[k] + n.v[k] +
                   static_cast<float>(lorafast::philox_calls_per_row(cols));
}
