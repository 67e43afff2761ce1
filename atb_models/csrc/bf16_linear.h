// y = x W^T + b for bfloat16 weights widened to float32 in registers: float32 activations and accumulation.
//
// W is packed like the panel kernel's float32 weights (panel_linear.h), in groups of 64 output columns,
// wp[N / 64][K][64], at bfloat16's width: a k-step of a group is two 64-byte lines, and a thread's groups are one
// sequential stream of half of float32's bytes.
//
// Up to 6 rows (decode) read the weights directly: each k-step is widened to four zmm of float32
// (_mm512_cvtepu16_epi32 + a 16-bit shift, bf16.h: two instructions per 16 weights) and feeds 4 fused
// multiply-adds a row: a core widens 128 bytes in about 6 cycles, well within what memory delivers on this kit's VM
// (docs/PERFORMANCE.md); the prefetch runs a fixed distance ahead. (AVX512-BF16's dot product was measured no
// faster on this kit's Xeon: it issues on one port where FMAs issue on two.)
//
// More rows (batched decode, prefill) widen each K block once into an L1 buffer of float32 and run the panel
// kernel's register blocks over it (panel_linear.h's register_block), prefetching the next block while they do, so
// the widening is paid once per block instead of once per 6 rows.

#pragma once

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "bf16.h"
#include "panel_linear.h"

namespace {

constexpr int64_t BF16_AHEAD = 32;  // direct path: prefetch this many k-steps ahead
// Batched decode (up to 4 passes of 6 rows): k-steps per block widened into L1, 16 KB of float32, so that the block,
// the next one's prefetched weights and the rows' inputs fit L1 together (K_BLOCK's 32 KB do not: 14% slower at 16
// rows on this kit's Xeon). More passes take K_BLOCK, whose longer blocks read and write the outputs less often (10%
// faster at 256 rows).
constexpr int64_t FEW_PASSES = 4, FEW_PASSES_K_BLOCK = 64;

// The 64 weights of one k-step as four zmm of float32.
inline void widen_bf16(const uint16_t* wk, __m512 w[4]) {
    for (int j = 0; j < 4; j++) w[j] = load_bf16(wk + 16 * j);
}

// Rows x[MR, K] against one group of 64 columns w[K][64]: y[MR][64] = products + bias.
template <int MR>
void bf16_register_block(const float* x, int64_t ldx, const uint16_t* w, int64_t K, const float* bias, float* y,
                         int64_t ldy) {
    __m512 acc[MR][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const uint16_t* wk = w + k * GROUP;
        _mm_prefetch(reinterpret_cast<const char*>(wk + BF16_AHEAD * GROUP), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wk + BF16_AHEAD * GROUP) + 64, _MM_HINT_T0);
        __m512 wf[4];
        widen_bf16(wk, wf);
        for (int i = 0; i < MR; i++) {
            const __m512 b = _mm512_set1_ps(x[i * ldx + k]);
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(wf[j], b, acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)  // the bias added to the products
        for (int j = 0; j < 4; j++)
            _mm512_storeu_ps(y + i * ldy + 16 * j, bias ? _mm512_add_ps(acc[i][j], _mm512_loadu_ps(bias + 16 * j))
                                                        : acc[i][j]);
}

using Bf16BlockFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t);

Bf16BlockFn bf16_block_for(int rows) {
    switch (rows) {
        case 1: return bf16_register_block<1>;
        case 2: return bf16_register_block<2>;
        case 3: return bf16_register_block<3>;
        case 4: return bf16_register_block<4>;
        case 5: return bf16_register_block<5>;
        default: return bf16_register_block<6>;
    }
}

// buffer[k - k0][64] = w[k][64] for k0 <= k < k1: the block in float32 for register_block.
void widen_bf16_block(const uint16_t* w, int64_t k0, int64_t k1, float* buffer) {
    for (int64_t k = k0; k < k1; k++) {
        __m512 wf[4];
        widen_bf16(w + k * GROUP, wf);
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(buffer + (k - k0) * GROUP + 16 * j, wf[j]);
    }
}

}  // namespace

extern "C" {

// x: [M, K] with row stride ldx; wp: bfloat16 [N / 64][K][64] (uint16_t bits); bias: [N] or null; y: [M, N]. N
// must be a multiple of 64. The products are float32's of the bfloat16 weights: x as given (callers wanting
// PyTorch's bfloat16 linear round x to bfloat16 first).
void atb_bf16_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                         const float* bias, float* y) {
    const int64_t column_groups = N / GROUP;
    constexpr int64_t LINES_PER_STEP = GROUP * 2 / 64;
#pragma omp parallel
    {
        // Each thread takes an equal run of column groups: one contiguous stretch of the packed weights.
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t first = column_groups * thread / threads, end = column_groups * (thread + 1) / threads;
        if (M <= MAX_ROWS) {
            for (int64_t g = first; g < end; g++)
                bf16_block_for(static_cast<int>(M))(x, ldx, wp + g * K * GROUP, K, bias ? bias + g * GROUP : nullptr,
                                                    y + g * GROUP, N);
        } else {
            alignas(64) float buffer[K_BLOCK * GROUP];
            for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
                const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
                const int64_t passes = (chunk + MAX_ROWS - 1) / MAX_ROWS;
                const int64_t k_block = passes <= FEW_PASSES ? FEW_PASSES_K_BLOCK : K_BLOCK;
                for (int64_t g = first; g < end; g++) {
                    const uint16_t* w = wp + g * K * GROUP;
                    for (int64_t k0 = 0; k0 < K; k0 += k_block) {
                        const int64_t k1 = K - k0 < k_block ? K : k0 + k_block, lines = (k1 - k0) * LINES_PER_STEP;
                        widen_bf16_block(w, k0, k1, buffer);
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

}  // extern "C"
