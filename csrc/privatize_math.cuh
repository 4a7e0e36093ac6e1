// The per-element math of lorafast::privatize, shared by the CUDA kernel and host checks.
// y = clip(x) + std·ξ with ξ the Philox normals of h viewed as (R, L) rows: element (r, l)
// takes number l mod 4 of call offset + r·⌈L/4⌉ + ⌊l/4⌋ (reference.privatize); clip is
// x·min(1, C/‖row‖) ("sample"/"token") or min(max(x, −C), C) ("element").
#pragma once
#include "philox.cuh"

namespace lorafast {

// min(1, C/‖x‖) from the row's squared norm; the floor keeps a zero row finite (factor 1).
LORAFAST_HD float clip_factor(float sq_norm, float clip) {
  return fminf(1.0f, clip / sqrtf(fmaxf(sq_norm, 1e-30f)));
}

LORAFAST_HD float clip_element(float x, float clip) { return fminf(fmaxf(x, -clip), clip); }

// std·ξ for the four columns [col, col + 4) of row `row` of an (R, cols) view, col a multiple
// of 4: one Philox call. Without noise (noise_std 0, no call made) it is −0, which leaves
// every x, −0 included, unchanged when added.
LORAFAST_HD Float4 privatize_noise4(float noise_std, uint64_t seed, uint64_t offset, int64_t row, int64_t col,
                                    int64_t cols) {
  Float4 n{{-0.0f, -0.0f, -0.0f, -0.0f}};
  if (noise_std > 0.0f) {
    n = philox_normal4(seed, philox_call(offset, row, col, cols));
    for (float& v : n.v) v *= noise_std;
  }
  return n;
}

// One output element: `factor` is clip_factor(...) for row modes and ignored for "element";
// `noise` is its std·ξ from privatize_noise4.
LORAFAST_HD float privatize_value(float x, bool element, float factor, float clip, float noise) {
  return (element ? clip_element(x, clip) : x * factor) + noise;
}

}  // namespace lorafast
