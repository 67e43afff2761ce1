// Qwen2's RMSNorm in float32, optionally after the residual add: s = x + delta, y = w * (s / rms(s)). Written once
// over the library's vector (lanes.h): AVX-512's in cpu_kernels.cpp, AVX2's in cpu_kernels_avx2.cpp.
//
// A decoder layer's two norms cost PyTorch about seven operator calls each (add, pow, mean, add, rsqrt, two
// multiplies), a few microseconds apiece at decode's handful of rows; here each is one call. The sum of squares is
// accumulated in float32 like the reference's, only in another order.

#pragma once

#include <stdint.h>

#include <cmath>

#include "lanes.h"

extern "C" {

// x, delta (or null), sum (or null: not written), out: [rows, hidden] contiguous; weight: [hidden].
void atb_rms_norm_f32(const float* x, const float* delta, const float* weight, int64_t rows, int64_t hidden,
                      float eps, float* sum, float* out) {
    using L = Lanes;
    const int64_t whole = hidden / L::N * L::N;
#pragma omp parallel for if (rows >= 64) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * hidden;
        // With a residual, the row's sum is formed first (into `sum`, which is then what is normalised).
        const float* s = xr;
        if (delta) {
            const float* dr = delta + r * hidden;
            float* sr = sum + r * hidden;
            for (int64_t i = 0; i < whole; i += L::N) L::store(sr + i, L::add(L::load(xr + i), L::load(dr + i)));
            for (int64_t i = whole; i < hidden; i++) sr[i] = xr[i] + dr[i];
            s = sr;
        }
        L::V acc = L::zero();
        for (int64_t i = 0; i < whole; i += L::N) {
            const L::V v = L::load(s + i);
            acc = L::fmadd(v, v, acc);
        }
        float squares = L::sum(acc);
        for (int64_t i = whole; i < hidden; i++) squares += s[i] * s[i];
        const float scale = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
        const L::V vscale = L::set1(scale);
        float* o = out + r * hidden;
        for (int64_t i = 0; i < whole; i += L::N)
            L::store(o + i, L::mul(L::load(weight + i), L::mul(L::load(s + i), vscale)));
        for (int64_t i = whole; i < hidden; i++) o[i] = weight[i] * (s[i] * scale);
    }
}

}  // extern "C"
