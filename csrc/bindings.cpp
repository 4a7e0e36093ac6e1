// Torch binding of the CUDA kernels: ops in namespace lorafast_cuda (TORCH_LIBRARY), CUDA
// implementations (TORCH_LIBRARY_IMPL). Built only where torch has CUDA (setup.py ahead of
// time, or lorafast/_cuda.py just in time); the kernels themselves live in *.cu files that
// need only the CUDA runtime headers. Fake kernels are registered in lorafast/_cuda.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "launchers.h"

namespace {

lorafast::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return lorafast::DType::kFloat32;
    case at::kHalf: return lorafast::DType::kFloat16;
    case at::kBFloat16: return lorafast::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "lorafast_cuda: expected float32, float16 or bfloat16, got ", t.scalar_type());
  return lorafast::DType::kFloat32;  // not reached
}

std::tuple<at::Tensor, at::Tensor> privatize(const at::Tensor& h, double clip_norm, double noise_std,
                                             std::string mode, int64_t seed, int64_t offset) {
  TORCH_CHECK(h.is_cuda(), "lorafast_cuda::privatize: h must be a CUDA tensor");
  TORCH_CHECK(h.dim() >= 1, "lorafast_cuda::privatize: h must have at least one dim");
  TORCH_CHECK(mode == "sample" || mode == "token" || mode == "element",
              "lorafast_cuda::privatize: mode must be sample, token or element, got ", mode);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor x = h.contiguous();
  const int64_t cols = mode == "sample" ? (x.dim() > 1 ? x.numel() / std::max<int64_t>(x.size(0), 1) : x.numel())
                                        : x.size(-1);
  const int64_t rows = cols > 0 ? x.numel() / cols : 0;
  TORCH_CHECK(cols <= int64_t(65535) * 2048, "lorafast_cuda::privatize: rows of ", cols,
              " elements are longer than the kernel's grid covers (134M)");
  at::Tensor y = at::empty_like(x);
  at::Tensor sq = at::zeros({rows}, x.options().dtype(at::kFloat));
  const cudaError_t err = lorafast::launch_privatize(
      x.data_ptr(), y.data_ptr(), sq.data_ptr<float>(), rows, cols, dtype_of(x), mode == "element" ? 1 : 0,
      static_cast<float>(clip_norm), static_cast<float>(noise_std), static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lorafast_cuda::privatize: ", cudaGetErrorString(err));
  return {y, sq};
}

}  // namespace

TORCH_LIBRARY(lorafast_cuda, m) {
  m.def("privatize(Tensor h, float clip_norm, float noise_std, str mode, int seed, int offset) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lorafast_cuda, CUDA, m) { m.impl("privatize", &privatize); }
