// Launchers of the CUDA kernels: plain C++ signatures over raw pointers and a stream, so
// that the kernels compile with the CUDA runtime headers alone (make cuda-check) and the
// torch binding (bindings.cpp) stays a thin layer built only where torch has CUDA.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace lorafast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// lorafast::privatize on h viewed as R rows of L contiguous elements. mode: 0 "sample" or
// "token" (rows clipped to L2 ≤ clip), 1 "element". sq (R,) fp32 receives the rows' squared
// norms (zeroed here). Returns the launch error, if any.
cudaError_t launch_privatize(const void* x, void* y, float* sq, int64_t rows, int64_t cols, DType dtype,
                             int mode, float clip, float noise_std, uint64_t seed, uint64_t offset,
                             cudaStream_t stream);

}  // namespace lorafast
