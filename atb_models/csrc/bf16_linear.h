// y = x W^T + b for bfloat16 weights and activations, products accumulated in float32, output float32.
//
// W is packed once at load in groups of 64 output columns like the float32 panel kernel's (panel_linear.h), but by
// pairs of input columns: wp[N / 64][ceil(K / 2)][64][2], element [g][p][n][j] = W[64g + n][2p + j] (an odd K's
// last pair padded with a zero). A pair-step of a group is 256 bytes, four 64-byte lines, one zmm each, and a
// thread's groups lie one after another: one sequential stream of half float32's bytes. Each 32-bit lane of a
// line holds one output column's two weights, which is the operand AVX512-BF16's vdpbf16ps takes, and which widens
// to float32 with one instruction per 16 weights (the low halves shifted up, the high halves masked).
//
// Two variants of the same product, chosen by the caller (kernels/linear.py) from the CPU's flags:
// - atb_bf16_linear_f32: any AVX-512F CPU. Weights and activations widened to float32, fused multiply-adds.
// - atb_bf16_linear_dpbf16: AVX512-BF16. vdpbf16ps does two products and their sum per lane: half the
//   instructions a weight, which matters where a step is compute-bound (batched decode, prefill).
// Both take bfloat16 activations, so the two give the same sums up to float32 rounding (the order of two terms).
//
// Loops as the panel kernel's: each thread an equal run of groups; K cut into blocks of 128 pair-steps (32 KB,
// inside L1) when several passes of up to 6 rows go over them, each pass prefetching its share of the next block;
// a single pass prefetches a fixed distance ahead. Compiled into cpu_kernels.cpp's library.

#pragma once

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "panel_linear.h"

namespace {

constexpr int64_t PAIR_LINES = 4;     // 64-byte lines per pair-step of a group
constexpr int64_t PAIR_STEP = 128;    // bfloat16 values per pair-step of a group
constexpr int64_t BF16_K_BLOCK = 128;  // pair-steps per block: 32 KB of weights
constexpr int64_t BF16_AHEAD = 16;     // single pass: prefetch this many pair-steps ahead

// Row x's inputs 2p and 2p + 1 as one 32-bit lane (2p low), the second 0 past an odd K's end.
inline uint32_t input_pair(const uint16_t* x, int64_t p, int64_t K) {
    if (2 * p + 1 < K) {
        uint32_t pair;
        memcpy(&pair, x + 2 * p, sizeof pair);
        return pair;
    }
    return x[2 * p];
}

using Bf16BlockFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, const float*,
                             bool, float*, int64_t, const char*, int64_t);

// acc[MR][4] (+)= x[MR rows, pairs p0:p1] * w[p0:p1][64][2], in float32 lanes, then stored to y. While it runs,
// prefetch `share` lines from `pf` on, spread evenly over the pair-steps.
template <int MR>
void widened_block(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* w, int64_t p0, int64_t p1,
                   const float* bias, bool first, float* y, int64_t ldy, const char* pf, int64_t share) {
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    __m512 acc[MR][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++)
            acc[i][j] = first ? (bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps())
                              : _mm512_loadu_ps(y + i * ldy + 16 * j);
    const int64_t len = p1 - p0;
    int64_t owed = 0;
    for (int64_t p = p0; p < p1; p++) {
        const uint16_t* wp = w + p * PAIR_STEP;
        __m512 even[4], odd[4];
        for (int j = 0; j < 4; j++) {
            const __m512i pairs = _mm512_loadu_si512(wp + 32 * j);
            even[j] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            odd[j] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
        }
        for (owed += share; owed >= len; owed -= len, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
        for (int i = 0; i < MR; i++) {
            const __m512i b = _mm512_set1_epi32(static_cast<int>(input_pair(x + i * ldx, p, K)));
            const __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
            const __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(b, high));
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(odd[j], xo, _mm512_fmadd_ps(even[j], xe, acc[i][j]));
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(y + i * ldy + 16 * j, acc[i][j]);
}

// widened_block's product by vdpbf16ps: each lane adds its column's two weights times the row's two inputs.
template <int MR>
__attribute__((target("avx512f,avx512bf16")))
void dot_block(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* w, int64_t p0, int64_t p1,
               const float* bias, bool first, float* y, int64_t ldy, const char* pf, int64_t share) {
    __m512 acc[MR][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++)
            acc[i][j] = first ? (bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps())
                              : _mm512_loadu_ps(y + i * ldy + 16 * j);
    const int64_t len = p1 - p0;
    int64_t owed = 0;
    for (int64_t p = p0; p < p1; p++) {
        const uint16_t* wp = w + p * PAIR_STEP;
        __m512bh pairs[4];
        for (int j = 0; j < 4; j++) pairs[j] = (__m512bh)_mm512_loadu_si512(wp + 32 * j);
        for (owed += share; owed >= len; owed -= len, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
        for (int i = 0; i < MR; i++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(input_pair(x + i * ldx, p, K)));
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pairs[j], b);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(y + i * ldy + 16 * j, acc[i][j]);
}

constexpr Bf16BlockFn WIDENED_BLOCKS[MAX_ROWS] = {widened_block<1>, widened_block<2>, widened_block<3>,
                                                  widened_block<4>, widened_block<5>, widened_block<6>};
constexpr Bf16BlockFn DOT_BLOCKS[MAX_ROWS] = {dot_block<1>, dot_block<2>, dot_block<3>,
                                              dot_block<4>, dot_block<5>, dot_block<6>};

// The loops over groups, row chunks, K blocks and passes (panel_linear.h's), with `blocks[rows - 1]` multiplying.
void bf16_linear(const Bf16BlockFn* blocks, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp,
                 int64_t N, const float* bias, float* y) {
    const int64_t groups = N / GROUP, pairs = (K + 1) / 2;
#pragma omp parallel
    {
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t first_group = groups * thread / threads, end_group = groups * (thread + 1) / threads;
        for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
            const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            const int64_t passes = (chunk + MAX_ROWS - 1) / MAX_ROWS;
            const int64_t k_block = passes == 1 ? pairs : BF16_K_BLOCK;
            for (int64_t g = first_group; g < end_group; g++) {
                const uint16_t* w = wp + g * pairs * PAIR_STEP;
                for (int64_t p0 = 0; p0 < pairs; p0 += k_block) {
                    const int64_t p1 = pairs - p0 < k_block ? pairs : p0 + k_block;
                    const int64_t lines = (p1 - p0) * PAIR_LINES;
                    for (int64_t m = m0, pass = 0; m < m0 + chunk; m += MAX_ROWS, pass++) {
                        const int rows = m0 + chunk - m < MAX_ROWS ? static_cast<int>(m0 + chunk - m) : MAX_ROWS;
                        const int64_t from = pass * lines / passes, to = (pass + 1) * lines / passes;
                        const uint16_t* pf = passes == 1 ? w + (p0 + BF16_AHEAD) * PAIR_STEP
                                                         : w + p1 * PAIR_STEP + from * 32;
                        blocks[rows - 1](x + m * ldx, ldx, K, w, p0, p1, bias ? bias + g * GROUP : nullptr, p0 == 0,
                                         y + m * N + g * GROUP, N, reinterpret_cast<const char*>(pf),
                                         passes == 1 ? lines : to - from);
                    }
                }
            }
        }
    }
}

}  // namespace

extern "C" {

// x: bfloat16 [M, K] with row stride ldx; wp: bfloat16 [N / 64][ceil(K / 2)][64][2]; bias: [N] or null; y: [M, N].
// N must be a multiple of 64. Any AVX-512F CPU.
void atb_bf16_linear_f32(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                         const float* bias, float* y) {
    bf16_linear(WIDENED_BLOCKS, x, M, K, ldx, wp, N, bias, y);
}

// atb_bf16_linear_f32's product with AVX512-BF16's vdpbf16ps: only on a CPU with that flag.
void atb_bf16_linear_dpbf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                            const float* bias, float* y) {
    bf16_linear(DOT_BLOCKS, x, M, K, ldx, wp, N, bias, y);
}

}  // extern "C"
