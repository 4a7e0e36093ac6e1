// fp32 ⇄ storage-dtype conversions for the kernels' loads and stores (round to nearest even),
// and the four-consecutive-element loads and stores of threads that own one Philox call's
// group of columns.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lorafast {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Four consecutive elements as one 8- or 16-byte access.
template <typename T> struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// How many of four elements lie before an end `left` elements away: clamp(left, 0, 4).
__device__ __forceinline__ int count4(int64_t left) { return left <= 0 ? 0 : (left >= 4 ? 4 : static_cast<int>(left)); }

template <typename T> __device__ __forceinline__ bool pack4_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack4<T>) == 0;
}

// out[w] = p[w·stride] for lo <= w < hi, else 0; one vector load when all four are wanted,
// contiguous and aligned. Elements outside [lo, hi) are not read.
template <typename T>
__device__ __forceinline__ void load4(const T* p, int64_t stride, int lo, int hi, float (&out)[4]) {
  if (lo == 0 && hi >= 4 && stride == 1 && pack4_aligned(p)) {
    const Pack4<T> q = *reinterpret_cast<const Pack4<T>*>(p);
#pragma unroll
    for (int w = 0; w < 4; ++w) out[w] = to_float(q.v[w]);
  } else {
#pragma unroll
    for (int w = 0; w < 4; ++w) out[w] = (w >= lo && w < hi) ? to_float(p[w * stride]) : 0.0f;
  }
}

// p[w] = v[w] for w < n (unit stride), as one vector store when n >= 4 and p is aligned.
template <typename T>
__device__ __forceinline__ void store4(T* p, int n, const float (&v)[4]) {
  if (n >= 4 && pack4_aligned(p)) {
    Pack4<T> q;
#pragma unroll
    for (int w = 0; w < 4; ++w) q.v[w] = from_float<T>(v[w]);
    *reinterpret_cast<Pack4<T>*>(p) = q;
  } else {
#pragma unroll
    for (int w = 0; w < 4; ++w)
      if (w < n) p[w] = from_float<T>(v[w]);
  }
}

}  // namespace lorafast
