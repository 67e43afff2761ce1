// The MLP's activation, out = silu(gate) * up, in float32 (or over bfloat16 rows), in one pass over the gate/up
// projection's output. Written once over the library's vector (lanes.h): AVX-512's in cpu_kernels.cpp, AVX2's in
// cpu_kernels_avx2.cpp.
//
// PyTorch spends two operators and a temporary on it (silu, then the product), and its silu over a strided half of
// the projection runs on one thread: 24-62 us a layer at 16 rows of Qwen2-0.5B's 4864 columns, up to 1.5 ms of a
// batch-16 decode step. silu(x) = x / (1 + e^-x), PyTorch's formula: where e^-x overflows (x below -88.7) the
// result is -0, as PyTorch's.

#pragma once

#include <stdint.h>

#include "bf16.h"
#include "lanes.h"
#include "vector_exp.h"

namespace {

inline Lanes::V silu(Lanes::V x) {
    using L = Lanes;
    return L::div(x, L::add(L::set1(1.f), exp_lanes(L::sub(L::zero(), x))));
}

// out = silu(gate) * up over rows of T: float32, or bfloat16 (uint16_t) rounded where PyTorch's two bfloat16
// operators round (silu to bfloat16, then the product). gate, up: [rows, width], rows `ld` values apart (two halves
// of one projection output); out: [rows, width].
template <typename T>
void silu_and_mul(const T* gate, const T* up, int64_t rows, int64_t width, int64_t ld, T* out) {
    using L = Lanes;
    const int64_t whole = width / L::N * L::N;
#pragma omp parallel for if (rows * width >= 32768) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const T* g = gate + r * ld;
        const T* u = up + r * ld;
        T* o = out + r * width;
        for (int64_t i = 0; i < whole; i += L::N)
            store_lanes(o + i, L::mul(as_stored(silu(load_lanes(g + i)), o), load_lanes(u + i)));
        if (whole < width) {  // the tail through full vectors' buffers
            alignas(64) float gt[L::N] = {}, ut[L::N] = {}, ot[L::N];
            load_row(g + whole, width - whole, gt);
            load_row(u + whole, width - whole, ut);
            L::store(ot, L::mul(as_stored(silu(L::load(gt)), o), L::load(ut)));
            store_row(ot, width - whole, o + whole);
        }
    }
}

}  // namespace

extern "C" {

void atb_silu_and_mul_f32(const float* gate, const float* up, int64_t rows, int64_t width, int64_t ld, float* out) {
    silu_and_mul(gate, up, rows, width, ld, out);
}

// The same over a bfloat16 model's rows (its prefill).
void atb_silu_and_mul_bf16(const uint16_t* gate, const uint16_t* up, int64_t rows, int64_t width, int64_t ld,
                           uint16_t* out) {
    silu_and_mul(gate, up, rows, width, ld, out);
}

}  // extern "C"
