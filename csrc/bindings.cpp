// Torch binding of the CUDA kernels: ops in namespace lorafast_cuda (TORCH_LIBRARY), CUDA
// implementations (TORCH_LIBRARY_IMPL). Built only where torch has CUDA (setup.py ahead of
// time, or lorafast/_cuda.py just in time); the kernels themselves live in *.cu files that
// need only the CUDA runtime headers. Fake kernels are registered in lorafast/_cuda.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

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
  at::Tensor sq = at::empty({rows}, x.options().dtype(at::kFloat));   // zeroed by the launcher
  const cudaError_t err = lorafast::launch_privatize(
      x.data_ptr(), y.data_ptr(), sq.data_ptr<float>(), rows, cols, dtype_of(x), mode == "element" ? 1 : 0,
      static_cast<float>(clip_norm), static_cast<float>(noise_std), static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lorafast_cuda::privatize: ", cudaGetErrorString(err));
  return {y, sq};
}

constexpr int64_t kChunkWidth = 4096;   // columns per chunk of the DP kernels

void check_grad_sample(const at::Tensor& g, const std::vector<int64_t>& segments, const char* op) {
  TORCH_CHECK(g.is_cuda() && g.dim() == 2 && g.scalar_type() == at::kFloat && g.stride(1) == 1,
              "lorafast_cuda::", op, ": grad_sample must be a CUDA fp32 (N, D) tensor with unit column stride");
  TORCH_CHECK(segments.size() >= 1 && segments.front() == 0 && segments.back() == g.size(1),
              "lorafast_cuda::", op, ": segments must run from 0 to D = ", g.size(1));
}

// Small device tables derived from op arguments (the DP chunk table, the per-parameter clip
// bounds), built once per (contents, device) and kept: a warm DP step then makes no host→device
// copy. Bounded: past kMaxEntries the oldest entry goes (a model has a handful of layouts). A
// table handed out is recorded on the caller's stream, so that dropping it later cannot free its
// memory under a kernel of another stream that still reads it.
template <typename Key>
class DeviceTables {
 public:
  template <typename Make>
  at::Tensor get(const Key& key, Make&& make) {
    at::Tensor t;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      auto it = tables_.find(key);
      if (it == tables_.end()) {
        if (order_.size() >= kMaxEntries) {
          tables_.erase(order_.front());
          order_.pop_front();
        }
        it = tables_.emplace(key, make()).first;
        order_.push_back(key);
      }
      t = it->second;
    }
    t.record_stream(at::cuda::getCurrentCUDAStream());
    return t;
  }

 private:
  static constexpr size_t kMaxEntries = 64;
  std::mutex mu_;
  std::map<Key, at::Tensor> tables_;
  std::deque<Key> order_;
};

// never destroyed: the tables would otherwise be freed after CUDA's own teardown at exit
using ChunkKey = std::tuple<std::vector<int64_t>, int64_t, c10::DeviceIndex>;
using BoundKey = std::pair<std::vector<double>, c10::DeviceIndex>;
DeviceTables<ChunkKey>& chunk_tables() {
  static auto* tables = new DeviceTables<ChunkKey>();
  return *tables;
}
DeviceTables<BoundKey>& bound_tables() {
  static auto* tables = new DeviceTables<BoundKey>();
  return *tables;
}

// (start, stop, parameter) rows of at most kChunkWidth columns, each inside one parameter. A
// chunk that starts inside a parameter starts at a multiple of 4, so that no chunk touches more
// than kChunkWidth/4 of the Philox four-column groups that clip_reduce_noise's threads own.
at::Tensor chunk_table(const std::vector<int64_t>& segments, const at::Device& device) {
  return chunk_tables().get(ChunkKey{segments, kChunkWidth, device.index()}, [&] {
    std::vector<int64_t> rows;
    for (size_t p = 0; p + 1 < segments.size(); ++p)
      for (int64_t a = segments[p], b; a < segments[p + 1]; a = b) {
        b = std::min((a & ~int64_t(3)) + kChunkWidth, segments[p + 1]);
        rows.insert(rows.end(), {a, b, static_cast<int64_t>(p)});
      }
    return at::tensor(rows, at::TensorOptions().dtype(at::kLong)).to(device);
  });
}

// The per-parameter clip bounds (P,) as fp32 on `device` (rounded from double, as ATen would).
// A NaN bound is not cached: it would break the map's ordering.
at::Tensor bound_table(const std::vector<double>& max_norms, const at::Device& device) {
  auto make = [&] { return at::tensor(max_norms, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat).to(device); };
  if (std::any_of(max_norms.begin(), max_norms.end(), [](double v) { return v != v; })) return make();
  return bound_tables().get(BoundKey{max_norms, device.index()}, make);
}

at::Tensor grad_sample_norms(const at::Tensor& grad_sample, std::vector<int64_t> segments) {
  check_grad_sample(grad_sample, segments, "grad_sample_norms");
  const c10::cuda::CUDAGuard guard(grad_sample.device());
  const int64_t n = grad_sample.size(0), p = static_cast<int64_t>(segments.size()) - 1;
  at::Tensor sq = at::zeros({n, p}, grad_sample.options());
  const at::Tensor chunks = chunk_table(segments, grad_sample.device());
  const cudaError_t err = lorafast::launch_grad_sample_sq_norms(
      grad_sample.data_ptr<float>(), n, grad_sample.stride(0), chunks.data_ptr<int64_t>(), chunks.numel() / 3,
      sq.data_ptr<float>(), p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lorafast_cuda::grad_sample_norms: ", cudaGetErrorString(err));
  return sq;
}

at::Tensor clip_reduce_noise(const at::Tensor& grad_sample, const at::Tensor& sq_norms, std::vector<int64_t> segments,
                             std::vector<double> max_norms, bool per_layer, const std::optional<at::Tensor>& acc,
                             const std::optional<at::Tensor>& noise, double noise_std, int64_t seed, int64_t offset,
                             double out_scale) {
  check_grad_sample(grad_sample, segments, "clip_reduce_noise");
  const c10::cuda::CUDAGuard guard(grad_sample.device());
  const int64_t n = grad_sample.size(0), d = grad_sample.size(1), p = static_cast<int64_t>(segments.size()) - 1;
  TORCH_CHECK(sq_norms.sizes() == at::IntArrayRef({n, p}), "lorafast_cuda::clip_reduce_noise: sq_norms must be (N, P)");
  TORCH_CHECK(max_norms.size() == static_cast<size_t>(per_layer ? p : 1) || (!per_layer && !max_norms.empty()),
              "lorafast_cuda::clip_reduce_noise: max_norms must hold one bound, or one per parameter");
  // the clip factors are N×P numbers: ATen computes them, the kernel does the pass over G
  const at::Tensor sq = sq_norms.to(at::kFloat);
  const at::Tensor total = sq.sum(1, /*keepdim=*/true);
  at::Tensor coef;
  if (per_layer) {
    coef = at::clamp_max(bound_table(max_norms, sq.device()) / sq.sqrt(), 1.0);
  } else {
    coef = at::clamp_max(max_norms[0] / total.sqrt(), 1.0);
  }
  coef = at::where(at::isfinite(total), coef, at::zeros_like(coef)).contiguous();
  at::Tensor out = at::empty({d}, grad_sample.options());
  const at::Tensor chunks = chunk_table(segments, grad_sample.device());
  const int noise_mode = noise_std == 0.0 ? 0 : (noise.has_value() ? 2 : 1);
  at::Tensor acc_f, noise_f;
  if (acc.has_value()) acc_f = acc->to(at::kFloat).contiguous();
  if (noise_mode == 2) noise_f = noise->to(at::kFloat).contiguous();
  const cudaError_t err = lorafast::launch_clip_reduce_noise(
      grad_sample.data_ptr<float>(), n, grad_sample.stride(0), chunks.data_ptr<int64_t>(), chunks.numel() / 3,
      kChunkWidth, coef.data_ptr<float>(), coef.size(1), per_layer, acc_f.defined() ? acc_f.data_ptr<float>() : nullptr,
      noise_f.defined() ? noise_f.data_ptr<float>() : nullptr, noise_mode, static_cast<float>(noise_std),
      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<float>(out_scale), out.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lorafast_cuda::clip_reduce_noise: ", cudaGetErrorString(err));
  return out;
}

void fedex_merge_(at::Tensor weight, const at::Tensor& U, const at::Tensor& V, std::optional<at::Tensor> compensation) {
  TORCH_CHECK(weight.is_cuda() && weight.dim() == 2, "lorafast_cuda::fedex_merge_: weight must be a 2-D CUDA tensor");
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && U.size(0) == weight.size(0) && V.size(1) == weight.size(1) &&
                  U.size(1) == V.size(0),
              "lorafast_cuda::fedex_merge_: U (out, K) and V (K, in) must match weight (out, in)");
  const c10::cuda::CUDAGuard guard(weight.device());
  // the K = k·r product on cuBLAS in fp32 (TF32 only if the user allowed it); the update fused below
  const at::Tensor delta = at::matmul(U.to(at::kFloat), V.to(at::kFloat)).contiguous();
  float* comp = nullptr;
  int64_t c_s0 = 0, c_s1 = 0;
  if (compensation.has_value()) {
    TORCH_CHECK(compensation->scalar_type() == at::kFloat && compensation->sizes() == weight.sizes(),
                "lorafast_cuda::fedex_merge_: compensation must be fp32 of weight's shape");
    comp = compensation->data_ptr<float>();
    c_s0 = compensation->stride(0);
    c_s1 = compensation->stride(1);
  }
  const cudaError_t err = lorafast::launch_fedex_merge(weight.data_ptr(), weight.stride(0), weight.stride(1),
                                                       dtype_of(weight), comp, c_s0, c_s1, delta.data_ptr<float>(),
                                                       weight.size(0), weight.size(1), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lorafast_cuda::fedex_merge_: ", cudaGetErrorString(err));
}

// ---- the rank-r passes of the LoRA linear (composed with cuBLAS GEMMs in lorafast/_cuda_lora.py)

float* f32_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void check_f32(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name, bool contiguous) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->device() == x.device(), "lorafast_cuda: ", name,
              " must be fp32 on x's device");
  TORCH_CHECK(!contiguous || t->is_contiguous(), "lorafast_cuda: ", name, " must be contiguous");
}

void rank_reduce(const at::Tensor& x, const std::optional<at::Tensor>& p, std::optional<at::Tensor> out,
                 double out_scale, const std::optional<at::Tensor>& l, std::optional<at::Tensor> dw, double l_scale,
                 int64_t rows_per_sample, std::optional<at::Tensor> dbias, double dropout_p, int64_t seed,
                 int64_t offset) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "lorafast_cuda::rank_reduce: x must be a 2-D CUDA tensor");
  TORCH_CHECK(p.has_value() == out.has_value() && l.has_value() == dw.has_value(),
              "lorafast_cuda::rank_reduce: p comes with out, and l with dw");
  check_f32(p, x, "p", false);
  check_f32(out, x, "out", true);
  check_f32(l, x, "l", true);
  check_f32(dw, x, "dw", false);
  check_f32(dbias, x, "dbias", true);
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t r = p.has_value() ? p->size(1) : (l.has_value() ? l->size(1) : 1);
  TORCH_CHECK(!p.has_value() || (p->dim() == 2 && p->size(0) == k && out->sizes() == at::IntArrayRef({m, r})),
              "lorafast_cuda::rank_reduce: p must be (K, r) and out (M, r)");
  TORCH_CHECK(!l.has_value() || (l->sizes() == at::IntArrayRef({m, r}) && (dw->dim() == 2 || dw->dim() == 3) &&
                                 dw->size(-2) == k && dw->size(-1) == r),
              "lorafast_cuda::rank_reduce: l must be (M, r) and dw (K, r) or (N, K, r)");
  TORCH_CHECK(!dw.has_value() || dw->dim() == 2 || (rows_per_sample > 0 && dw->size(0) * rows_per_sample == m),
              "lorafast_cuda::rank_reduce: a per-sample dw (N, K, r) needs N · rows_per_sample = M");
  TORCH_CHECK(!dbias.has_value() || dbias->numel() == k, "lorafast_cuda::rank_reduce: dbias must have K elements");
  TORCH_CHECK(r >= 1 && r <= lorafast::kMaxReduceRank, "lorafast_cuda::rank_reduce: rank ", r,
              " is outside [1, ", lorafast::kMaxReduceRank, "] (callers split larger ranks)");
  const c10::cuda::CUDAGuard guard(x.device());
  int64_t sds = 0, sdk = 0, sdr = 0;
  if (dw.has_value()) {
    sds = dw->dim() == 3 ? dw->stride(0) : 0;
    sdk = dw->stride(-2);
    sdr = dw->stride(-1);
  }
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaError_t err = lorafast::launch_rank_reduce(
      x.data_ptr(), x.stride(0), x.stride(1), m, k, dtype_of(x), f32_or_null(p), p.has_value() ? p->stride(0) : 0,
      p.has_value() ? p->stride(1) : 0, f32_or_null(out), static_cast<float>(out_scale), f32_or_null(l),
      static_cast<float>(l_scale), f32_or_null(dw), sds, sdk, sdr, dw.has_value() && dw->dim() == 3 ? rows_per_sample : 0,
      f32_or_null(dbias), static_cast<int>(r), dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
      sms, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lorafast_cuda::rank_reduce: ", cudaGetErrorString(err));
}

void rank_update_(at::Tensor y, const at::Tensor& h, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                  double scale, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(y.is_cuda() && y.dim() == 2 && y.stride(1) == 1,
              "lorafast_cuda::rank_update_: y must be a 2-D CUDA tensor with unit column stride");
  check_f32(h, y, "h", true);
  check_f32(u, y, "u", false);
  check_f32(bias, y, "bias", true);
  const int64_t m = y.size(0), n = y.size(1);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == m && u.dim() == 2 && u.size(0) == h.size(1) && u.size(1) == n,
              "lorafast_cuda::rank_update_: h must be (M, r) and u (r, N) for y (M, N)");
  TORCH_CHECK(!bias.has_value() || bias->numel() == n, "lorafast_cuda::rank_update_: bias must have N elements");
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaError_t err = lorafast::launch_rank_update(
      y.data_ptr(), y.stride(0), m, n, dtype_of(y), h.data_ptr<float>(), static_cast<int>(h.size(1)),
      u.data_ptr<float>(), u.stride(0), u.stride(1), f32_or_null(bias), static_cast<float>(scale), dropout_p,
      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lorafast_cuda::rank_update_: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY(lorafast_cuda, m) {
  m.def("privatize(Tensor h, float clip_norm, float noise_std, str mode, int seed, int offset) -> (Tensor, Tensor)");
  m.def("grad_sample_norms(Tensor grad_sample, int[] segments) -> Tensor");
  m.def("clip_reduce_noise(Tensor grad_sample, Tensor sq_norms, int[] segments, float[] max_norms, bool per_layer, "
        "Tensor? acc, Tensor? noise, float noise_std, int seed, int offset, float out_scale) -> Tensor");
  m.def("fedex_merge_(Tensor(a!) weight, Tensor U, Tensor V, Tensor(b!)? compensation) -> ()");
  m.def("rank_reduce(Tensor x, Tensor? p, Tensor(a!)? out, float out_scale, Tensor? l, Tensor(b!)? dw, "
        "float l_scale, int rows_per_sample, Tensor(c!)? dbias, float dropout_p, int seed, int offset) -> ()");
  m.def("rank_update_(Tensor(a!) y, Tensor h, Tensor u, Tensor? bias, float scale, float dropout_p, int seed, "
        "int offset) -> ()");
}

TORCH_LIBRARY_IMPL(lorafast_cuda, CUDA, m) {
  m.impl("privatize", &privatize);
  m.impl("grad_sample_norms", &grad_sample_norms);
  m.impl("clip_reduce_noise", &clip_reduce_noise);
  m.impl("fedex_merge_", &fedex_merge_);
  m.impl("rank_reduce", &rank_reduce);
  m.impl("rank_update_", &rank_update_);
}
