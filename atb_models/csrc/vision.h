// The vision tower's two elementwise operators, each one pass in place over its rows, float32 or bfloat16: the
// rotary on q and k (read from the qkv projection's output where they lie) and quick-GELU on the MLP's first
// projection. Written once over the library's vector (lanes.h): AVX-512's in cpu_kernels.cpp, AVX2's in
// cpu_kernels_avx2.cpp.
//
// PyTorch spends five operators and a float32 copy on each rotation (the reference rotates in float32 whatever the
// tower's dtype) and three on quick-GELU, each a fresh tensor of the whole step's patches: in a batch of many images
// a large share of the tower's time, the more where fresh pages are slow to come (docs/PERFORMANCE.md).

#pragma once

#include <stdint.h>

#include "bf16.h"
#include "lanes.h"
#include "vector_exp.h"

namespace {

// a * b rounded to float32 on its own: kept out of a fused multiply-add (GCC contracts a product and a sum into
// one by default), as PyTorch's separate operators round it.
inline Lanes::V separate_product(Lanes::V a, Lanes::V b) {
    Lanes::V p = Lanes::mul(a, b);
    __asm__("" : "+v"(p));
    return p;
}

// One vector of a head row's first half and the matching one of its second half, rotated: (lo * cos_lo - hi *
// sin_lo, hi * cos_hi + lo * sin_hi), each product and the sum rounded to float32 as the reference's operators round
// them (its rotate_half negates, exactly).
inline void rotate_vectors(Lanes::V& lo, Lanes::V& hi, const float* cos_lo, const float* sin_lo, const float* cos_hi,
                           const float* sin_hi) {
    using L = Lanes;
    const L::V new_lo = L::sub(separate_product(lo, L::load(cos_lo)), separate_product(hi, L::load(sin_lo)));
    hi = L::add(separate_product(hi, L::load(cos_hi)), separate_product(lo, L::load(sin_hi)));
    lo = new_lo;
}

// One head row in place: x = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]), as
// layers/rotary.py's apply_rotary (x widened from T, the result rounded back to T). A half's last partial vector
// goes through buffers of whole vectors.
template <typename T>
void rotate_in_place(T* x, const float* cos, const float* sin, int64_t half) {
    using L = Lanes;
    int64_t d = 0;
    for (; d + L::N <= half; d += L::N) {
        L::V lo = load_lanes(x + d), hi = load_lanes(x + half + d);
        rotate_vectors(lo, hi, cos + d, sin + d, cos + half + d, sin + half + d);
        store_lanes(x + d, lo);
        store_lanes(x + half + d, hi);
    }
    if (d < half) {
        const int64_t n = half - d;
        alignas(64) float lo_part[L::N] = {}, hi_part[L::N] = {}, c_lo[L::N] = {}, s_lo[L::N] = {},
                          c_hi[L::N] = {}, s_hi[L::N] = {};
        load_row(x + d, n, lo_part);
        load_row(x + half + d, n, hi_part);
        load_row(cos + d, n, c_lo);
        load_row(sin + d, n, s_lo);
        load_row(cos + half + d, n, c_hi);
        load_row(sin + half + d, n, s_hi);
        L::V lo = L::load(lo_part), hi = L::load(hi_part);
        rotate_vectors(lo, hi, c_lo, s_lo, c_hi, s_hi);
        L::store(lo_part, lo);
        L::store(hi_part, hi);
        store_row(lo_part, n, x + d);
        store_row(hi_part, n, x + half + d);
    }
}

// q and k [rows, heads, dim] in place (each row `row_stride` values from the last, its heads contiguous; both
// views of one qkv output), rotated by row r's cos[r], sin[r] ([rows, dim], float32).
template <typename T>
void vision_rotary(T* q, T* k, int64_t rows, int64_t heads, int64_t dim, int64_t row_stride, const float* cos,
                   const float* sin) {
#pragma omp parallel for if (rows * heads * dim >= 32768) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t h = 0; h < heads; h++) {
            rotate_in_place(q + r * row_stride + h * dim, cos + r * dim, sin + r * dim, dim / 2);
            rotate_in_place(k + r * row_stride + h * dim, cos + r * dim, sin + r * dim, dim / 2);
        }
    }
}

// x * sigmoid(1.702 x), sigmoid(t) = 1 / (1 + e^-t), as the reference's three operators compute it: for bfloat16
// each operator's result rounded to bfloat16 (1.702 x, the sigmoid, the product), as PyTorch's bfloat16 operators
// round them.
template <typename T>
inline Lanes::V quick_gelu(Lanes::V x, const T* stored_as) {
    using L = Lanes;
    const L::V one = L::set1(1.f);
    const L::V t = as_stored(L::mul(L::set1(1.702f), x), stored_as);
    const L::V sigmoid = as_stored(L::div(one, L::add(one, exp_lanes(L::sub(L::zero(), t)))), stored_as);
    return L::mul(x, sigmoid);
}

// x[0:n] = quick_gelu(x[0:n]) in place.
template <typename T>
void quick_gelu_in_place(T* x, int64_t n) {
    using L = Lanes;
    constexpr int64_t CHUNK = 4096;  // values a task: a few pages, whole vectors
#pragma omp parallel for if (n >= 32768) schedule(static)
    for (int64_t c = 0; c < (n + CHUNK - 1) / CHUNK; c++) {
        const int64_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
        int64_t i = c * CHUNK;
        for (; i + L::N <= end; i += L::N) store_lanes(x + i, quick_gelu(load_lanes(x + i), x));
        if (i < end) {  // the tail through a whole vector's buffer
            alignas(64) float tail[L::N] = {};
            load_row(x + i, end - i, tail);
            L::store(tail, quick_gelu(L::load(tail), x));
            store_row(tail, end - i, x + i);
        }
    }
}

}  // namespace

extern "C" {

// q, k: float32 views [rows, heads, dim] of one qkv output (row stride `row_stride` values, heads contiguous, dim
// even), rotated in place; cos, sin: [rows, dim] float32.
void atb_vision_rotary_f32(float* q, float* k, int64_t rows, int64_t heads, int64_t dim, int64_t row_stride,
                           const float* cos, const float* sin) {
    vision_rotary(q, k, rows, heads, dim, row_stride, cos, sin);
}

// The same over bfloat16 q and k: rotated in float32, rounded back to bfloat16.
void atb_vision_rotary_bf16(uint16_t* q, uint16_t* k, int64_t rows, int64_t heads, int64_t dim, int64_t row_stride,
                            const float* cos, const float* sin) {
    vision_rotary(q, k, rows, heads, dim, row_stride, cos, sin);
}

// x[0:n] (float32, contiguous) = x * sigmoid(1.702 x), in place.
void atb_quick_gelu_f32(float* x, int64_t n) { quick_gelu_in_place(x, n); }

// The same over bfloat16 values, each operator's result rounded to bfloat16.
void atb_quick_gelu_bf16(uint16_t* x, int64_t n) { quick_gelu_in_place(x, n); }

}  // extern "C"
