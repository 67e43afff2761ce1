// The kit's CPU kernels for a CPU without AVX-512 (AVX2 and FMA), for a float32 model: a library of its own, built
// and loaded by atb_models/kernels/native.py where torch reports the AVX2 capability, with cpu_kernels.cpp's entry
// points but the int8 (W8A16) linear and AVX512-BF16's dot products (the same names, signatures, structs and packed
// layouts, so atb_models/kernels run either library's). The linears are this file's; RMSNorm, the activation, the
// decode attention and the whole decoder layer are the same headers as the AVX-512 library's, compiled at AVX2's 8
// lanes (lanes.h).
//
// A decode step streams every weight once; on such a CPU PyTorch's own linears (oneDNN, MKL) read a float32 weight
// of a few rows well below the memory's rate (docs/PERFORMANCE.md), and a float32 model of a bfloat16 checkpoint
// holds twice the bytes it needs. These kernels read the packed panels as one sequential stream a thread, and
// bfloat16 panels (a bfloat16 checkpoint's weights, exact) at half the bytes, widened to float32 in registers.
//
// Layouts (panel_linear.h, bf16_linear.h): float32 wp[N / 64][K][64]; bfloat16 wp[N / 64][K / 2][64][2], a 32-bit
// lane holding one column's weights of k-steps 2p (low half) and 2p + 1 (high half). Products are added in k order
// from the bias on, in float32.
//
// A group of 64 columns runs as two halves of 32 (four ymm of accumulators a row): AVX2 has 16 registers, so a
// register block holds 3 rows of a float32 half (12 accumulators) or 2 of a bfloat16 one (8, and the widened
// weights). Several passes over a group (batched rows) go over K blocks that stay in the caches while they do, and
// prefetch the next block while they do (Ahead, as panel_linear.h's passes do on AVX-512).

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "bf16.h"
#include "decoder_layer.h"  // and through it the kernels between the linears, at AVX2's 8 lanes
#include "group_claims.h"
#include "vision.h"

namespace {

constexpr int64_t GROUP = 64;    // output columns per packed group
constexpr int64_t HALF = 32;     // columns per register block: four ymm
constexpr int64_t K_BLOCK = 128; // k-steps per block of batched rows: 32 KB of float32 weights (16 of a half)

// The accumulators of a register block are named variables, not an array: GCC keeps an array of vectors updated in a
// loop in memory as well (a store per update, which made these kernels store-bound), named ones in registers only.
// Rows past MR are compiled out.
#define ATB_ROW_ACCUMULATORS(i)                                                                        \
    __m256 a##i##0 = start(i, 0), a##i##1 = start(i, 1), a##i##2 = start(i, 2), a##i##3 = start(i, 3)
#define ATB_STORE_ROW(i)                                                                                \
    if (MR > i) {                                                                                       \
        _mm256_storeu_ps(y + i * ldy, a##i##0);                                                         \
        _mm256_storeu_ps(y + i * ldy + 8, a##i##1);                                                     \
        _mm256_storeu_ps(y + i * ldy + 16, a##i##2);                                                    \
        _mm256_storeu_ps(y + i * ldy + 24, a##i##3);                                                    \
    }

// A register block's sums to start from, 8 columns (j-th 8 of a half) of a row: the bias on the first K block (or
// zero), the row's sums so far on the later ones.
inline __m256 block_start(bool first, const float* bias, const float* y_row, int j) {
    return first ? (bias ? _mm256_loadu_ps(bias + 8 * j) : _mm256_setzero_ps()) : _mm256_loadu_ps(y_row + 8 * j);
}

// The next K block's cache lines (the packed weights are one stream a thread: the next block follows the current one
// in memory, in this group or the next), prefetched into L2 a few at a time over the passes of the current block, so
// that its passes start from the caches: the memory's latency overlaps the arithmetic instead of stalling the first
// pass of each block.
struct Ahead {
    const char* next;  // the next line to prefetch
    int64_t lines;     // lines to prefetch during this pass
    int64_t steps;     // k-steps (pairs of them for bfloat16) of this pass
    int64_t credit;
    void step() {
        for (credit += lines; credit >= steps; credit -= steps, next += 64) _mm_prefetch(next, _MM_HINT_T1);
    }
};

// y[MR, 32] = (first ? bias : y) + x[MR, k0:k1] * w[k0:k1] over one half group of float32 weights (k stride 64);
// with AHEAD, `ahead`'s lines prefetched along the way.
template <int MR, bool AHEAD>
void f32_block(const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, const float* bias, bool first,
               float* y, int64_t ldy, Ahead ahead) {
    auto start = [&](int i, int j) {
        return i < MR ? block_start(first, bias, y + i * ldy, j) : _mm256_setzero_ps();
    };
    ATB_ROW_ACCUMULATORS(0);
    ATB_ROW_ACCUMULATORS(1);
    ATB_ROW_ACCUMULATORS(2);
    for (int64_t k = k0; k < k1; k++) {
        const float* wk = w + k * GROUP;
        if constexpr (AHEAD) ahead.step();
        // 12 accumulators, 3 broadcasts and one weight vector: AVX2's 16 registers
        const __m256 b0 = _mm256_broadcast_ss(x + k);
        const __m256 b1 = MR > 1 ? _mm256_broadcast_ss(x + ldx + k) : b0;
        const __m256 b2 = MR > 2 ? _mm256_broadcast_ss(x + 2 * ldx + k) : b0;
#define ATB_COLUMNS(j)                                                                                  \
    {                                                                                                   \
        const __m256 wj = _mm256_loadu_ps(wk + 8 * j);                                                  \
        a0##j = _mm256_fmadd_ps(wj, b0, a0##j);                                                         \
        if (MR > 1) a1##j = _mm256_fmadd_ps(wj, b1, a1##j);                                             \
        if (MR > 2) a2##j = _mm256_fmadd_ps(wj, b2, a2##j);                                             \
    }
        ATB_COLUMNS(0) ATB_COLUMNS(1) ATB_COLUMNS(2) ATB_COLUMNS(3)
#undef ATB_COLUMNS
    }
    ATB_STORE_ROW(0) ATB_STORE_ROW(1) ATB_STORE_ROW(2)
}

// The same for a half group of bfloat16 pairs (pair stride 128 values), k0 and k1 even; up to 2 rows.
template <int MR, bool AHEAD>
void bf16_block(const float* x, int64_t ldx, const uint16_t* w, int64_t k0, int64_t k1, const float* bias,
                bool first, float* y, int64_t ldy, Ahead ahead) {
    auto start = [&](int i, int j) {
        return i < MR ? block_start(first, bias, y + i * ldy, j) : _mm256_setzero_ps();
    };
    ATB_ROW_ACCUMULATORS(0);
    ATB_ROW_ACCUMULATORS(1);
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t k = k0; k < k1; k += 2) {
        const uint16_t* wk = w + k * GROUP;  // the pair's 64 values of this half: 8 columns a ymm
        if constexpr (AHEAD) ahead.step();
        const __m256 b00 = _mm256_broadcast_ss(x + k), b01 = _mm256_broadcast_ss(x + k + 1);
        const __m256 b10 = MR > 1 ? _mm256_broadcast_ss(x + ldx + k) : b00;
        const __m256 b11 = MR > 1 ? _mm256_broadcast_ss(x + ldx + k + 1) : b01;
#define ATB_COLUMNS(j)                                                                                  \
    {                                                                                                   \
        const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 16 * j));        \
        const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 16));                          \
        const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(lanes, high));                          \
        a0##j = _mm256_fmadd_ps(odd, b01, _mm256_fmadd_ps(even, b00, a0##j));                           \
        if (MR > 1) a1##j = _mm256_fmadd_ps(odd, b11, _mm256_fmadd_ps(even, b10, a1##j));               \
    }
        ATB_COLUMNS(0) ATB_COLUMNS(1) ATB_COLUMNS(2) ATB_COLUMNS(3)
#undef ATB_COLUMNS
    }
    ATB_STORE_ROW(0) ATB_STORE_ROW(1)
}

// One row against a whole group (eight accumulators), the group's k-steps read in order: decode's single pass is
// one sequential stream a thread. An array of accumulators is fine here: with one row GCC keeps it in registers
// (the compiled loop stores nothing).
void f32_row(const float* x, const float* w, int64_t K, const float* bias, float* y) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = bias ? _mm256_loadu_ps(bias + 8 * j) : _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 b = _mm256_broadcast_ss(x + k);
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k * GROUP + 8 * j), b, acc[j]);
    }
    for (int j = 0; j < 8; j++) _mm256_storeu_ps(y + 8 * j, acc[j]);
}

void bf16_row(const float* x, const uint16_t* w, int64_t K, const float* bias, float* y) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = bias ? _mm256_loadu_ps(bias + 8 * j) : _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t k = 0; k < K; k += 2) {
        const __m256 b0 = _mm256_broadcast_ss(x + k), b1 = _mm256_broadcast_ss(x + k + 1);
        for (int j = 0; j < 8; j++) {
            const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * GROUP + 16 * j));
            acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(lanes, 16)), b0, acc[j]);
            acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(lanes, high)), b1, acc[j]);
        }
    }
    for (int j = 0; j < 8; j++) _mm256_storeu_ps(y + 8 * j, acc[j]);
}

// How each weight format runs: its kernels, the rows of its largest register block, and where a half group starts
// inside a k-step (float32) or a pair of them (bfloat16).
struct F32Panels {
    using T = float;
    static constexpr int ROWS = 3;
    static constexpr int64_t K_PER_STEP = 1, HALF_OFFSET = HALF;
    static void row(const float* x, const T* w, int64_t K, const float* bias, float* y) { f32_row(x, w, K, bias, y); }
    template <int MR, bool AHEAD>
    static void block(const float* x, int64_t ldx, const T* w, int64_t k0, int64_t k1, const float* bias, bool first,
                      float* y, int64_t ldy, Ahead ahead) {
        f32_block<MR, AHEAD>(x, ldx, w, k0, k1, bias, first, y, ldy, ahead);
    }
};

struct Bf16Panels {
    using T = uint16_t;
    // Rows of three would need 12 accumulators, 6 broadcasts and the widened pair: more than AVX2's 16 registers.
    static constexpr int ROWS = 2;
    static constexpr int64_t K_PER_STEP = 2, HALF_OFFSET = 2 * HALF;
    static void row(const float* x, const T* w, int64_t K, const float* bias, float* y) { bf16_row(x, w, K, bias, y); }
    template <int MR, bool AHEAD>
    static void block(const float* x, int64_t ldx, const T* w, int64_t k0, int64_t k1, const float* bias, bool first,
                      float* y, int64_t ldy, Ahead ahead) {
        bf16_block<MR, AHEAD>(x, ldx, w, k0, k1, bias, first, y, ldy, ahead);
    }
};

// One pass of `rows` (1 to P::ROWS) over a half group's K block.
template <typename P, bool AHEAD>
void run_pass(int64_t rows, const float* x, int64_t ldx, const typename P::T* w, int64_t k0, int64_t k1,
              const float* bias, bool first, float* y, int64_t ldy, Ahead ahead) {
    if (rows == 1) P::template block<1, AHEAD>(x, ldx, w, k0, k1, bias, first, y, ldy, ahead);
    else if (rows == 2 || P::ROWS == 2) P::template block<2, AHEAD>(x, ldx, w, k0, k1, bias, first, y, ldy, ahead);
    else P::template block<P::ROWS, AHEAD>(x, ldx, w, k0, k1, bias, first, y, ldy, ahead);
}

// The next block is prefetched during a K block's first 2 * AHEAD_PASSES passes, counted over its two halves in turn
// (Ahead): every pass where a half takes up to AHEAD_PASSES, else the first half's first ones. The later passes run
// without the prefetch's bookkeeping in their inner loop, which measured slower where every pass of many carried it
// (docs/PERFORMANCE.md).
constexpr int64_t AHEAD_PASSES = 8;

// Prefill's many rows go in chunks of this many, so that a K block of their inputs (128 KB) stays in L2 while every
// group passes over it (as panel_linear.h's on AVX-512): with all of a prefill's rows at once, the inputs came from
// L3 and the linears ran measurably slower (docs/PERFORMANCE.md).
constexpr int64_t ROW_CHUNK = 256;

// From this many rows in a chunk, bfloat16 panels are widened once per K block into an L1 buffer of float32 ([k][64],
// the float32 panels' layout) and the float32 register blocks run over it: rows of 3 at 12 FMAs a k-step with no
// widening between them, where the bfloat16 blocks take 2 rows and widen every pair again in every pass (a shift
// and a mask per 8 weights, on the FMAs' ports on Intel). On an Intel Xeon (AVX2 emulated), 24 MLP layers' weights
// streamed from memory: 256 rows 229 GFLOP/s against 183, 64 rows 213 against 181, 32 rows 193 against 173; 16 rows
// alike (164 and 165) and 8 rows slower (134 against 147), so fewer rows keep the bfloat16 blocks. Both add the same
// products in k order from the bias on: the same sums, bit for bit.
constexpr int64_t WIDEN_ONCE_ROWS = 32;

// buffer[k - k0][64] = the group's bfloat16 pairs of k-steps k0 .. k1 (both even) as float32.
void widen_block(const uint16_t* w, int64_t k0, int64_t k1, float* buffer) {
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t k = k0; k < k1; k += 2) {
        float* row = buffer + (k - k0) * GROUP;  // k-step k's; k + 1's follows
        for (int j = 0; j < 8; j++) {
            const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * GROUP + 16 * j));
            _mm256_store_ps(row + 8 * j, _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 16)));
            _mm256_store_ps(row + GROUP + 8 * j, _mm256_castsi256_ps(_mm256_and_si256(lanes, high)));
        }
    }
}

// A chunk's rows (x: its first row; y: its first row's sums of the group) over one K block of a group's weights
// (w: the group's, laid out as Q's; k-steps k0 .. k1; `first`: the group's first block, whose sums start from the
// bias), both halves in turn, in passes of up to Q::ROWS rows as equal as can be (16 rows of 3: 3 3 3 3 2 2, not five
// of 3 and a latency-bound one of 1); the next block's `next_lines` lines from `next` prefetched over the first
// passes (Ahead).
template <typename Q>
void run_block(const float* x, int64_t chunk, int64_t ldx, const typename Q::T* w, int64_t k0, int64_t k1,
               const float* bias, bool first, float* y, int64_t N, const char* next, int64_t next_lines) {
    const int64_t passes = (chunk + Q::ROWS - 1) / Q::ROWS;
    // The calls (passes of both halves) that prefetch the next block: the first ones, up to 2 AHEAD_PASSES.
    const int64_t calls = 2 * passes < 2 * AHEAD_PASSES ? 2 * passes : 2 * AHEAD_PASSES;
    Ahead ahead{next, 0, (k1 - k0) / Q::K_PER_STEP, 0};
    for (int64_t h = 0, call = 0; h < 2; h++) {
        const typename Q::T* half = w + h * Q::HALF_OFFSET;
        const float* b = bias ? bias + h * HALF : nullptr;
        for (int64_t pass = 0, m = 0; pass < passes; pass++, call++) {
            const int64_t rows = chunk / passes + (pass < chunk % passes);
            const float* in = x + m * ldx;
            float* out = y + m * N + h * HALF;
            if (call < calls) {
                ahead.lines = next_lines * (call + 1) / calls - next_lines * call / calls;
                ahead.credit = 0;
                run_pass<Q, true>(rows, in, ldx, half, k0, k1, b, first, out, N, ahead);
                ahead.next += ahead.lines * 64;
            } else {
                run_pass<Q, false>(rows, in, ldx, half, k0, k1, b, first, out, N, ahead);
            }
            m += rows;
        }
    }
}

// One linear over the groups, which the threads claim (group_claims.h; a thread's own run is one contiguous stretch
// of the packed weights), each K block's two halves in turn (so that the block is read from memory once per chunk of
// rows: run_block), bfloat16 panels of a chunk of WIDEN_ONCE_ROWS rows or more widened once per block into
// `widened` for the float32 blocks; a single row runs P::row over the whole group instead, one sequential stream.
template <typename P>
void run_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const typename P::T* wp, int64_t N,
                const float* bias, float* y) {
    const int64_t groups = N / GROUP;
    GroupClaims claims(groups, M, ROW_CHUNK);  // each chunk's groups; a single row's: chunk 0's
#pragma omp parallel
    {
        alignas(32) float widened[P::K_PER_STEP == 2 ? K_BLOCK * GROUP : 1];  // (bfloat16 panels' WIDEN_ONCE_ROWS)
        for (int64_t m0 = 0; m0 < M && M > 1; m0 += ROW_CHUNK) {
            const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            const bool widen = P::K_PER_STEP == 2 && chunk >= WIDEN_ONCE_ROWS;
            for (int64_t g; (g = claims.next(m0)) >= 0;) {
                const typename P::T* w = wp + g * K * GROUP;
                const float* b = bias ? bias + g * GROUP : nullptr;
                float* out = y + m0 * N + g * GROUP;
                for (int64_t k0 = 0; k0 < K; k0 += K_BLOCK) {
                    const int64_t k1 = K - k0 < K_BLOCK ? K : k0 + K_BLOCK;
                    // The block after this one, right after it in memory: the rest of this group's K, or the next
                    // group's first block (most often this thread's next group; none after the last group).
                    const int64_t next_steps = k1 < K ? (K - k1 < K_BLOCK ? K - k1 : K_BLOCK)
                                                      : (g + 1 < groups ? (K < K_BLOCK ? K : K_BLOCK) : 0);
                    const int64_t next_lines = next_steps * GROUP * static_cast<int64_t>(sizeof(typename P::T)) / 64;
                    const char* next = reinterpret_cast<const char*>(w + k1 * GROUP);
                    if (widen) {  // (the widened block's k-steps are 0 .. k1 - k0: the rows from k0 on)
                        widen_block(reinterpret_cast<const uint16_t*>(w), k0, k1, widened);
                        run_block<F32Panels>(x + m0 * ldx + k0, chunk, ldx, widened, 0, k1 - k0, b, k0 == 0, out, N,
                                             next, next_lines);
                    } else {
                        run_block<P>(x + m0 * ldx, chunk, ldx, w, k0, k1, b, k0 == 0, out, N, next, next_lines);
                    }
                }
            }
        }
        if (M == 1)
            for (int64_t g; (g = claims.next()) >= 0;)
                P::row(x, wp + g * K * GROUP, K, bias ? bias + g * GROUP : nullptr, y + g * GROUP);
    }
}

}  // namespace

extern "C" {

// x: [M, K] with row stride ldx; wp: [N / 64][K][64]; bias: [N] or null; y: [M, N]. N a multiple of 64.
void atb_panel_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* wp, int64_t N,
                          const float* bias, float* y) {
    run_linear<F32Panels>(x, M, K, ldx, wp, N, bias, y);
}

// x: [M, K] with row stride ldx; wp: [N / 64][K / 2][64][2] bfloat16 bits; bias: [N] or null; y: [M, N]. K even.
void atb_bf16_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                         const float* bias, float* y) {
    run_linear<Bf16Panels>(x, M, K, ldx, wp, N, bias, y);
}

}  // extern "C"

namespace {

// The linears of atb_decoder_layer_decode_f32 (decoder_layer.h): float32 or bfloat16 panels. Int8 (W8A16) layers are
// not given to this library (kernels/decoder_layer.py declines them): one that is stops the process with a message,
// rather than read its int8 panels as float32 ones (past their end). A bfloat16 stream's linear inputs are rounded
// to bfloat16 values, as in cpu_kernels.cpp's, and multiplied by the widening kernel.
void layer_linear(int64_t rows, float* x, int64_t K, const void* weights, int64_t format, const float*, int64_t,
                  int64_t N, const float* bias, float* y, bool bf16_model) {
    if (format == FORMAT_INT8 || format == FORMAT_INT8_TILES) {
        fprintf(stderr, "atb_decoder_layer_decode_f32: the AVX2 library has no int8 linear\n");
        abort();
    }
    if (format == FORMAT_BF16) {
        if (bf16_model) round_to_bf16_values(x, rows * K);
        atb_bf16_linear_f32(x, rows, K, K, static_cast<const uint16_t*>(weights), N, bias, y);
    } else {
        atb_panel_linear_f32(x, rows, K, K, static_cast<const float*>(weights), N, bias, y);
    }
}

}  // namespace
