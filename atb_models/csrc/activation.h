// The MLP's activation, out = silu(gate) * up, in float32 (or over bfloat16 rows), in one pass over the gate/up
// projection's output. Written
// once over the library's vector (lanes.h): AVX-512's in cpu_kernels.cpp, AVX2's in cpu_kernels_avx2.cpp.
//
// PyTorch spends two operators and a temporary on it (silu, then the product), and its silu over a strided half of
// the projection runs on one thread: 24-62 us a layer at 16 rows of Qwen2-0.5B's 4864 columns, up to 1.5 ms of a
// batch-16 decode step. silu(x) = x * sigmoid(x), with sigmoid from e^-|x| so the exponential never overflows.

#pragma once

#include <stdint.h>

#include "bf16.h"
#include "lanes.h"
#include "vector_exp.h"

namespace {

inline Lanes::V silu(Lanes::V x) {
    using L = Lanes;
    const L::V one = L::set1(1.f);
    const L::V e = exp_nonpositive(L::sub(L::zero(), L::abs(x)));  // e^-|x|
    // sigmoid(x) = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) for x < 0: both are (x >= 0 ? 1 : e) / (1 + e).
    return L::mul(x, L::div(L::where_negative(x, e, one), L::add(one, e)));
}

}  // namespace

extern "C" {

// gate, up: [rows, width], rows `ld` floats apart (two halves of one projection output); out: [rows, width].
void atb_silu_and_mul_f32(const float* gate, const float* up, int64_t rows, int64_t width, int64_t ld, float* out) {
    using L = Lanes;
    const int64_t whole = width / L::N * L::N;
#pragma omp parallel for if (rows * width >= 32768) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float* g = gate + r * ld;
        const float* u = up + r * ld;
        float* o = out + r * width;
        for (int64_t i = 0; i < whole; i += L::N) L::store(o + i, L::mul(silu(L::load(g + i)), L::load(u + i)));
        if (whole < width) {
            const L::Mask tail = L::first(width - whole);
            L::store(o + whole, tail, L::mul(silu(L::load(tail, g + whole)), L::load(tail, u + whole)));
        }
    }
}

// The same over bfloat16 rows (a bfloat16 model's prefill), rounded where PyTorch's two bfloat16 operators round:
// silu(gate) to bfloat16, then its product with up.
void atb_silu_and_mul_bf16(const uint16_t* gate, const uint16_t* up, int64_t rows, int64_t width, int64_t ld,
                           uint16_t* out) {
    using L = Lanes;
    const int64_t whole = width / L::N * L::N;
#pragma omp parallel for if (rows * width >= 32768) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* g = gate + r * ld;
        const uint16_t* u = up + r * ld;
        uint16_t* o = out + r * width;
        for (int64_t i = 0; i < whole; i += L::N)
            L::store_bf16(o + i, L::mul(L::round_bf16(silu(L::load_bf16(g + i))), L::load_bf16(u + i)));
        if (whole < width) {  // the tail through full vectors' buffers
            alignas(64) float gt[L::N] = {}, ut[L::N] = {}, ot[L::N];
            for (int64_t i = whole; i < width; i++) {
                gt[i - whole] = bf16_to_float(g[i]);
                ut[i - whole] = bf16_to_float(u[i]);
            }
            L::store(ot, L::mul(L::round_bf16(silu(L::load(gt))), L::load(ut)));
            for (int64_t i = whole; i < width; i++) o[i] = float_to_bf16(ot[i - whole]);
        }
    }
}

}  // extern "C"
