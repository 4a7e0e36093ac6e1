// Prints csrc/philox.cuh's outputs for the reference comparison in tests/test_cuda_philox.py.
// Usage: philox_host SEED C0 [C1 ...]  → one line per counter: x0 x1 x2 x3 uniform normal
//        philox_host kat C0 C1 C2 C3 K0 K1 → the raw block function's four words (hex inputs)
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "philox.cuh"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s SEED COUNTER...\n", argv[0]);
    return 2;
  }
  if (std::string(argv[1]) == "kat" && argc == 8) {
    uint32_t v[6];
    for (int i = 0; i < 6; ++i) v[i] = static_cast<uint32_t>(std::strtoul(argv[2 + i], nullptr, 16));
    const lorafast::Philox4 w = lorafast::philox4x32(v[0], v[1], v[2], v[3], v[4], v[5]);
    std::printf("%08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32 "\n", w.x0, w.x1, w.x2, w.x3);
    return 0;
  }
  const uint64_t seed = std::strtoull(argv[1], nullptr, 10);
  for (int i = 2; i < argc; ++i) {
    const uint64_t c = std::strtoull(argv[i], nullptr, 10);
    const lorafast::Philox4 w = lorafast::philox(seed, c);
    std::printf("%" PRIu32 " %" PRIu32 " %" PRIu32 " %" PRIu32 " %.9g %.9g\n", w.x0, w.x1, w.x2, w.x3,
                lorafast::philox_uniform(seed, c), lorafast::philox_normal(seed, c));
  }
  return 0;
}
