// The MLP's activation, out = silu(gate) * up, float32, AVX-512, in one pass over the gate/up projection's output.
//
// PyTorch spends two operators and a temporary on it (silu, then the product), and its silu over a strided half of
// the projection runs on one thread: 24-62 us a layer at 16 rows of Qwen2-0.5B's 4864 columns, up to 1.5 ms of a
// batch-16 decode step. silu(x) = x * sigmoid(x), with sigmoid from e^-|x| so the exponential never overflows.

#pragma once

#include <immintrin.h>
#include <stdint.h>

#include "vector_exp.h"

namespace {

inline __m512 silu(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));  // e^-|x|
    // sigmoid(x) = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) for x < 0: both are (x >= 0 ? 1 : e) / (1 + e).
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 numerator = _mm512_mask_blend_ps(negative, one, e);
    return _mm512_mul_ps(x, _mm512_div_ps(numerator, _mm512_add_ps(one, e)));
}

}  // namespace

extern "C" {

// gate, up: [rows, width], rows `ld` floats apart (two halves of one projection output); out: [rows, width].
void atb_silu_and_mul_f32(const float* gate, const float* up, int64_t rows, int64_t width, int64_t ld, float* out) {
    const int64_t whole = width / 16 * 16;
#pragma omp parallel for if (rows * width >= 32768) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float* g = gate + r * ld;
        const float* u = up + r * ld;
        float* o = out + r * width;
        for (int64_t i = 0; i < whole; i += 16)
            _mm512_storeu_ps(o + i, _mm512_mul_ps(silu(_mm512_loadu_ps(g + i)), _mm512_loadu_ps(u + i)));
        if (whole < width) {
            const __mmask16 tail = static_cast<__mmask16>((1u << (width - whole)) - 1);
            _mm512_mask_storeu_ps(o + whole, tail, _mm512_mul_ps(silu(_mm512_maskz_loadu_ps(tail, g + whole)),
                                                                 _mm512_maskz_loadu_ps(tail, u + whole)));
        }
    }
}

}  // extern "C"
