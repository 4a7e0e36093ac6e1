// Prints csrc/philox.cuh's outputs for the reference comparison in tests/hardware/test_cuda_philox.py.
// Usage: philox_host SEED CALL [CALL ...]  → one line per call counter:
//            x0 x1 x2 x3 (words)  u0 u1 u2 u3 (philox_uniform4)  z0 z1 z2 z3 (philox_normal4)
//        philox_host grid SEED OFFSET ROWS COLS → one line per element (m, k) of a row-major
//            (ROWS, COLS) tensor, row by row: its call (philox_call), uniform and normal
//        philox_host kat C0 C1 C2 C3 K0 K1 → the raw block function's four words (hex inputs)
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "philox.cuh"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s SEED CALL...\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  if (mode == "kat" && argc == 8) {
    uint32_t v[6];
    for (int i = 0; i < 6; ++i) v[i] = static_cast<uint32_t>(std::strtoul(argv[2 + i], nullptr, 16));
    const lorafast::Philox4 w = lorafast::philox4x32(v[0], v[1], v[2], v[3], v[4], v[5]);
    std::printf("%08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32 "\n", w.x0, w.x1, w.x2, w.x3);
    return 0;
  }
  if (mode == "grid" && argc == 6) {
    const uint64_t seed = std::strtoull(argv[2], nullptr, 10), offset = std::strtoull(argv[3], nullptr, 10);
    const int64_t rows = std::strtoll(argv[4], nullptr, 10), cols = std::strtoll(argv[5], nullptr, 10);
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t k = 0; k < cols; ++k) {
        const uint64_t call = lorafast::philox_call(offset, m, k, cols);
        std::printf("%" PRIu64 " %.9g %.9g\n", call, lorafast::philox_uniform4(seed, call).v[k % 4],
                    lorafast::philox_normal4(seed, call).v[k % 4]);
      }
    return 0;
  }
  const uint64_t seed = std::strtoull(argv[1], nullptr, 10);
  for (int i = 2; i < argc; ++i) {
    const uint64_t c = std::strtoull(argv[i], nullptr, 10);
    const lorafast::Philox4 w = lorafast::philox(seed, c);
    const lorafast::Float4 u = lorafast::philox_uniform4(seed, c), z = lorafast::philox_normal4(seed, c);
    std::printf("%" PRIu32 " %" PRIu32 " %" PRIu32 " %" PRIu32, w.x0, w.x1, w.x2, w.x3);
    for (float f : u.v) std::printf(" %.9g", f);
    for (float f : z.v) std::printf(" %.9g", f);
    std::printf("\n");
  }
  return 0;
}
