// bfloat16 <-> float32 rows for the kit's native kernels, over the library's vector (lanes.h: AVX-512F's or AVX2's;
// no AVX512-BF16 instructions needed), and the scalar conversions for a row's tail.
//
// A bfloat16 is the top half of a float32: widening is a 16-bit left shift. Narrowing rounds to nearest, ties to
// even, as PyTorch's `.to(torch.bfloat16)` does (c10::round_to_nearest_even), NaN kept a quiet NaN.

#pragma once

#include <stdint.h>
#include <string.h>

#include "lanes.h"

namespace {

inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// out[0:n] = bfloat16(x[0:n]).
inline void store_bf16(const float* x, int64_t n, uint16_t* out) {
    using L = Lanes;
    int64_t i = 0;
    for (; i + L::N <= n; i += L::N) L::store_bf16(out + i, L::load(x + i));
    for (; i < n; i++) out[i] = float_to_bf16(x[i]);
}

// x[0:n] = float32(bfloat16(x[0:n])), in place: the values a bfloat16 tensor would hold.
inline void round_to_bf16_values(float* x, int64_t n) {
    using L = Lanes;
    int64_t i = 0;
    for (; i + L::N <= n; i += L::N) L::store(x + i, L::round_bf16(L::load(x + i)));
    for (; i < n; i++) x[i] = bf16_to_float(float_to_bf16(x[i]));
}

// out[0:n] = float32(x[0:n]).
inline void load_bf16_row(const uint16_t* x, int64_t n, float* out) {
    using L = Lanes;
    int64_t i = 0;
    for (; i + L::N <= n; i += L::N) L::store(out + i, L::load_bf16(x + i));
    for (; i < n; i++) out[i] = bf16_to_float(x[i]);
}

}  // namespace
