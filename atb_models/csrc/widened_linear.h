// y = x W^T + b for weights narrower than float32, widened to float32 in registers: weight-only int8 (W8A16, with
// scales) and bfloat16. Float32 activations and accumulation.
//
// W is packed like the panel kernel's float32 weights (panel_linear.h), in groups of 64 output columns,
// wp[N / 64][K][64], at its own width: a k-step of a group is one 64-byte line of int8 or two of bfloat16, and a
// thread's groups are one sequential stream of a quarter or a half of float32's bytes. An int8 weight's scales are
// the quantizer's own [N, groups] (kernels/w8a16.py): per output channel (groups = 1) or per group of K / groups
// input columns; bfloat16 weights have none.
//
// Up to 6 rows (decode) read the weights directly: each k-step is widened to four zmm of float32 (int8:
// _mm512_cvtepi8_epi32 + _mm512_cvtepi32_ps; bfloat16: _mm512_cvtepu16_epi32 + a 16-bit shift, bf16.h: two
// instructions per 16 weights) and feeds 4 fused multiply-adds a row. An int8 group's products accumulate unscaled
// and are scaled once at the group's end (per channel: once). At one row the widening is two thirds of the
// instructions: a core widens 64 int8 bytes in about 6 cycles, near what memory delivers on this kit's VM
// (docs/PERFORMANCE.md), and 128 bfloat16 bytes in as many, well within it; the prefetch runs a fixed distance ahead.
//
// More rows (batched decode, prefill) widen each K block once, scaled, into an L1 buffer of float32 and run the
// panel kernel's register blocks over it (panel_linear.h's register_block), prefetching the next block while they
// do, so the widening is paid once per block instead of once per 6 rows.

#pragma once

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "bf16.h"
#include "panel_linear.h"

namespace {

constexpr int64_t W8_AHEAD = 32;  // direct path: prefetch this many k-steps ahead

// The 64 weights of one k-step as four zmm of float32: int8 (unscaled) or bfloat16 (uint16_t bits).
inline void widen(const int8_t* wk, __m512 w[4]) {
    for (int j = 0; j < 4; j++)
        w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + 16 * j))));
}

inline void widen(const uint16_t* wk, __m512 w[4]) {
    for (int j = 0; j < 4; j++) w[j] = load_bf16(wk + 16 * j);
}

// Prefetch the k-step of 64 weights of type W at wk (one line of int8, two of bfloat16).
template <typename W>
inline void prefetch_step(const W* wk) {
    for (int64_t b = 0; b < GROUP * static_cast<int64_t>(sizeof(W)); b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wk) + b, _MM_HINT_T0);
}

// The scales of group `group` for the 64 output columns from n0: column n's is scales[n * groups + group].
inline void load_scales(const float* scales, int64_t groups, int64_t n0, int64_t group, __m512 s[4]) {
    const __m512i stride = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)groups));
    for (int j = 0; j < 4; j++) s[j] = _mm512_i32gather_ps(stride, scales + (n0 + 16 * j) * groups + group, 4);
}

// Rows x[MR, K] against one group of 64 columns w[K][64]: y[MR][64] = bias + sum over scale groups of scale *
// products (scales null: one group, no scaling).
template <int MR, typename W>
void widened_register_block(const float* x, int64_t ldx, const W* w, int64_t K, const float* scales, int64_t groups,
                            int64_t n0, const float* bias, float* y, int64_t ldy) {
    const int64_t group_size = K / groups;
    for (int64_t group = 0; group < groups; group++) {
        __m512 acc[MR][4];
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
        for (int64_t k = group * group_size; k < (group + 1) * group_size; k++) {
            const W* wk = w + k * GROUP;
            prefetch_step(wk + W8_AHEAD * GROUP);
            __m512 wf[4];
            widen(wk, wf);
            for (int i = 0; i < MR; i++) {
                const __m512 b = _mm512_set1_ps(x[i * ldx + k]);
                for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(wf[j], b, acc[i][j]);
            }
        }
        __m512 s[4];
        if (scales) load_scales(scales, groups, n0, group, s);
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < 4; j++) {
                const __m512 base = group ? _mm512_loadu_ps(y + i * ldy + 16 * j)
                                          : (bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps());
                _mm512_storeu_ps(y + i * ldy + 16 * j,
                                 scales ? _mm512_fmadd_ps(acc[i][j], s[j], base) : _mm512_add_ps(acc[i][j], base));
            }
    }
}

template <typename W>
using WidenedBlockFn = void (*)(const float*, int64_t, const W*, int64_t, const float*, int64_t, int64_t,
                                const float*, float*, int64_t);

template <typename W>
WidenedBlockFn<W> widened_block_for(int rows) {
    switch (rows) {
        case 1: return widened_register_block<1, W>;
        case 2: return widened_register_block<2, W>;
        case 3: return widened_register_block<3, W>;
        case 4: return widened_register_block<4, W>;
        case 5: return widened_register_block<5, W>;
        default: return widened_register_block<6, W>;
    }
}

// buffer[k - k0][64] = w[k][64] (times the scale of k's group where there are scales), for k0 <= k < k1: the block
// in float32 for register_block.
template <typename W>
void widen_block(const W* w, int64_t k0, int64_t k1, int64_t group_size, const float* scales, int64_t groups,
                 int64_t n0, float* buffer) {
    __m512 s[4];
    for (int64_t k = k0; k < k1; k++) {
        if (scales && (k == k0 || k % group_size == 0)) load_scales(scales, groups, n0, k / group_size, s);
        __m512 wf[4];
        widen(w + k * GROUP, wf);
        for (int j = 0; j < 4; j++)
            _mm512_storeu_ps(buffer + (k - k0) * GROUP + 16 * j, scales ? _mm512_mul_ps(wf[j], s[j]) : wf[j]);
    }
}

// x: [M, K] with row stride ldx; wp: W [N / 64][K][64]; scales: [N, groups], groups dividing K, or null (groups 1);
// bias: [N] or null; y: [M, N]. N must be a multiple of 64.
template <typename W>
void widened_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const W* wp, int64_t N, const float* scales,
                    int64_t groups, const float* bias, float* y) {
    const int64_t column_groups = N / GROUP, group_size = K / groups;
    constexpr int64_t LINES_PER_STEP = GROUP * static_cast<int64_t>(sizeof(W)) / 64;
#pragma omp parallel
    {
        // Each thread takes an equal run of column groups: one contiguous stretch of the packed weights.
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t first = column_groups * thread / threads, end = column_groups * (thread + 1) / threads;
        if (M <= MAX_ROWS) {
            for (int64_t g = first; g < end; g++)
                widened_block_for<W>(static_cast<int>(M))(x, ldx, wp + g * K * GROUP, K, scales, groups, g * GROUP,
                                                          bias ? bias + g * GROUP : nullptr, y + g * GROUP, N);
        } else {
            alignas(64) float buffer[K_BLOCK * GROUP];
            for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
                const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
                const int64_t passes = (chunk + MAX_ROWS - 1) / MAX_ROWS;
                for (int64_t g = first; g < end; g++) {
                    const W* w = wp + g * K * GROUP;
                    for (int64_t k0 = 0; k0 < K; k0 += K_BLOCK) {
                        const int64_t k1 = K - k0 < K_BLOCK ? K : k0 + K_BLOCK, lines = (k1 - k0) * LINES_PER_STEP;
                        widen_block(w, k0, k1, group_size, scales, groups, g * GROUP, buffer);
                        for (int64_t m = m0, pass = 0; m < m0 + chunk; m += MAX_ROWS, pass++) {
                            const int rows = m0 + chunk - m < MAX_ROWS ? static_cast<int>(m0 + chunk - m) : MAX_ROWS;
                            // The passes share the next block's lines, which follow this one.
                            const int64_t from = pass * lines / passes, to = (pass + 1) * lines / passes;
                            const float* pf = reinterpret_cast<const float*>(
                                reinterpret_cast<const char*>(w + k1 * GROUP) + from * 64);
                            block_for(rows)(x + m * ldx + k0, ldx, buffer, 0, k1 - k0,
                                            bias ? bias + g * GROUP : nullptr, k0 == 0, y + m * N + g * GROUP, N, pf,
                                            to - from);
                        }
                    }
                }
            }
        }
    }
}

}  // namespace

extern "C" {

// x: [M, K] with row stride ldx; wp: int8 [N / 64][K][64]; scales: [N, groups], groups dividing K; bias: [N] or
// null; y: [M, N]. N must be a multiple of 64.
void atb_w8a16_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* wp, int64_t N,
                          const float* scales, int64_t groups, const float* bias, float* y) {
    widened_linear(x, M, K, ldx, wp, N, scales, groups, bias, y);
}

// x: [M, K] with row stride ldx; wp: bfloat16 [N / 64][K][64] (uint16_t bits); bias: [N] or null; y: [M, N]. N
// must be a multiple of 64. The products are float32's of the bfloat16 weights: x as given (callers wanting
// PyTorch's bfloat16 linear round x to bfloat16 first).
void atb_bf16_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                         const float* bias, float* y) {
    widened_linear(x, M, K, ldx, wp, N, nullptr, 1, bias, y);
}

}  // extern "C"
