// DP-SGD kernels on CUDA: per-sample squared norms, and the fused clip-accumulate-noise step.
// Same plan as kernels/dp.py. All trainable parameters' per-sample gradients sit side by side
// in one fp32 buffer G (N, D), parameter p in columns [segments[p], segments[p+1]); both
// kernels walk a table of column chunks (start, stop, segment), each inside one parameter.
//   sq_norm_kernel      S[i, p] += ‖G[i, chunk]‖²          grid: chunks × samples
//   clip_reduce_kernel  out[j] = (acc[j] + Σᵢ cᵢ G[i, j] + std·ξ_j) · scale
//                       one thread per aligned group of four columns 4q..4q+3 (the columns of
//                       one Philox call: ξ of the (1, D) vector is number j mod 4 of call
//                       offset + ⌊j/4⌋), a fixed-order loop over samples (deterministic); a
//                       sample with factor 0 is skipped before the multiply, so a non-finite
//                       gradient cannot reach the sum. Chunk bounds need not be multiples of 4:
//                       a group that straddles one is masked to the chunk's own columns.
#include "dtypes.cuh"
#include "launchers.h"
#include "philox.cuh"

namespace lorafast {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) sq_norm_kernel(const float* __restrict__ g, int64_t ld,
                                                           const int64_t* __restrict__ chunks,
                                                           float* __restrict__ sq, int64_t p) {
  const int64_t c = blockIdx.x, i = blockIdx.y;
  const int64_t start = chunks[3 * c], stop = chunks[3 * c + 1], seg = chunks[3 * c + 2];
  float acc = 0.0f;
  for (int64_t j = start + threadIdx.x; j < stop; j += kThreads) {
    const float v = g[i * ld + j];
    acc += v * v;
  }
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    atomicAdd(sq + i * p + seg, total);
  }
}

__global__ void __launch_bounds__(kThreads) clip_reduce_kernel(
    const float* __restrict__ g, int64_t n, int64_t ld, const int64_t* __restrict__ chunks,
    const float* __restrict__ coef, int64_t coef_stride, bool per_layer, const float* __restrict__ acc,
    const float* __restrict__ noise, int noise_mode, float noise_std, uint64_t seed, uint64_t offset,
    float out_scale, float* __restrict__ out) {
  const int64_t c = blockIdx.x;
  const int64_t start = chunks[3 * c], stop = chunks[3 * c + 1], seg = chunks[3 * c + 2];
  const int64_t col = per_layer ? seg : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kThreads;
  // groups 4q..4q+3 from the one holding `start`; more than gridDim.y·kThreads of them only
  // for a chunk table that breaks launch_clip_reduce_noise's width bound (then slower, still right)
  for (int64_t q = start / 4 + blockIdx.y * static_cast<int64_t>(kThreads) + threadIdx.x; 4 * q < stop;
       q += stride) {
    const int64_t j0 = 4 * q;
    const int lo = count4(start - j0), hi = count4(stop - j0);   // the chunk's columns j0 + [lo, hi)
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t i = 0; i < n; ++i) {
      const float ci = coef[i * coef_stride + col];
      if (ci > 0.0f) {
        float v[4];
        load4(g + i * ld + j0, 1, lo, hi, v);
#pragma unroll
        for (int w = 0; w < 4; ++w) sum[w] += ci * v[w];
      }
    }
    Float4 xi{{0.0f, 0.0f, 0.0f, 0.0f}};
    if (noise_mode == 1) xi = philox_normal4(seed, offset + static_cast<uint64_t>(q));
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if (w < lo || w >= hi) continue;
      const int64_t j = j0 + w;
      float s = sum[w];
      if (acc != nullptr) s += acc[j];
      if (noise_mode == 1) s += noise_std * xi.v[w];
      if (noise_mode == 2) s += noise_std * noise[j];
      out[j] = s * out_scale;
    }
  }
}

}  // namespace

cudaError_t launch_grad_sample_sq_norms(const float* g, int64_t n, int64_t ld, const int64_t* chunks,
                                        int64_t n_chunks, float* sq, int64_t p, cudaStream_t stream) {
  if (n == 0 || n_chunks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(n));
  sq_norm_kernel<<<grid, kThreads, 0, stream>>>(g, ld, chunks, sq, p);
  return cudaGetLastError();
}

cudaError_t launch_clip_reduce_noise(const float* g, int64_t n, int64_t ld, const int64_t* chunks, int64_t n_chunks,
                                     int64_t chunk_width, const float* coef, int64_t coef_stride, bool per_layer,
                                     const float* acc, const float* noise, int noise_mode, float noise_std,
                                     uint64_t seed, uint64_t offset, float out_scale, float* out,
                                     cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  const int64_t groups = (chunk_width + 3) / 4;   // of four columns, per chunk
  const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>((groups + kThreads - 1) / kThreads));
  clip_reduce_kernel<<<grid, kThreads, 0, stream>>>(g, n, ld, chunks, coef, coef_stride, per_layer, acc, noise,
                                                    noise_mode, noise_std, seed, offset, out_scale, out);
  return cudaGetLastError();
}

}  // namespace lorafast
