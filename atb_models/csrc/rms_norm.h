// Qwen2's RMSNorm in float32, AVX-512, optionally after the residual add: s = x + delta, y = w * (s / rms(s)).
//
// A decoder layer's two norms cost PyTorch about seven operator calls each (add, pow, mean, add, rsqrt, two
// multiplies), a few microseconds apiece at decode's handful of rows; here each is one call. The sum of squares is
// accumulated in float32 like the reference's, only in another order.

#pragma once

#include <immintrin.h>
#include <stdint.h>

#include <cmath>

extern "C" {

// x, delta (or null), sum (or null: not written), out: [rows, hidden] contiguous; weight: [hidden].
void atb_rms_norm_f32(const float* x, const float* delta, const float* weight, int64_t rows, int64_t hidden,
                      float eps, float* sum, float* out) {
    const int64_t whole = hidden / 16 * 16;
#pragma omp parallel for if (rows >= 64) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * hidden;
        // With a residual, the row's sum is formed first (into `sum`, which is then what is normalised).
        const float* s = xr;
        if (delta) {
            const float* dr = delta + r * hidden;
            float* sr = sum + r * hidden;
            for (int64_t i = 0; i < whole; i += 16)
                _mm512_storeu_ps(sr + i, _mm512_add_ps(_mm512_loadu_ps(xr + i), _mm512_loadu_ps(dr + i)));
            for (int64_t i = whole; i < hidden; i++) sr[i] = xr[i] + dr[i];
            s = sr;
        }
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < whole; i += 16) {
            const __m512 v = _mm512_loadu_ps(s + i);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float squares = _mm512_reduce_add_ps(acc);
        for (int64_t i = whole; i < hidden; i++) squares += s[i] * s[i];
        const float scale = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
        const __m512 vscale = _mm512_set1_ps(scale);
        float* o = out + r * hidden;
        for (int64_t i = 0; i < whole; i += 16)
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(weight + i),
                                                  _mm512_mul_ps(_mm512_loadu_ps(s + i), vscale)));
        for (int64_t i = whole; i < hidden; i++) o[i] = weight[i] * (s[i] * scale);
    }
}

}  // extern "C"
