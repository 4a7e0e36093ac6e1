// C entry points over csrc/launchers.h for the host emulation (tests/cuda_emu.py loads them
// with ctypes). The stream is the emulation's null stream; dtype is lorafast::DType's value.
#include "launchers.h"

using lorafast::DType;

extern "C" {

int emu_privatize(const void* x, void* y, float* sq, int64_t rows, int64_t cols, int dtype, int mode, float clip,
                  float noise_std, uint64_t seed, uint64_t offset) {
  return lorafast::launch_privatize(x, y, sq, rows, cols, static_cast<DType>(dtype), mode, clip, noise_std, seed,
                                    offset, nullptr);
}

int emu_grad_sample_sq_norms(const float* g, int64_t n, int64_t ld, const int64_t* chunks, int64_t n_chunks, float* sq,
                             int64_t p) {
  return lorafast::launch_grad_sample_sq_norms(g, n, ld, chunks, n_chunks, sq, p, nullptr);
}

int emu_clip_reduce_noise(const float* g, int64_t n, int64_t ld, const int64_t* chunks, int64_t n_chunks,
                          int64_t chunk_width, const float* coef, int64_t coef_stride, bool per_layer, const float* acc,
                          const float* noise, int noise_mode, float noise_std, uint64_t seed, uint64_t offset,
                          float out_scale, float* out) {
  return lorafast::launch_clip_reduce_noise(g, n, ld, chunks, n_chunks, chunk_width, coef, coef_stride, per_layer, acc,
                                            noise, noise_mode, noise_std, seed, offset, out_scale, out, nullptr);
}

int emu_fedex_merge(void* w, int64_t w_s0, int64_t w_s1, int dtype, float* comp, int64_t c_s0, int64_t c_s1,
                    const float* delta, int64_t rows, int64_t cols) {
  return lorafast::launch_fedex_merge(w, w_s0, w_s1, static_cast<DType>(dtype), comp, c_s0, c_s1, delta, rows, cols,
                                      nullptr);
}

int emu_rank_reduce(const void* x, int64_t sxm, int64_t sxk, int64_t m, int64_t k, int dtype, const float* p,
                    int64_t spk, int64_t spr, float* out, float out_scale, const float* l, float l_scale, float* dw,
                    int64_t sds, int64_t sdk, int64_t sdr, int64_t rows_per_sample, float* dbias, int r,
                    double dropout_p, uint64_t seed, uint64_t offset, int sms) {
  return lorafast::launch_rank_reduce(x, sxm, sxk, m, k, static_cast<DType>(dtype), p, spk, spr, out, out_scale, l,
                                      l_scale, dw, sds, sdk, sdr, rows_per_sample, dbias, r, dropout_p, seed, offset,
                                      sms, nullptr);
}

int emu_rank_update(void* y, int64_t sym, int64_t m, int64_t n, int dtype, const float* h, int r, const float* u,
                    int64_t sur, int64_t sun, const float* bias, float scale, double dropout_p, uint64_t seed,
                    uint64_t offset) {
  return lorafast::launch_rank_update(y, sym, m, n, static_cast<DType>(dtype), h, r, u, sur, sun, bias, scale,
                                      dropout_p, seed, offset, nullptr);
}

}  // extern "C"
