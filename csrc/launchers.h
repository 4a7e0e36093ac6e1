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
// norms (zeroed here). The noise of element (i, j) is number j mod 4 of Philox call
// offset + i⌈L/4⌉ + ⌊j/4⌋ (philox.cuh). Returns the launch error, if any.
cudaError_t launch_privatize(const void* x, void* y, float* sq, int64_t rows, int64_t cols, DType dtype,
                             int mode, float clip, float noise_std, uint64_t seed, uint64_t offset,
                             cudaStream_t stream);

// lorafast::grad_sample_norms: sq (N, P) fp32, zeroed by the caller, += each chunk's ‖G[i, chunk]‖².
// g (N, D) fp32 with row stride ld; chunks: n_chunks rows of int64 (start, stop, parameter).
cudaError_t launch_grad_sample_sq_norms(const float* g, int64_t n, int64_t ld, const int64_t* chunks,
                                        int64_t n_chunks, float* sq, int64_t p, cudaStream_t stream);

// lorafast::clip_reduce_noise: out (D,) = (acc + Σᵢ cᵢ gᵢ + std·ξ) · out_scale with clip factors
// coef (N, 1) or, per_layer, (N, P) (row stride coef_stride); acc and noise may be null;
// noise_mode 0 none, 1 Philox (ξ_j number j mod 4 of call offset + ⌊j/4⌋), 2 the given noise.
// A thread owns the four columns 4q..4q+3; chunk_width/4 bounds how many such groups any
// chunk touches (so chunks that start inside a parameter start at a multiple of 4; a wider
// chunk is still right, only slower).
cudaError_t launch_clip_reduce_noise(const float* g, int64_t n, int64_t ld, const int64_t* chunks, int64_t n_chunks,
                                     int64_t chunk_width, const float* coef, int64_t coef_stride, bool per_layer,
                                     const float* acc, const float* noise, int noise_mode, float noise_std,
                                     uint64_t seed, uint64_t offset, float out_scale, float* out,
                                     cudaStream_t stream);

// lorafast::fedex_merge_ update: W (rows, cols) of dtype, strides (w_s0, w_s1), += delta (rows, cols)
// fp32 contiguous, carrying the rounding in comp (fp32, strides c_s0, c_s1) unless comp is null.
cudaError_t launch_fedex_merge(void* w, int64_t w_s0, int64_t w_s1, DType dtype, float* comp, int64_t c_s0,
                               int64_t c_s1, const float* delta, int64_t rows, int64_t cols, cudaStream_t stream);

// The rank-r passes of the LoRA linear (lora_linear.cu; see there for the math). X (m, k) of
// dtype with strides (sxm, sxk); P (k, r) fp32 strided; OUT (m, r) fp32 contiguous and zeroed
// by the caller; L (m, r) fp32 contiguous, given iff DW is; DW (samples, k, r) fp32 with
// strides (sds, sdk, sdr), rows_per_sample rows of X per sample (0: one shared slice);
// dbias (k,) fp32. Any of P/OUT, L/DW, dbias may be null. 1 <= r <= kMaxReduceRank. Dropout
// keeps X's element (i, j) iff number j mod 4 of Philox call offset + i⌈k/4⌉ + ⌊j/4⌋ is >= p.
// sms: the GPU's multiprocessor count, which sets how far K is split across blocks.
constexpr int kMaxReduceRank = 128;
cudaError_t launch_rank_reduce(const void* x, int64_t sxm, int64_t sxk, int64_t m, int64_t k, DType dtype,
                               const float* p, int64_t spk, int64_t spr, float* out, float out_scale, const float* l,
                               float l_scale, float* dw, int64_t sds, int64_t sdk, int64_t sdr,
                               int64_t rows_per_sample, float* dbias, int r, double dropout_p, uint64_t seed,
                               uint64_t offset, int sms, cudaStream_t stream);

// Y (m, n) of dtype, row stride sym and unit column stride, in place:
// Y = Y + (scale · H U) ⊙ keep/(1-p) + bias, H (m, r) fp32 contiguous, U (r, n) fp32 with
// strides (sur, sun), bias (n,) fp32 or null; the mask of (i, j) is number j mod 4 of Philox
// call offset + i⌈n/4⌉ + ⌊j/4⌋.
cudaError_t launch_rank_update(void* y, int64_t sym, int64_t m, int64_t n, DType dtype, const float* h, int r,
                               const float* u, int64_t sur, int64_t sun, const float* bias, float scale,
                               double dropout_p, uint64_t seed, uint64_t offset, cudaStream_t stream);

}  // namespace lorafast
