// The rank-r parts of the LoRA linear on CUDA; the large GEMMs (x Wᵀ, G W) are cuBLAS
// through ATen, and lorafast/_cuda_lora.py composes the two kernels below around them:
//
// rank_reduce_kernel   one pass over the rows of X (M, K), optionally through inverted
//                      dropout with the Philox mask of element (m, k) at counter offset + m K + k:
//     OUT (M, r)  = s_out · drop(X) P                     row reduction (P (K, r))
//     DW  (K, r) += s_l · Σ_m drop(X)[m]ᵀ L[m]            column reduction (L (M, r)); with
//                   T rows per sample, rows [iT, (i+1)T) go to sample i's slice DW[i]
//     DB  (K)    += Σ_m drop(X)[m]                         bias gradient
//   Forward   h = drop(x) Aᵀ                      (OUT over x)
//   Backward  g = G B, dB += s Gᵀ (h Rᵀ), db     (OUT, DW and DB in one pass over G)
//             dA += (s g R)ᵀ drop(x)              (DW over x)
// rank_update_kernel   the rank-r epilogue of a GEMM result Y (M, N), in place and in fp32:
//     Y = Y + (s · H U) ⊙ m/(1-p) + b             H (M, r), U (r, N), mask m on (row, col)
//   Forward   y = [x Wᵀ] + s (h Rᵀ) Bᵀ + b;  backward  dx = [G W] + (Lg A) ⊙ m/(1-p).
//
// Both are memory-bound for the ranks LoRA uses (2r flops per element of X or Y), so they
// run on the CUDA cores in fp32 with shared-memory tiles, and the grid of rank_reduce also
// splits K so that short-and-wide activations still fill the GPU (OUT is then summed with
// atomics). fp32 atomics make the last bits of OUT (split K), DW and DB order-dependent.
#include <algorithm>

#include "dtypes.cuh"
#include "launchers.h"
#include "philox.cuh"

namespace lorafast {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceBK = 32;    // columns of X per shared-memory tile
constexpr int kUpdateBM = 32;    // rows of Y per block
constexpr int kUpdateBN = 128;   // columns of Y per block
constexpr int kUpdateRC = 16;    // rank columns per shared-memory tile

struct ReduceArgs {
  const void* x; int64_t sxm, sxk, m, k;
  const float* p; int64_t spk, spr;           // may be null
  float* out; float out_scale;                // (M, r) contiguous; may be null
  const float* l; float l_scale;              // (M, r) contiguous; null iff dw is null
  float* dw; int64_t sds, sdk, sdr;           // may be null
  int64_t rows_per_sample;                    // T; M for one shared slice
  float* dbias;                               // may be null
  int r;
  float p_drop, inv_keep; uint64_t seed, offset;
  int64_t k_per_split;                        // a multiple of kReduceBK
};

template <typename T, int RP, int BM>
__global__ void __launch_bounds__(kThreads) rank_reduce_kernel(ReduceArgs a) {
  static_assert(BM * RP % kThreads == 0 && kReduceBK * RP % kThreads == 0, "tile/thread mismatch");
  constexpr int kGroups = kThreads / RP;             // threads per rank column
  constexpr int kOutPer = BM * RP / kThreads;        // OUT rows per thread
  constexpr int kDwPer = kReduceBK * RP / kThreads;  // DW rows (of K) per thread
  __shared__ float xs[BM][kReduceBK + 1];
  __shared__ float ps[kReduceBK][RP];
  __shared__ float ls[BM][RP];

  const T* x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x, col = tid % RP, grp = tid / RP;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int rows = static_cast<int>(min(static_cast<int64_t>(BM), a.m - m0));
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * a.k_per_split;
  const int64_t k_end = min(a.k, k_begin + a.k_per_split);
  const bool has_p = a.p != nullptr, has_dw = a.dw != nullptr;

  if (has_dw) {
    for (int e = tid; e < BM * RP; e += kThreads) {
      const int i = e / RP, j = e % RP;
      ls[i][j] = (i < rows && j < a.r) ? a.l[(m0 + i) * a.r + j] * a.l_scale : 0.0f;
    }
  }
  float out_acc[kOutPer];
#pragma unroll
  for (int i = 0; i < kOutPer; ++i) out_acc[i] = 0.0f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kReduceBK) {
    __syncthreads();   // the previous tile is consumed
    for (int e = tid; e < BM * kReduceBK; e += kThreads) {
      const int i = e / kReduceBK, kk = e % kReduceBK;
      const int64_t gm = m0 + i, gk = k0 + kk;
      float v = 0.0f;
      if (i < rows && gk < k_end) {
        v = to_float(x[gm * a.sxm + gk * a.sxk]);
        if (a.p_drop > 0.0f)
          v = dropout_keep(a.seed, a.offset + static_cast<uint64_t>(gm * a.k + gk), a.p_drop) ? v * a.inv_keep : 0.0f;
      }
      xs[i][kk] = v;
    }
    if (has_p) {
      for (int e = tid; e < kReduceBK * RP; e += kThreads) {
        const int kk = e / RP, j = e % RP;
        const int64_t gk = k0 + kk;
        ps[kk][j] = (gk < k_end && j < a.r) ? a.p[gk * a.spk + j * a.spr] : 0.0f;
      }
    }
    __syncthreads();

    if (has_p) {
#pragma unroll 8
      for (int kk = 0; kk < kReduceBK; ++kk) {
        const float pv = ps[kk][col];
#pragma unroll
        for (int i = 0; i < kOutPer; ++i) out_acc[i] += xs[grp + i * kGroups][kk] * pv;
      }
    }
    if (has_dw && col < a.r) {
#pragma unroll
      for (int q = 0; q < kDwPer; ++q) {
        const int kk = grp + q * kGroups;
        const int64_t gk = k0 + kk;
        if (gk >= k_end) continue;
        // walk the block's rows, flushing at each sample boundary
        float acc = 0.0f;
        int64_t sample = m0 / a.rows_per_sample;
        for (int i = 0; i < rows; ++i) {
          const int64_t s = (m0 + i) / a.rows_per_sample;
          if (s != sample) {
            atomicAdd(a.dw + sample * a.sds + gk * a.sdk + col * a.sdr, acc);
            acc = 0.0f;
            sample = s;
          }
          acc += xs[i][kk] * ls[i][col];
        }
        atomicAdd(a.dw + sample * a.sds + gk * a.sdk + col * a.sdr, acc);
      }
    }
    if (a.dbias != nullptr && tid < kReduceBK && k0 + tid < k_end) {
      float acc = 0.0f;
      for (int i = 0; i < rows; ++i) acc += xs[i][tid];
      atomicAdd(a.dbias + k0 + tid, acc);
    }
  }

  if (has_p && a.out != nullptr && col < a.r) {
#pragma unroll
    for (int i = 0; i < kOutPer; ++i) {
      const int row = grp + i * kGroups;
      if (row >= rows) continue;
      float* o = a.out + (m0 + row) * a.r + col;
      if (gridDim.y == 1) *o = out_acc[i] * a.out_scale;
      else atomicAdd(o, out_acc[i] * a.out_scale);
    }
  }
}

struct UpdateArgs {
  void* y; int64_t sym, m, n;                 // unit column stride
  const float* h; int r;                      // (M, r) contiguous
  const float* u; int64_t sur, sun;
  const float* bias;                          // (N,) or null
  float scale, p_drop, inv_keep; uint64_t seed, offset;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rank_update_kernel(UpdateArgs a) {
  constexpr int kColThreads = kUpdateBN / 2;               // each thread: columns c and c + BN/2
  constexpr int kRowGroups = kThreads / kColThreads;
  constexpr int kRowsPer = kUpdateBM / kRowGroups;
  __shared__ float hs[kUpdateBM][kUpdateRC + 1];
  __shared__ float us[kUpdateRC][kUpdateBN];

  T* y = static_cast<T*>(a.y);
  const int tid = threadIdx.x, c = tid % kColThreads, grp = tid / kColThreads;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kUpdateBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kUpdateBN;
  float acc[kRowsPer][2];
#pragma unroll
  for (int i = 0; i < kRowsPer; ++i) acc[i][0] = acc[i][1] = 0.0f;

  for (int j0 = 0; j0 < a.r; j0 += kUpdateRC) {
    __syncthreads();
    for (int e = tid; e < kUpdateBM * kUpdateRC; e += kThreads) {
      const int i = e / kUpdateRC, jj = e % kUpdateRC;
      hs[i][jj] = (m0 + i < a.m && j0 + jj < a.r) ? a.h[(m0 + i) * a.r + j0 + jj] : 0.0f;
    }
    for (int e = tid; e < kUpdateRC * kUpdateBN; e += kThreads) {
      const int jj = e / kUpdateBN, nn = e % kUpdateBN;
      us[jj][nn] = (n0 + nn < a.n && j0 + jj < a.r) ? a.u[(j0 + jj) * a.sur + (n0 + nn) * a.sun] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kUpdateRC; ++jj) {
      const float u0 = us[jj][c], u1 = us[jj][c + kColThreads];
#pragma unroll
      for (int i = 0; i < kRowsPer; ++i) {
        const float hv = hs[grp + i * kRowGroups][jj];
        acc[i][0] += hv * u0;
        acc[i][1] += hv * u1;
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPer; ++i) {
    const int64_t gm = m0 + grp + i * kRowGroups;
    if (gm >= a.m) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t gn = n0 + c + half * kColThreads;
      if (gn >= a.n) continue;
      float low = acc[i][half] * a.scale;
      if (a.p_drop > 0.0f)
        low = dropout_keep(a.seed, a.offset + static_cast<uint64_t>(gm * a.n + gn), a.p_drop) ? low * a.inv_keep : 0.0f;
      T* yp = y + gm * a.sym + gn;
      float v = to_float(*yp) + low;
      if (a.bias != nullptr) v += a.bias[gn];
      *yp = from_float<T>(v);
    }
  }
}

template <typename T, int RP>
cudaError_t reduce_for(const ReduceArgs& a, int sms, cudaStream_t stream) {
  constexpr int BM = RP <= 32 ? 64 : 32;   // keeps the three tiles under 48 KB of shared memory
  const int64_t row_blocks = (a.m + BM - 1) / BM;
  ReduceArgs args = a;
  // split K while there are fewer than ~4 blocks per SM, in whole tiles
  const int64_t tiles = (a.k + kReduceBK - 1) / kReduceBK;
  const int64_t want = std::max<int64_t>(1, (4 * static_cast<int64_t>(sms) + row_blocks - 1) / row_blocks);
  const int64_t splits = std::min<int64_t>({want, tiles, 65535});
  args.k_per_split = ((tiles + splits - 1) / splits) * kReduceBK;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>((a.k + args.k_per_split - 1) / args.k_per_split));
  rank_reduce_kernel<T, RP, BM><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t reduce_dispatch(const ReduceArgs& a, int sms, cudaStream_t stream) {
  if (a.r <= 16) return reduce_for<T, 16>(a, sms, stream);
  if (a.r <= 32) return reduce_for<T, 32>(a, sms, stream);
  if (a.r <= 64) return reduce_for<T, 64>(a, sms, stream);
  if (a.r <= 128) return reduce_for<T, 128>(a, sms, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t update_for(const UpdateArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.m + kUpdateBM - 1) / kUpdateBM),
                  static_cast<unsigned>((a.n + kUpdateBN - 1) / kUpdateBN));
  rank_update_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rank_reduce(const void* x, int64_t sxm, int64_t sxk, int64_t m, int64_t k, DType dtype,
                               const float* p, int64_t spk, int64_t spr, float* out, float out_scale, const float* l,
                               float l_scale, float* dw, int64_t sds, int64_t sdk, int64_t sdr,
                               int64_t rows_per_sample, float* dbias, int r, double dropout_p, uint64_t seed,
                               uint64_t offset, int sms, cudaStream_t stream) {
  if (m == 0 || k == 0) return cudaSuccess;
  if (r < 1 || r > kMaxReduceRank || (dw != nullptr) != (l != nullptr) || sms < 1 || (m + 31) / 32 > 2147483647)
    return cudaErrorInvalidValue;
  const ReduceArgs a{x, sxm, sxk, m, k, p, spk, spr, out, out_scale, l, l_scale, dw, sds, sdk, sdr,
                     rows_per_sample > 0 ? rows_per_sample : m, dbias, r, static_cast<float>(dropout_p),
                     static_cast<float>(1.0 / (1.0 - dropout_p)), seed, offset, 0};
  switch (dtype) {
    case DType::kFloat32: return reduce_dispatch<float>(a, sms, stream);
    case DType::kFloat16: return reduce_dispatch<__half>(a, sms, stream);
    case DType::kBFloat16: return reduce_dispatch<__nv_bfloat16>(a, sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_rank_update(void* y, int64_t sym, int64_t m, int64_t n, DType dtype, const float* h, int r,
                               const float* u, int64_t sur, int64_t sun, const float* bias, float scale,
                               double dropout_p, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (r < 1 || (m + kUpdateBM - 1) / kUpdateBM > 2147483647 || (n + kUpdateBN - 1) / kUpdateBN > 65535)
    return cudaErrorInvalidValue;
  const UpdateArgs a{y, sym, m, n, h, r, u, sur, sun, bias, scale, static_cast<float>(dropout_p),
                     static_cast<float>(1.0 / (1.0 - dropout_p)), seed, offset};
  switch (dtype) {
    case DType::kFloat32: return update_for<float>(a, stream);
    case DType::kFloat16: return update_for<__half>(a, stream);
    case DType::kBFloat16: return update_for<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lorafast
