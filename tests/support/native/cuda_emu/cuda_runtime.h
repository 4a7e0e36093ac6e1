// A host emulation of the slice of the CUDA runtime that csrc/ kernels use, so that tests can
// execute the kernels' logic on a CPU (tests/cuda_emu.py). Each CUDA thread of a block is a
// fiber (ucontext) on the calling thread; blocks run one after another, so a `__shared__`
// variable is a plain static. __syncthreads waits for every live thread of the block and
// __shfl_xor_sync for every live thread of the warp; a thread that has returned no longer
// counts, as on the GPU. A barrier that can never be released (a __syncthreads some threads
// skip) aborts with a message. It checks logic, not speed or the memory model.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }

namespace emu {
enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };
struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  unsigned linear;
  State state;
};
constexpr size_t kStack = 64 * 1024;
inline std::vector<Fiber> fibers;
inline std::vector<char> stacks;
inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline std::function<void()> body;
inline uint3 block_idx{0, 0, 0};
inline dim3 block_dim, grid_dim;
inline std::vector<float> warp_slots;
inline cudaError_t last_error = cudaSuccess;

inline void fiber_main() {
  body();
  current->state = State::kDone;
  swapcontext(&current->ctx, &scheduler);
}

inline void yield(State s) {
  current->state = s;
  swapcontext(&current->ctx, &scheduler);
}

// Run every fiber until all are done, releasing barriers whose live members all wait there.
inline void run_block() {
  const unsigned n = static_cast<unsigned>(fibers.size());
  for (;;) {
    bool ran = false;
    for (Fiber& f : fibers)
      if (f.state == State::kReady) {
        current = &f;
        swapcontext(&scheduler, &f.ctx);
        ran = true;
      }
    if (ran) continue;
    bool live = false, all_block = true, released = false;
    for (unsigned w = 0; w * 32 < n; ++w) {
      bool warp_live = false, warp_all = true;
      for (unsigned t = w * 32; t < n && t < w * 32 + 32; ++t) {
        if (fibers[t].state == State::kDone) continue;
        warp_live = live = true;
        warp_all = warp_all && fibers[t].state == State::kAtWarpBarrier;
        all_block = all_block && fibers[t].state == State::kAtBlockBarrier;
      }
      if (warp_live && warp_all) {
        for (unsigned t = w * 32; t < n && t < w * 32 + 32; ++t)
          if (fibers[t].state != State::kDone) fibers[t].state = State::kReady;
        released = true;
      }
    }
    if (!live) return;
    if (released) continue;
    if (all_block) {
      for (Fiber& f : fibers)
        if (f.state != State::kDone) f.state = State::kReady;
      continue;
    }
    std::fprintf(stderr, "cuda emulation: deadlock in block (%u, %u, %u): threads wait at different barriers\n",
                 block_idx.x, block_idx.y, block_idx.z);
    std::abort();
  }
}

template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t, void (*kernel)(P...), A&&... args) {
  if (grid.x == 0 || grid.y > 65535 || grid.z > 65535 || block.x * block.y * block.z > 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const std::tuple<P...> bound(std::forward<A>(args)...);
  const unsigned n = block.x * block.y * block.z;
  block_dim = block;
  grid_dim = grid;
  body = [&] { std::apply(kernel, bound); };
  fibers.assign(n, Fiber{});
  stacks.resize(n * kStack);
  warp_slots.assign(n, 0.0f);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = {bx, by, bz};
        for (unsigned t = 0; t < n; ++t) {
          Fiber& f = fibers[t];
          f.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          f.linear = t;
          f.state = State::kReady;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks.data() + t * kStack;
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_main, 0);
        }
        run_block();
      }
  body = nullptr;
}
}  // namespace emu

#define threadIdx (::emu::current->tid)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::yield(emu::State::kAtBlockBarrier); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  const unsigned tid = emu::current->linear;
  emu::warp_slots[tid] = v;
  emu::yield(emu::State::kAtWarpBarrier);
  const float got = emu::warp_slots[(tid & ~31u) | ((tid & 31u) ^ static_cast<unsigned>(lane_mask))];
  emu::yield(emu::State::kAtWarpBarrier);
  return got;
}

// fibers switch only at barriers, so a read-modify-write is atomic here
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
