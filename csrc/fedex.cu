// lorafast::fedex_merge_ on CUDA: W += U V in place, with optional fp32 compensation C.
// The product D = U V (M×N, fp32) comes from cuBLAS through ATen in the binding; this kernel
// is the fused update that keeps what W's dtype cannot hold:
//   without C:  W' = round(W + D)
//   with C:     t = C + D,  W' = round(W + t),  C' = (W − W') + t   (W − W' is exact)
// W and C may be strided views (a GPT-2 Conv1D base is the transpose of its parameter).
#include <algorithm>

#include "dtypes.cuh"
#include "launchers.h"

namespace lorafast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(T* w, int64_t w_s0, int64_t w_s1, float* comp,
                                                         int64_t c_s0, int64_t c_s1, const float* __restrict__ delta,
                                                         int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = idx / cols, j = idx - i * cols;
    T* wp = w + i * w_s0 + j * w_s1;
    const float old = to_float(*wp);
    if (comp == nullptr) {
      *wp = from_float<T>(old + delta[idx]);
    } else {
      float* cp = comp + i * c_s0 + j * c_s1;
      const float t = *cp + delta[idx];
      const T fresh = from_float<T>(old + t);
      *wp = fresh;
      *cp = (old - to_float(fresh)) + t;
    }
  }
}

template <typename T>
cudaError_t launch(void* w, int64_t w_s0, int64_t w_s1, float* comp, int64_t c_s0, int64_t c_s1, const float* delta,
                   int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t n = rows * cols;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8);
  merge_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<T*>(w), w_s0, w_s1, comp, c_s0,
                                                                           c_s1, delta, rows, cols);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fedex_merge(void* w, int64_t w_s0, int64_t w_s1, DType dtype, float* comp, int64_t c_s0,
                               int64_t c_s1, const float* delta, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch<float>(w, w_s0, w_s1, comp, c_s0, c_s1, delta, rows, cols, stream);
    case DType::kFloat16: return launch<__half>(w, w_s0, w_s1, comp, c_s0, c_s1, delta, rows, cols, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(w, w_s0, w_s1, comp, c_s0, c_s1, delta, rows, cols, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lorafast
