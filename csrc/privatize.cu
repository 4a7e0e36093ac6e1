// lorafast::privatize on CUDA: clip the smashed activations and add Philox Gaussian noise.
// Same plan as kernels/split.py: one block per (row, chunk); a row that fits one block is
// normed in the block (one launch), a longer row takes a norm launch first. The op is
// memory-bound (read x, write y; the noise is made in registers): each thread handles groups
// of four consecutive elements of a row, one Philox call (four normals) and one vector load
// and store per group, and the grid has rows on axis x (B·T can pass 65535).
#include "dtypes.cuh"
#include "launchers.h"
#include "privatize_math.cuh"

namespace lorafast {
namespace {

constexpr int kThreads = 256;
constexpr int kGroups = 2;                            // groups of four columns per thread
constexpr int64_t kChunk = kThreads * 4 * kGroups;    // elements per block along a row, a multiple of 4

// Sum over the block; every thread gets the total.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_sq_norm_kernel(const T* __restrict__ x, float* __restrict__ sq,
                                                               int64_t cols) {
  const int64_t row = blockIdx.x;
  const int64_t base = row * cols + blockIdx.y * kChunk;
  const int64_t stop = min(kChunk, cols - static_cast<int64_t>(blockIdx.y) * kChunk);
  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < stop; j += kThreads) {
    const float v = to_float(x[base + j]);
    acc += v * v;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(sq + row, acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) privatize_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                             float* __restrict__ sq, int64_t cols, bool element,
                                                             bool one_pass, float clip, float noise_std,
                                                             uint64_t seed, uint64_t offset) {
  const int64_t row = blockIdx.x;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kChunk;   // a multiple of 4: calls start here
  const int64_t start = row * cols + col0;
  const int64_t stop = min(kChunk, cols - col0);
  // group q = threadIdx.x + h·kThreads holds columns 4q..4q+3 of the chunk (lanes: consecutive groups)
  float v[kGroups][4];
  float acc = 0.0f;
#pragma unroll
  for (int h = 0; h < kGroups; ++h) {
    const int64_t j = 4 * (threadIdx.x + static_cast<int64_t>(h) * kThreads);
    load4(x + start + j, 1, 0, count4(stop - j), v[h]);
#pragma unroll
    for (int w = 0; w < 4; ++w) acc += v[h][w] * v[h][w];
  }
  float factor = 1.0f;
  if (!element) {
    if (one_pass) {
      const float total = block_sum(acc);
      if (threadIdx.x == 0) sq[row] = total;
      factor = clip_factor(total, clip);
    } else {
      factor = clip_factor(sq[row], clip);
    }
  }
#pragma unroll
  for (int h = 0; h < kGroups; ++h) {
    const int64_t j = 4 * (threadIdx.x + static_cast<int64_t>(h) * kThreads);
    if (j >= stop) continue;
    const Float4 noise = privatize_noise4(noise_std, seed, offset, row, col0 + j, cols);
    float out[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) out[w] = privatize_value(v[h][w], element, factor, clip, noise.v[w]);
    store4(y + start + j, count4(stop - j), out);
  }
}

template <typename T>
cudaError_t launch(const void* x, void* y, float* sq, int64_t rows, int64_t cols, int mode, float clip,
                   float noise_std, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  const bool element = mode == 1;
  const bool one_pass = cols <= kChunk;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((cols + kChunk - 1) / kChunk));
  cudaError_t err = cudaMemsetAsync(sq, 0, sizeof(float) * rows, stream);
  if (err != cudaSuccess) return err;
  const T* xt = static_cast<const T*>(x);
  if (!element && !one_pass) row_sq_norm_kernel<T><<<grid, kThreads, 0, stream>>>(xt, sq, cols);
  privatize_kernel<T><<<grid, kThreads, 0, stream>>>(xt, static_cast<T*>(y), sq, cols, element, one_pass, clip,
                                                     noise_std, seed, offset);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_privatize(const void* x, void* y, float* sq, int64_t rows, int64_t cols, DType dtype, int mode,
                             float clip, float noise_std, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch<float>(x, y, sq, rows, cols, mode, clip, noise_std, seed, offset, stream);
    case DType::kFloat16: return launch<__half>(x, y, sq, rows, cols, mode, clip, noise_std, seed, offset, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(x, y, sq, rows, cols, mode, clip, noise_std, seed, offset, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lorafast
