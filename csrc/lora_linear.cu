// The rank-r parts of the LoRA linear on CUDA; the large GEMMs (x Wᵀ, G W) are cuBLAS
// through ATen, and lorafast/_cuda_lora.py composes the two kernels below around them:
//
// rank_reduce_kernel   one pass over the rows of X (M, K), optionally through inverted
//                      dropout with the Philox mask of element (m, k) (number k mod 4 of call
//                      offset + m⌈K/4⌉ + ⌊k/4⌋, philox.cuh):
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
// Both run on the CUDA cores in fp32 from shared-memory tiles (2r flops per element of X or
// Y), and the grid of rank_reduce also splits K so that short-and-wide activations still
// fill the GPU (OUT is then summed with atomics). fp32 atomics make the last bits of OUT
// (split K), DW and DB order-dependent. Every thread that touches X or Y owns groups of four
// consecutive columns starting at a multiple of 4, so dropout costs one Philox call per four
// elements.
#include <algorithm>

#include "dtypes.cuh"
#include "launchers.h"
#include "philox.cuh"

namespace lorafast {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceBK = 32;    // columns of X per shared-memory tile (a multiple of 4)
constexpr int kMicro = 4;        // register micro-tiles are kMicro × kMicro
constexpr int kUpdateBM = 32;    // rows of Y per block
constexpr int kUpdateBN = 128;   // columns of Y per block
constexpr int kUpdateRC = 16;    // rank columns per shared-memory tile

struct ReduceArgs {
  const void* x; int64_t sxm, sxk, m, k;
  const float* p; int64_t spk, spr;           // may be null
  float* out; float out_scale;                // (M, r) contiguous; may be null
  const float* l; float l_scale;              // (M, r) contiguous; null iff dw is null
  float* dw; int64_t sds, sdk, sdr;           // may be null
  bool dw_k_fast;                             // DW atomics with consecutive lanes on consecutive k
  int64_t rows_per_sample;                    // T; M for one shared slice
  float* dbias;                               // may be null
  int r;
  float p_drop, inv_keep; uint64_t seed, offset;
  int64_t k_per_split;                        // a multiple of kReduceBK
};

constexpr int cmax(int a, int b) { return a > b ? a : b; }

// Thread layouts of rank_reduce for the padded rank RP (16, 32, 64, 128); BK = kReduceBK.
//   OUT: thread (os, om, oj) holds rows om + OM·a and rank columns oj + OJ·t (a, t < 4) of
//        OUT, summed over the tile columns kk ≡ os (mod OS); the OS partial sums meet once,
//        at the end of the block.
//   DW:  thread (ds, dk, dj) holds columns dk + DK·u of the tile and rank columns dj + DJ·t
//        (u, t < 4) of DW, summed over the tile rows i ≡ ds (mod DS); the DS partial sums
//        meet in shared memory at the end of each sample's run of rows (the flush), and the
//        flush's atomics put consecutive lanes on consecutive addresses of DW's unit stride.
// Shared-memory loads per FMA, i.e. per element of X and rank column (OUT and DW each do one
// FMA per pair), per thread:
//   before (one rank column per thread): OUT loaded ps once per kk and xs once per FMA,
//     (1 + n)/n with n = BM·RP/256 rows per thread (1.25 at RP = 16, BM = 64); DW loaded xs
//     and ls for every FMA: 2. OUT + DW at r ≤ 16: 1.625 (warp-wide, 1.625 LDS per element
//     of X; 12.25 at RP = 128).
//   now: 4 + 4 loads per 16 FMAs of a micro-tile, 0.5 for OUT and for DW (0.5 LDS per element
//     of X at RP = 16; 4 at RP = 128). The flush adds 16 stores and DS·BK·r/256 loads per
//     thread and sample run of a tile, against 16·BM/DS FMAs when a tile holds one sample:
//     +0.125 at RP = 16 (BM = 128, DS = 8), +0.0625 at RP = 128; more for samples shorter
//     than BM rows.
// The micro-tile loads and the staging stores are free of bank conflicts: a warp lies in one
// slice, its lanes read consecutive addresses of one row (xs rows padded to BK + 1 for OUT's
// column-strided reads), and the staging strides below spread each warp's stores over 32 banks.
template <int RP> struct ReducePlan {
  static constexpr int BK = kReduceBK;
  static constexpr int BM = RP == 128 ? 32 : (RP == 16 ? 128 : 64);   // rows of X per block
  static constexpr int OJ = RP / kMicro, OM = BM / kMicro, OS = kThreads / (OJ * OM);
  static constexpr int DJ = RP / kMicro, DK = BK / kMicro, DS = kThreads / (DJ * DK);
  // staging row strides: DW by k, RP + DJ (the 32/DJ rows a warp stores start in distinct
  // groups of DJ banks), or by rank column, BK + 8 (a warp's 4 rank columns start 8 banks
  // apart); OUT by row, RP + OJ (as DW by k)
  static constexpr int kDwRowJ = RP + DJ, kDwRowK = BK + 8, kOutRow = RP + OJ;
  static constexpr int kStage = cmax(cmax(BK * RP, DS * BK * kDwRowJ), cmax(DS * RP * kDwRowK, OS * BM * kOutRow));
  static_assert(OS * OJ * OM == kThreads && DS * DJ * DK == kThreads && BK % OS == 0, "layout");
  static_assert(OJ * OM % 32 == 0 && DJ * DK % 32 == 0, "a warp must lie in one slice");
};

// 3 blocks per SM: ≤ 80 registers (no spills) and 3 × ≤ 46 KB of shared memory fit sm_80 and sm_90
template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 3) rank_reduce_kernel(ReduceArgs a) {
  using Plan = ReducePlan<RP>;
  constexpr int BM = Plan::BM, BK = Plan::BK;
  constexpr int OJ = Plan::OJ, OM = Plan::OM, OS = Plan::OS;
  constexpr int DJ = Plan::DJ, DK = Plan::DK, DS = Plan::DS;
  __shared__ float xs[BM][BK + 1];
  __shared__ float ls[BM][RP];
  __shared__ float db_part[kThreads / 32][32];
  // P's tile ps[kk][j] during the OUT step, then the DW and OUT partial sums
  __shared__ float stage[Plan::kStage];

  const T* x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int rows = static_cast<int>(min(static_cast<int64_t>(BM), a.m - m0));
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * a.k_per_split;
  const int64_t k_end = min(a.k, k_begin + a.k_per_split);
  const bool has_out = a.p != nullptr && a.out != nullptr, has_dw = a.dw != nullptr;
  const bool k_fast = a.dw_k_fast;

  const int oj = tid % OJ, om = (tid / OJ) % OM, os = tid / (OJ * OM);
  // DW lanes run along rank columns, or along k when DW's k stride is 1 (its store pattern)
  const int dj = k_fast ? (tid / DK) % DJ : tid % DJ;
  const int dk = k_fast ? tid % DK : (tid / DJ) % DK;
  const int ds = tid / (DJ * DK);
  auto dw_slot = [&](int d, int kk, int j) {
    return k_fast ? (d * RP + j) * Plan::kDwRowK + kk : (d * BK + kk) * Plan::kDwRowJ + j;
  };

  if (has_dw) {
    for (int e = tid; e < BM * RP; e += kThreads) {
      const int i = e / RP, j = e % RP;
      ls[i][j] = (i < rows && j < a.r) ? a.l[(m0 + i) * a.r + j] * a.l_scale : 0.0f;
    }
  }
  float out_acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int t = 0; t < kMicro; ++t) out_acc[i][t] = 0.0f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    __syncthreads();   // the previous tile is consumed
    // X: groups of four columns, one Philox call each (k0 is a multiple of 4)
    for (int e = tid; e < BM * (BK / 4); e += kThreads) {
      const int i = e / (BK / 4), c = 4 * (e % (BK / 4));
      const int64_t gm = m0 + i, gk = k0 + c;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (i < rows && gk < k_end) {
        load4(x + gm * a.sxm + gk * a.sxk, a.sxk, 0, count4(k_end - gk), v);
        if (a.p_drop > 0.0f) {
          const Float4 u = philox_uniform4(a.seed, philox_call(a.offset, gm, gk, a.k));
#pragma unroll
          for (int w = 0; w < 4; ++w) v[w] = u.v[w] >= a.p_drop ? v[w] * a.inv_keep : 0.0f;
        }
      }
#pragma unroll
      for (int w = 0; w < 4; ++w) xs[i][c + w] = v[w];
    }
    if (has_out) {
      for (int e = tid; e < BK * RP; e += kThreads) {
        const int kk = e / RP, j = e % RP;
        const int64_t gk = k0 + kk;
        stage[kk * RP + j] = (gk < k_end && j < a.r) ? a.p[gk * a.spk + j * a.spr] : 0.0f;
      }
    }
    __syncthreads();

    if (has_out) {
#pragma unroll 4
      for (int kk = os; kk < BK; kk += OS) {
        float xv[kMicro], pv[kMicro];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) xv[i] = xs[om + OM * i][kk];
#pragma unroll
        for (int t = 0; t < kMicro; ++t) pv[t] = stage[kk * RP + oj + OJ * t];
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int t = 0; t < kMicro; ++t) out_acc[i][t] += xv[i] * pv[t];
      }
    }
    if (has_dw) {
      // the tile's rows in runs of one sample each; every run ends in a block-wide flush
      for (int i0 = 0; i0 < rows;) {
        const int64_t sample = (m0 + i0) / a.rows_per_sample;
        const int i1 = static_cast<int>(min(static_cast<int64_t>(rows), (sample + 1) * a.rows_per_sample - m0));
        float acc[kMicro][kMicro];
#pragma unroll
        for (int u = 0; u < kMicro; ++u)
#pragma unroll
          for (int t = 0; t < kMicro; ++t) acc[u][t] = 0.0f;
        for (int i = i0 + ds; i < i1; i += DS) {
          float xv[kMicro], lv[kMicro];
#pragma unroll
          for (int u = 0; u < kMicro; ++u) xv[u] = xs[i][dk + DK * u];
#pragma unroll
          for (int t = 0; t < kMicro; ++t) lv[t] = ls[i][dj + DJ * t];
#pragma unroll
          for (int u = 0; u < kMicro; ++u)
#pragma unroll
            for (int t = 0; t < kMicro; ++t) acc[u][t] += xv[u] * lv[t];
        }
        // flush: the DS slices' partial sums meet in `stage`, then one atomic per element of DW,
        // consecutive lanes on consecutive addresses of DW's unit stride
        __syncthreads();   // `stage` is free (P's tile, or the previous flush, is consumed)
#pragma unroll
        for (int u = 0; u < kMicro; ++u)
#pragma unroll
          for (int t = 0; t < kMicro; ++t) stage[dw_slot(ds, dk + DK * u, dj + DJ * t)] = acc[u][t];
        __syncthreads();
        float* dw = a.dw + sample * a.sds;
        for (int e = tid; e < BK * a.r; e += kThreads) {
          const int kk = k_fast ? e % BK : e / a.r, j = k_fast ? e / BK : e % a.r;
          if (k0 + kk >= k_end) continue;
          float s = 0.0f;
#pragma unroll
          for (int d = 0; d < DS; ++d) s += stage[dw_slot(d, kk, j)];
          atomicAdd(dw + (k0 + kk) * a.sdk + j * a.sdr, s);
        }
        i0 = i1;
      }
    }
    if (a.dbias != nullptr) {
      // column tid % 32 over the rows ≡ tid / 32 (mod 8), then the 8 partial sums
      const int c = tid % 32, g = tid / 32;
      float s = 0.0f;
      for (int i = g; i < rows; i += kThreads / 32) s += xs[i][c];
      db_part[g][c] = s;
      __syncthreads();
      if (tid < BK && k0 + tid < k_end) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < kThreads / 32; ++w) total += db_part[w][tid];
        atomicAdd(a.dbias + k0 + tid, total);
      }
    }
  }

  if (!has_out) return;
  const bool split = gridDim.y > 1;
  if constexpr (OS == 1) {
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int row = om + OM * i;
      if (row >= rows) continue;
#pragma unroll
      for (int t = 0; t < kMicro; ++t) {
        const int j = oj + OJ * t;
        if (j >= a.r) continue;
        float* o = a.out + (m0 + row) * a.r + j;
        if (split) atomicAdd(o, out_acc[i][t] * a.out_scale);
        else *o = out_acc[i][t] * a.out_scale;
      }
    }
  } else {
    __syncthreads();   // `stage` is free
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int t = 0; t < kMicro; ++t) stage[(os * BM + om + OM * i) * Plan::kOutRow + oj + OJ * t] = out_acc[i][t];
    __syncthreads();
    // OUT's rows are contiguous (row stride r): element e of the block is out[m0·r + e]
    for (int e = tid; e < rows * a.r; e += kThreads) {
      const int row = e / a.r, j = e % a.r;
      float s = 0.0f;
#pragma unroll
      for (int d = 0; d < OS; ++d) s += stage[(d * BM + row) * Plan::kOutRow + j];
      float* o = a.out + m0 * a.r + e;
      if (split) atomicAdd(o, s * a.out_scale);
      else *o = s * a.out_scale;
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

// Thread (grp, c) owns rows grp + 8i (i < 4) and the four columns 4c..4c+3 of the block's
// 128: one Philox call per row, and a 4×4 micro-tile (4 + 4 shared loads per 16 FMAs).
template <typename T>
__global__ void __launch_bounds__(kThreads) rank_update_kernel(UpdateArgs a) {
  constexpr int kColThreads = kUpdateBN / 4;
  constexpr int kRowGroups = kThreads / kColThreads;
  constexpr int kRowsPer = kUpdateBM / kRowGroups;
  static_assert(kColThreads == 32, "a warp spans one row of the block");
  __shared__ float hs[kUpdateBM][kUpdateRC + 1];
  // column 4c + w of the block at us[jj][w·32 + c]: a warp's loads of one w hit 32 banks
  __shared__ float us[kUpdateRC][kUpdateBN];

  T* y = static_cast<T*>(a.y);
  const int tid = threadIdx.x, c = tid % kColThreads, grp = tid / kColThreads;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kUpdateBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kUpdateBN;
  float acc[kRowsPer][4];
#pragma unroll
  for (int i = 0; i < kRowsPer; ++i)
#pragma unroll
    for (int w = 0; w < 4; ++w) acc[i][w] = 0.0f;

  for (int j0 = 0; j0 < a.r; j0 += kUpdateRC) {
    __syncthreads();
    for (int e = tid; e < kUpdateBM * kUpdateRC; e += kThreads) {
      const int i = e / kUpdateRC, jj = e % kUpdateRC;
      hs[i][jj] = (m0 + i < a.m && j0 + jj < a.r) ? a.h[(m0 + i) * a.r + j0 + jj] : 0.0f;
    }
    for (int e = tid; e < kUpdateRC * kUpdateBN; e += kThreads) {
      const int jj = e / kUpdateBN, slot = e % kUpdateBN;
      const int64_t gn = n0 + 4 * (slot % kColThreads) + slot / kColThreads;
      us[jj][slot] = (gn < a.n && j0 + jj < a.r) ? a.u[(j0 + jj) * a.sur + gn * a.sun] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kUpdateRC; ++jj) {
      float uv[4], hv[kRowsPer];
#pragma unroll
      for (int w = 0; w < 4; ++w) uv[w] = us[jj][w * kColThreads + c];
#pragma unroll
      for (int i = 0; i < kRowsPer; ++i) hv[i] = hs[grp + i * kRowGroups][jj];
#pragma unroll
      for (int i = 0; i < kRowsPer; ++i)
#pragma unroll
        for (int w = 0; w < 4; ++w) acc[i][w] += hv[i] * uv[w];
    }
  }

  const int64_t gn = n0 + 4 * c;   // a multiple of 4: one Philox call per row
  if (gn >= a.n) return;
  const int cols = count4(a.n - gn);
  float bias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (a.bias != nullptr)
#pragma unroll
    for (int w = 0; w < 4; ++w) bias[w] = w < cols ? a.bias[gn + w] : 0.0f;
#pragma unroll
  for (int i = 0; i < kRowsPer; ++i) {
    const int64_t gm = m0 + grp + i * kRowGroups;
    if (gm >= a.m) continue;
    float low[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) low[w] = acc[i][w] * a.scale;
    if (a.p_drop > 0.0f) {
      const Float4 u = philox_uniform4(a.seed, philox_call(a.offset, gm, gn, a.n));
#pragma unroll
      for (int w = 0; w < 4; ++w) low[w] = u.v[w] >= a.p_drop ? low[w] * a.inv_keep : 0.0f;
    }
    T* yp = y + gm * a.sym + gn;
    float v[4];
    load4(yp, 1, 0, cols, v);
#pragma unroll
    for (int w = 0; w < 4; ++w) v[w] = v[w] + low[w] + bias[w];
    store4(yp, cols, v);
  }
}

template <typename T, int RP>
cudaError_t reduce_for(const ReduceArgs& a, int sms, cudaStream_t stream) {
  constexpr int BM = ReducePlan<RP>::BM;
  const int64_t row_blocks = (a.m + BM - 1) / BM;
  ReduceArgs args = a;
  // split K while there are fewer than ~4 blocks per SM, in whole tiles
  const int64_t tiles = (a.k + kReduceBK - 1) / kReduceBK;
  const int64_t want = std::max<int64_t>(1, (4 * static_cast<int64_t>(sms) + row_blocks - 1) / row_blocks);
  const int64_t splits = std::min<int64_t>({want, tiles, 65535});
  args.k_per_split = ((tiles + splits - 1) / splits) * kReduceBK;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>((a.k + args.k_per_split - 1) / args.k_per_split));
  rank_reduce_kernel<T, RP><<<grid, kThreads, 0, stream>>>(args);
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
  // DW's atomics follow its unit stride: k for dA (the (K, r) view of an (r, in) buffer), the
  // rank column for dB; with neither, the smaller stride
  const int64_t ak = sdk < 0 ? -sdk : sdk, ar = sdr < 0 ? -sdr : sdr;
  const bool k_fast = sdk == 1 || (sdr != 1 && ak <= ar);
  const ReduceArgs a{x, sxm, sxk, m, k, p, spk, spr, out, out_scale, l, l_scale, dw, sds, sdk, sdr, k_fast,
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
