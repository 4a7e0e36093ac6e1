// The per-element math of lorafast::privatize, shared by the CUDA kernel and host checks.
// y = clip(x) + std·ξ with ξ = philox_normal(seed, offset + j) for flat element index j;
// clip is x·min(1, C/‖row‖) ("sample"/"token") or min(max(x, −C), C) ("element").
#pragma once
#include "philox.cuh"

namespace lorafast {

// min(1, C/‖x‖) from the row's squared norm; the floor keeps a zero row finite (factor 1).
LORAFAST_HD float clip_factor(float sq_norm, float clip) {
  return fminf(1.0f, clip / sqrtf(fmaxf(sq_norm, 1e-30f)));
}

LORAFAST_HD float clip_element(float x, float clip) { return fminf(fmaxf(x, -clip), clip); }

// One output element: `factor` is clip_factor(...) for row modes and ignored for "element".
LORAFAST_HD float privatize_value(float x, bool element, float factor, float clip, float noise_std,
                                  uint64_t seed, uint64_t counter) {
  float y = element ? clip_element(x, clip) : x * factor;
  if (noise_std > 0.0f) y += noise_std * philox_normal(seed, counter);
  return y;
}

}  // namespace lorafast
