// y = x W^T + b for bfloat16 weights widened to float32 in registers: float32 activations and accumulation.
//
// W is packed in groups of 64 output columns like the panel kernel's float32 weights (panel_linear.h), with each
// column's two weights of a pair of k-steps side by side: wp[N / 64][K / 2][64][2] (K even; kernels/linear.py's
// pair_layout, the W8A16 kernel's layout). A pair of k-steps of a group is four 64-byte lines, and a thread's groups
// are one sequential stream of half of float32's bytes. A 32-bit lane holds one column's weights of k-steps 2p (its
// low half) and 2p + 1 (its high half): a shift widens the first and a mask the second, one in-lane instruction per
// 16 weights, in column order; and the lane is the pair AVX512-BF16's dot product (vdpbf16ps) multiplies, so a
// bfloat16 model's rows may read the weights as they are (atb_bf16_dot_linear_f32 below).
//
// Up to 6 rows (decode; a bfloat16 model's may take the dot product instead, below) read the weights directly: each
// pair of k-steps is widened to eight zmm of float32 and feeds 8 fused multiply-adds a row, k-step 2p's then
// 2p + 1's into the same sums (so every column's products are added in k order, as a plain float32 product adds
// them; in a bfloat16 model 2p + 1's first, as the dot product below adds a pair, so that its sums are the same
// whichever kernel runs, at any row count); the prefetch, where it is on (stream_prefetch_on, panel_linear.h), runs
// a fixed distance ahead. The fewer instructions a byte, the farther ahead a core's out-of-order window reaches and
// the more lines it has in flight: one thread on this kit's AMD EPYC read 21-22 GB/s with one in-lane instruction per
// 16 weights against 18-19 with two (a cross-lane zero-extension and a shift; docs/PERFORMANCE.md).
//
// More rows (batched decode, prefill) take one of two ways, as atb_bf16_widen_in_registers says (Python measures
// which is faster once a process: kernels/linear.py's bf16_widening_chosen):
// - in registers: the same direct register blocks, one pass of up to 6 rows after another over a whole column group
//   (the later passes find its bfloat16 weights in L2), widening each pair again in each pass. On AMD Zen 4, whose
//   vector shifts and masks issue beside its FMAs, this ran 16 rows 1.2x and 256 rows 1.04x as fast as blocks
//   (24 MLP layers of cpu-small), and the float32 model's 24 layers at batch 16 took 0.84-0.90 of the time.
// - in blocks: each K block widened once into an L1 buffer of float32 ([k][64]; a bfloat16 model's with each pair's
//   two k-steps swapped, so that they are added in the dot product's order) by its first pass, of up to 5 rows
//   (widening_register_block), and the panel kernel's register blocks run the other rows over it (panel_linear.h's
//   register_block), every pass prefetching a share of the next block, so the widening is paid once per block
//   instead of once per 6 rows, and the weight stream goes on while every pass computes: on an Intel Xeon with AMX,
//   16 rows took 0.79 of the registers' time on the 24 layers of cpu-small (weights from memory), though 1.1 of it
//   on weights in the caches; Python times the two on weights evicted from the caches.
// Both ways add the same products in the same order from the bias on: the same sums, bit for bit.

#pragma once

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <vector>

#include "amx_linear.h"
#include "bf16.h"
#include "panel_linear.h"

namespace {

constexpr int64_t BF16_AHEAD = 32;  // direct path: prefetch this many k-steps ahead
// Batched decode (up to FEW_ROWS rows): k-steps per block widened into L1, 16 KB of float32, so that the block, the
// next one's prefetched weights and the rows' inputs fit L1 together (K_BLOCK's 32 KB do not: 14% slower at 16 rows
// on this kit's Xeon). More rows take K_BLOCK, whose longer blocks read and write the outputs less often (10% faster
// at 256 rows).
constexpr int64_t FEW_ROWS = 24, FEW_ROWS_K_BLOCK = 64;
constexpr int64_t FEW_PASSES = FEW_ROWS / MAX_ROWS;  // (the dot product's passes, below, are of 6 rows each)

// A 32-bit lane of the layout, 16 at once, as float32: k-step 2p's weights (the low halves, shifted up) and
// 2p + 1's (the high halves, masked).
inline void widen_pairs(__m512i lanes, __m512& even, __m512& odd) {
    even = _mm512_castsi512_ps(_mm512_slli_epi32(lanes, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(lanes, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// A pair of k-steps' products added into MR rows' sums: k-step k's weights `even` and k + 1's `odd` (4 vectors of 16
// columns each) times each row's x[k] and x[k + 1], in k order, or with PAIR_ORDER k + 1's first.
template <int MR, bool PAIR_ORDER>
inline void add_pair(__m512 (&acc)[MR][4], const __m512 (&even)[4], const __m512 (&odd)[4], const float* x,
                     int64_t ldx, int64_t k) {
    for (int i = 0; i < MR; i++) {
        const __m512 b = _mm512_set1_ps(x[i * ldx + k]), c = _mm512_set1_ps(x[i * ldx + k + 1]);
        if (PAIR_ORDER)
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(odd[j], c, acc[i][j]);
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(even[j], b, acc[i][j]);
        if (!PAIR_ORDER)
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(odd[j], c, acc[i][j]);
    }
}

// Rows x[MR, K] against one group of 64 columns w[K / 2][64][2]: y[MR][64] = bias + products. PREFETCH: the
// stream BF16_AHEAD k-steps ahead (where stream_prefetch_on, panel_linear.h). PAIR_ORDER: each pair's k-step 2p + 1
// added before 2p, the order in which vdpbf16ps adds a pair (Intel's definition of the instruction; measured bit for
// bit on AMD Zen 4 too), so that a bfloat16 model's sums are the dot product's whichever way a product runs.
template <int MR, bool PREFETCH, bool PAIR_ORDER>
void bf16_register_block(const float* x, int64_t ldx, const uint16_t* w, int64_t K, const float* bias, float* y,
                         int64_t ldy) {
    __m512 acc[MR][4];
    start_sums(acc, bias, true, y, ldy);  // from the bias, as the blocks' way starts (the same sums either way)
    for (int64_t k = 0; k < K; k += 2) {
        const uint16_t* wk = w + k * GROUP;  // the pair's 4 lines
        if (PREFETCH)
            for (int line = 0; line < 4; line++)
                _mm_prefetch(reinterpret_cast<const char*>(wk + BF16_AHEAD * GROUP) + 64 * line, _MM_HINT_T0);
        __m512 even[4], odd[4];  // k-step k's and k + 1's weights, 16 columns each
        for (int j = 0; j < 4; j++) widen_pairs(_mm512_loadu_si512(wk + 32 * j), even[j], odd[j]);
        add_pair<MR, PAIR_ORDER>(acc, even, odd, x, ldx, k);
    }
    store_sums(acc, y, ldy);
}

using Bf16BlockFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t);

template <bool PREFETCH, bool PAIR_ORDER>
Bf16BlockFn bf16_block_for(int rows) {
    switch (rows) {
        case 1: return bf16_register_block<1, PREFETCH, PAIR_ORDER>;
        case 2: return bf16_register_block<2, PREFETCH, PAIR_ORDER>;
        case 3: return bf16_register_block<3, PREFETCH, PAIR_ORDER>;
        case 4: return bf16_register_block<4, PREFETCH, PAIR_ORDER>;
        case 5: return bf16_register_block<5, PREFETCH, PAIR_ORDER>;
        default: return bf16_register_block<6, PREFETCH, PAIR_ORDER>;
    }
}

// The blocks' first pass over a K block: rows x[MR, len] against the block's pairs w[len / 2][64][2] (len even),
// widening the block into buffer[len][64] for the passes after it while adding its products as register_block adds
// them (in k order, or with PAIR_ORDER each pair's k-step 2p + 1 first, which it stores first too: register_block's
// SWAP_PAIRS; from the bias or from y), so that the widening's shifts and stores issue beside the multiply-adds.
// A separate widening loop before the passes, store-bound, took 0.94 of the time of 8 and 16 rows (24 layers of
// cpu-small on an Intel Xeon, weights from memory; docs/PERFORMANCE.md). While it runs, prefetch `share` lines from
// `pf` on, spread evenly over the k-steps.
constexpr int WIDENING_ROWS = 5;  // 20 sums, a pair's 8 widened vectors and two broadcasts: 30 of the 32 registers

template <int MR, bool PAIR_ORDER>
void widening_register_block(const float* x, int64_t ldx, const uint16_t* w, int64_t len, float* buffer,
                             const float* bias, bool first, float* y, int64_t ldy, const float* pf, int64_t share) {
    __m512 acc[MR][4];
    start_sums(acc, bias, first, y, ldy);
    const char* line = reinterpret_cast<const char*>(pf);
    int64_t owed = 0;
    int64_t k = 0;
    do {  // (len > 0: register_block says why a loop that might run no times is not)
        __m512 even[4], odd[4];
        for (int j = 0; j < 4; j++) {
            widen_pairs(_mm512_loadu_si512(w + k * GROUP + 32 * j), even[j], odd[j]);
            _mm512_storeu_ps(buffer + (PAIR_ORDER ? k + 1 : k) * GROUP + 16 * j, even[j]);
            _mm512_storeu_ps(buffer + (PAIR_ORDER ? k : k + 1) * GROUP + 16 * j, odd[j]);
        }
        for (owed += 2 * share; owed >= len; owed -= len, line += 64) _mm_prefetch(line, _MM_HINT_T0);
        add_pair<MR, PAIR_ORDER>(acc, even, odd, x, ldx, k);
    } while ((k += 2) < len);
    store_sums(acc, y, ldy);
}

using WideningBlockFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, float*, const float*, bool, float*,
                                 int64_t, const float*, int64_t);

template <bool PAIR_ORDER>
WideningBlockFn widening_block_for(int rows) {
    switch (rows) {
        case 1: return widening_register_block<1, PAIR_ORDER>;
        case 2: return widening_register_block<2, PAIR_ORDER>;
        case 3: return widening_register_block<3, PAIR_ORDER>;
        case 4: return widening_register_block<4, PAIR_ORDER>;
        default: return widening_register_block<WIDENING_ROWS, PAIR_ORDER>;
    }
}

// Whether batched rows widen in registers (1) or in blocks (0); see the top of this file.
int64_t bf16_widen_in_registers = 0;

// atb_bf16_linear_f32 below; with PAIR_ORDER (a bfloat16 model's products) each pair added in the dot product's
// order, either way (the blocks store each pair's two k-steps swapped, and their passes read x's pairs swapped to
// match), with denormals flushed as vdpbf16ps flushes them.
template <bool PAIR_ORDER>
void widened_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                    const float* bias, float* y) {
    const int64_t column_groups = N / GROUP;
    constexpr int64_t LINES_PER_STEP = GROUP * 2 / 64;
    // Chunks of rows small enough to stay in the caches while every group passes over them (prefill), each chunk's
    // groups shared out among the threads (group_claims.h).
    GroupClaims claims(column_groups, M, ROW_CHUNK);
#pragma omp parallel
    {
        const unsigned int saved_csr = _mm_getcsr();
        if (PAIR_ORDER) _mm_setcsr(saved_csr | 0x8040);  // FTZ | DAZ
        if (M <= MAX_ROWS || bf16_widen_in_registers || K == 0) {  // (K = 0: the registers' way writes the bias)
            for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
                const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
                for (int64_t g; (g = claims.next(m0)) >= 0;)
                    for (int64_t m = m0; m < m0 + chunk; m += MAX_ROWS) {
                        const int rows = m0 + chunk - m < MAX_ROWS ? static_cast<int>(m0 + chunk - m) : MAX_ROWS;
                        const Bf16BlockFn block = stream_prefetch_on ? bf16_block_for<true, PAIR_ORDER>(rows)
                                                                     : bf16_block_for<false, PAIR_ORDER>(rows);
                        block(x + m * ldx, ldx, wp + g * K * GROUP, K, bias ? bias + g * GROUP : nullptr,
                              y + m * N + g * GROUP, N);
                    }
            }
        } else {
            alignas(64) float buffer[K_BLOCK * GROUP];
            for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
                const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
                const int64_t passes = 1 + (chunk - WIDENING_ROWS + MAX_ROWS - 1) / MAX_ROWS;
                const int64_t k_block = chunk <= FEW_ROWS ? FEW_ROWS_K_BLOCK : K_BLOCK;
                for (int64_t g; (g = claims.next(m0)) >= 0;) {
                    const uint16_t* w = wp + g * K * GROUP;
                    const float* b = bias ? bias + g * GROUP : nullptr;
                    for (int64_t k0 = 0; k0 < K; k0 += k_block) {
                        const int64_t k1 = K - k0 < k_block ? K : k0 + k_block, lines = (k1 - k0) * LINES_PER_STEP;
                        for (int64_t m = m0, pass = 0; m < m0 + chunk; pass++) {
                            const int most = pass == 0 ? WIDENING_ROWS : MAX_ROWS;
                            const int rows = m0 + chunk - m < most ? static_cast<int>(m0 + chunk - m) : most;
                            // The passes share the next block's lines, which follow this one.
                            const int64_t from = pass * lines / passes, to = (pass + 1) * lines / passes;
                            const float* pf = reinterpret_cast<const float*>(
                                reinterpret_cast<const char*>(w + k1 * GROUP) + from * 64);
                            if (pass == 0)
                                widening_block_for<PAIR_ORDER>(rows)(x + m * ldx + k0, ldx, w + k0 * GROUP, k1 - k0,
                                                                     buffer, b, k0 == 0, y + m * N + g * GROUP, N, pf,
                                                                     to - from);
                            else
                                block_for<PAIR_ORDER>(rows)(x + m * ldx + k0, ldx, buffer, 0, k1 - k0, b, k0 == 0,
                                                            y + m * N + g * GROUP, N, pf, to - from);
                            m += rows;
                        }
                    }
                }
            }
        }
        _mm_setcsr(saved_csr);
    }
}

}  // namespace

extern "C" {

// Batched rows widen in registers (1) or in blocks (0) from now on (a negative `on` changes nothing); returns which.
int64_t atb_bf16_widen_in_registers(int64_t on) { return set_switch(bf16_widen_in_registers, on); }

// x: [M, K] with row stride ldx; wp: bfloat16 [N / 64][K / 2][64][2] (uint16_t bits); bias: [N] or null; y:
// [M, N]. N must be a multiple of 64, K even (and so every K block). The products are float32's of the bfloat16
// weights on x as given, added in k order (a float32 model's: the float32 panels' sums), or where atb_f32_use_amx
// turned the tiles on and K is a multiple of 32, on the tiles in three parts (amx_linear.h), at every row count.
void atb_bf16_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                         const float* bias, float* y) {
#ifdef ATB_AMX_BF16
    if (f32_amx_on && K % AMX_STEPS == 0) {
        amx_linear(x, nullptr, M, K, ldx, wp, N, bias, y, nullptr, 3);
        return;
    }
#endif
    widened_linear<false>(x, M, K, ldx, wp, N, bias, y);
}

}  // extern "C"

// --------------------------------------------------------------------------------------------------------------
// A bfloat16 model's products by AVX512-BF16's dot product (vdpbf16ps), where the compiler targets it
// (kernels/native.py adds -mavx512bf16 where /proc/cpuinfo reports avx512_bf16).
//
// In a bfloat16 model a linear's input holds bfloat16 values, so the products need no widening: vdpbf16ps takes
// 32 bfloat16 pairs of weights and inputs and adds each pair's two exact products into one of 16 float32 sums, and
// the packed layout's lanes are those pairs. One instruction does the work of two float32 fused multiply-adds with
// no widening: on AMD Zen 4, whose 512-bit FMAs issue once a cycle, it doubles the arithmetic rate (24 MLP layers of
// cpu-small at 300 rows: 339 GFLOP/s against the widening kernel's 173, docs/PERFORMANCE.md); on an Intel Xeon,
// whose FMAs issue twice a cycle and vdpbf16ps once, an earlier version measured slower, so kernels/linear.py's
// bf16_dot_chosen times the two at load and turns this path on only where it wins (atb_bf16_use_dot). More rows than
// MAX_ROWS run register blocks over each K block of the weights as they lie (the first pass reads what the passes
// over the block before prefetched, the rest find it in L1).
// Decode's few rows (M <= MAX_ROWS) are memory-bound: they take the dot product only up to the rows
// atb_bf16_dot_decode_rows set (bf16_dot_decode_chosen times 1 and MAX_ROWS rows on weights evicted from the
// caches), in one pass over each column group, prefetching in software or not as also measured. The dot product
// reads a line of weights with one instruction where the widening takes a shift, a mask and two FMAs, so a core's
// out-of-order window reaches farther ahead in the stream: on AMD Zen 4 one row's widened stream read 27-28 GB/s
// where the probe read 53 (the dot product not measured there yet); on this kit's Xeon, its AMX tiles off, the 24
// layers of a decode step took 0.91 of the widening's time at one row and 0.78 at four, the widening without
// software prefetches as the kit chose there (docs/PERFORMANCE.md).

namespace {

#ifdef __AVX512BF16__

// k-steps per block: 16 KB of weights for a few passes (batched decode), 32 KB for more (prefill), whose longer
// blocks read and write the outputs less often: 555 ms against 580 (128) at 300 rows (24 MLP layers of cpu-small,
// AMD EPYC, docs/PERFORMANCE.md, with an earlier version that copied each block into L1 first). At 16 rows, with
// the next block prefetched into L2, 64 and 256 k-steps took 1.07 and 1.03 times 128's.
// The next block's lines are prefetched into L2 for a few passes and into L1 for more: at 16 rows (3 passes) into
// L1 they evict the lines the block's later passes read (the 24 layers of a bfloat16 decode step at batch 16 took
// 0.88 of the time with L2, replayed on the AMD EPYC Zen 4), at 64 rows (11 passes) L2 took 1.03 of L1's.
constexpr int64_t DOT_FEW_PASSES_K_BLOCK = 128, DOT_K_BLOCK = 256;
typedef int32_t aliased_i32 __attribute__((may_alias));  // two bfloat16 inputs read as one 32-bit value

// acc[MR][4] (+)= xb[MR rows, pairs] . w[pairs][64][2], then stored to y: xb holds each row's bfloat16 inputs from
// the block's first k-step on (row stride ldxb). Prefetches `share` lines from `pf` on, spread over the pairs, into
// L2 (to_l2) or L1.
template <int MR>
void dot_register_block(const uint16_t* xb, int64_t ldxb, const uint16_t* w, int64_t pairs, const float* bias,
                        bool first, float* y, int64_t ldy, const char* pf, int64_t share, bool to_l2) {
    __m512 acc[MR][4];
    start_sums(acc, bias, first, y, ldy);
    int64_t owed = 0, p = 0;
    do {  // (pairs > 0: register_block in panel_linear.h says why a loop that might run no times is not)
        const uint16_t* wp = w + p * 2 * GROUP;
        const __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 32), w2 = _mm512_loadu_si512(wp + 64),
                      w3 = _mm512_loadu_si512(wp + 96);
        for (owed += share; owed >= pairs; owed -= pairs, pf += 64) {
            if (to_l2)
                _mm_prefetch(pf, _MM_HINT_T1);
            else
                _mm_prefetch(pf, _MM_HINT_T0);
        }
        for (int i = 0; i < MR; i++) {
            // The row's two inputs of this pair, as one 32-bit value broadcast to every lane.
            const __m512i b = _mm512_set1_epi32(reinterpret_cast<const aliased_i32*>(xb + i * ldxb)[p]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)w0, (__m512bh)b);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)w1, (__m512bh)b);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], (__m512bh)w2, (__m512bh)b);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], (__m512bh)w3, (__m512bh)b);
        }
    } while (++p < pairs);
    store_sums(acc, y, ldy);
}

using DotBlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, const float*, bool, float*, int64_t,
                            const char*, int64_t, bool);

DotBlockFn dot_block_for(int rows) {
    switch (rows) {
        case 1: return dot_register_block<1>;
        case 2: return dot_register_block<2>;
        case 3: return dot_register_block<3>;
        case 4: return dot_register_block<4>;
        case 5: return dot_register_block<5>;
        default: return dot_register_block<6>;
    }
}

#endif  // __AVX512BF16__

// Whether atb_bf16_dot_linear_f32 multiplies more than MAX_ROWS rows by the dot product (bf16_dot_on), and up to how
// many rows of decode's (bf16_dot_decode_rows, at most MAX_ROWS): off (0) until atb_bf16_use_dot and
// atb_bf16_dot_decode_rows set them (Python does, where it measured the dot product faster on this CPU:
// kernels/linear.py). One CPU's choices, process-wide.
int64_t bf16_dot_on = 0, bf16_dot_decode_rows = 0;
// Whether the dot product's single passes over the weights (decode's rows) prefetch their stream in software: on
// until atb_bf16_dot_one_pass_prefetch says otherwise (Python measures both with the dot product's decode rows).
int64_t bf16_dot_one_pass_prefetch = 1;

}  // namespace

extern "C" {

// Whether this build has AVX512-BF16's dot product.
int64_t atb_bf16_dot_available() {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

// Turns the dot product on (1) or off (0) for atb_bf16_dot_linear_f32, where the build has it (a negative `on`
// changes nothing); returns whether it is on.
int64_t atb_bf16_use_dot(int64_t on) { return set_switch(bf16_dot_on, on, atb_bf16_dot_available()); }

// Decode's products of 1 to `rows` rows (at most MAX_ROWS) take the dot product from now on, where the build has it
// (0: none; a negative `rows` changes nothing); returns up to how many rows do.
int64_t atb_bf16_dot_decode_rows(int64_t rows) {
    if (rows >= 0) bf16_dot_decode_rows = atb_bf16_dot_available() ? (rows < MAX_ROWS ? rows : MAX_ROWS) : 0;
    return bf16_dot_decode_rows;
}

// The dot product's single passes prefetch their stream in software (1) or not (0) from now on (a negative `on`
// changes nothing); returns which.
int64_t atb_bf16_dot_one_pass_prefetch(int64_t on) { return set_switch(bf16_dot_one_pass_prefetch, on); }

}  // extern "C"

namespace {

#ifdef __AVX512BF16__

// The dot product's rows for the two entries below. The rows' inputs as float32 (x32: each
// chunk converted to bfloat16 first) or as bfloat16 (x16, read where they lie, rows 4-byte aligned); the sums to y32
// (float32, row stride N) or to y16 (bfloat16, rounded to nearest even), by way of a thread's float32 sums of one
// column group for a chunk's rows (at most 64 KB: they stay in L2 over the K blocks), rounded into y16 when whole.
void dot_linear_rows(const float* x32, const uint16_t* x16, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp,
                     int64_t N, const float* bias, float* y32, uint16_t* y16) {
    const int64_t column_groups = N / GROUP;
    constexpr int64_t LINES_PER_STEP = GROUP * 2 / 64;
    const int64_t chunk_rows = M < ROW_CHUNK ? M : ROW_CHUNK;
    uint16_t* converted = conversion_buffer(x32, chunk_rows, K);
    GroupClaims claims(column_groups, M, ROW_CHUNK);  // each chunk's groups (group_claims.h)
#pragma omp parallel
    {
        thread_local std::vector<float> group_sums;  // (each OpenMP thread's own)
        if (y16 != nullptr && static_cast<int64_t>(group_sums.size()) < chunk_rows * GROUP)
            group_sums.resize(chunk_rows * GROUP);
        for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
            const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            const int64_t passes = (chunk + MAX_ROWS - 1) / MAX_ROWS;
            int64_t ldxb;
            const uint16_t* xb = chunk_in_bf16(x32, x16, m0, chunk, ldx, K, converted, ldxb);
            for (int64_t g; (g = claims.next(m0)) >= 0;) {
                const uint16_t* w = wp + g * K * GROUP;
                float* sums = y16 != nullptr ? group_sums.data() : y32 + m0 * N + g * GROUP;
                const int64_t lds = y16 != nullptr ? GROUP : N;
                // One pass needs no K blocks: nothing else reads the weights again.
                const int64_t k_block = passes == 1 ? K : passes <= FEW_PASSES ? DOT_FEW_PASSES_K_BLOCK : DOT_K_BLOCK;
                for (int64_t k0 = 0; k0 < K; k0 += k_block) {
                    const int64_t k1 = K - k0 < k_block ? K : k0 + k_block;
                    const int64_t lines = (k1 - k0) * LINES_PER_STEP;
                    for (int64_t m = 0, pass = 0; m < chunk; m += MAX_ROWS, pass++) {
                        const int rows = chunk - m < MAX_ROWS ? static_cast<int>(chunk - m) : MAX_ROWS;
                        // One pass prefetches BF16_AHEAD k-steps ahead of its own reads into L1, as the
                        // widening's direct path does, where bf16_dot_one_pass_prefetch says (its own switch: on
                        // this kit's Xeon, tiles off, one row's 24 layers took 34.1 ms without against 24.4 with,
                        // where the widening took 26.1 and 26.6). Several passes share the next block's lines,
                        // which follow this one.
                        const int64_t from = pass * lines / passes, to = (pass + 1) * lines / passes;
                        const int64_t share = passes > 1 ? to - from : bf16_dot_one_pass_prefetch ? lines : 0;
                        const uint16_t* pf = passes == 1 ? w + BF16_AHEAD * GROUP : w + k1 * GROUP;
                        dot_block_for(rows)(xb + m * ldxb + k0, ldxb, w + k0 * GROUP, (k1 - k0) / 2,
                                            bias ? bias + g * GROUP : nullptr, k0 == 0, sums + m * lds, lds,
                                            reinterpret_cast<const char*>(pf) + from * 64, share,
                                            passes > 1 && passes <= FEW_PASSES);
                    }
                }
                if (y16 != nullptr)
                    for (int64_t m = 0; m < chunk; m++)
                        store_bf16(sums + m * GROUP, GROUP, y16 + (m0 + m) * N + g * GROUP);
            }
            if (x16 == nullptr) {
#pragma omp barrier
                // (every thread is done with this chunk's rows before the next chunk overwrites them)
            }
        }
    }
}

#endif  // __AVX512BF16__

// amx_linear where the build has the tiles, they are on and K is a multiple of 32 (every row count: amx_linear.h),
// else dot_linear_rows where the build has the dot product and it is on for this many rows (more than MAX_ROWS:
// bf16_dot_on; fewer: bf16_dot_decode_rows); whether either ran.
bool ran_tiles_or_dot(const float* x32, const uint16_t* x16, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp,
                      int64_t N, const float* bias, float* y32, uint16_t* y16) {
#ifdef ATB_AMX_BF16
    if (bf16_amx_on && K % AMX_STEPS == 0) {
        amx_linear(x32, x16, M, K, ldx, wp, N, bias, y32, y16);
        return true;
    }
#endif
#ifdef __AVX512BF16__
    // (K = 0: the bias, widened; an odd K, which the layout does not allow, would leave a K block no pair, and its
    // register block's loops, which run at least once, would not end)
    if (K > 0 && K % 2 == 0 && (M > MAX_ROWS ? bf16_dot_on != 0 : M <= bf16_dot_decode_rows)) {
        dot_linear_rows(x32, x16, M, K, ldx, wp, N, bias, y32, y16);
        return true;
    }
#endif
    return false;
}

}  // namespace

extern "C" {

// atb_bf16_linear_f32 for a bfloat16 model: x must hold bfloat16 values (the dot product rounds any other value to
// one, nearest, ties to even; the widening takes it as it is), the products are exact and summed in float32, by
// vdpbf16ps where the build has it and atb_bf16_use_dot (past MAX_ROWS rows) or atb_bf16_dot_decode_rows (fewer)
// turned it on, else widened (in registers or in blocks, as for atb_bf16_linear_f32), each pair in vdpbf16ps's
// order: the same sums every way. Same arguments.
void atb_bf16_dot_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                             const float* bias, float* y) {
    if (ran_tiles_or_dot(x, nullptr, M, K, ldx, wp, N, bias, y, nullptr)) return;
    widened_linear<true>(x, M, K, ldx, wp, N, bias, y);
}

// atb_bf16_dot_linear_f32 on bfloat16 rows and outputs, a bfloat16 model's products outside the decode step
// (prefill, the vision tower): x [M, K] bfloat16 (row stride ldx; rows 4-byte aligned), y [M, N] bfloat16, each the
// float32 sum rounded to nearest even (as PyTorch's bfloat16 linear rounds it). The dot product reads the rows where
// they lie and keeps no float32 copy of them or of the outputs; where it does not run (a few rows, or the widening
// chosen), the widening kernel runs on float32 copies of ROW_CHUNK rows at a time, made here in buffers of at most
// ROW_CHUNK * (K + N) floats (a row's sums are the same in any chunk and either way: both add a pair's products in
// vdpbf16ps's order, pair after pair).
void atb_bf16_dot_linear_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                              const float* bias, uint16_t* y) {
    if (ran_tiles_or_dot(nullptr, x, M, K, ldx, wp, N, bias, nullptr, y)) return;
    thread_local std::vector<float> row_buffer, sum_buffer;  // (kept for the calling thread's next call)
    const int64_t chunk_rows = M < ROW_CHUNK ? M : ROW_CHUNK;
    if (static_cast<int64_t>(row_buffer.size()) < chunk_rows * K) row_buffer.resize(chunk_rows * K);
    if (static_cast<int64_t>(sum_buffer.size()) < chunk_rows * N) sum_buffer.resize(chunk_rows * N);
    float *rows = row_buffer.data(), *sums = sum_buffer.data();  // (the calling thread's, shared with the team)
    for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
        const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
#pragma omp parallel for
        for (int64_t m = 0; m < chunk; m++) load_bf16_row(x + (m0 + m) * ldx, K, rows + m * K);
        widened_linear<true>(rows, chunk, K, K, wp, N, bias, sums);
#pragma omp parallel for
        for (int64_t m = 0; m < chunk; m++) store_bf16(sums + m * N, N, y + (m0 + m) * N);
    }
}

// wt [K][N] = W^T, the plain transpose of the [N, K] weight pair_layout packed into wp [N / 64][K / 2][64][2]: a
// 32-bit lane's low half (k-step 2p) goes to row 2p, its high half to row 2p + 1. What a bfloat16 model's many-row
// products hand oneDNN where the user asks for it (for an AMX CPU's tiles: kernels/linear.py's bf16_prefill_chosen),
// in a scratch buffer, so that the weights are held once, in the decode step's layout. Each thread writes whole
// rows (a few pairs' two rows at a time) and reads each group's lanes of those pairs, 4 KB in a row.
void atb_bf16_unpack_pairs(const uint16_t* wp, int64_t N, int64_t K, uint16_t* wt) {
    constexpr int64_t PAIRS_AT_ONCE = 16;
    const int64_t groups = N / GROUP, pairs = K / 2;
#pragma omp parallel for schedule(static)
    for (int64_t p0 = 0; p0 < pairs; p0 += PAIRS_AT_ONCE) {
        const int64_t p1 = pairs - p0 < PAIRS_AT_ONCE ? pairs : p0 + PAIRS_AT_ONCE;
        for (int64_t g = 0; g < groups; g++) {
            for (int64_t p = p0; p < p1; p++) {
                const uint16_t* lanes = wp + (g * pairs + p) * 2 * GROUP;
                uint16_t* even = wt + 2 * p * N + g * GROUP;
                for (int64_t j = 0; j < GROUP; j += 16) {
                    const __m512i v = _mm512_loadu_si512(lanes + 2 * j);
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(even + j), _mm512_cvtepi32_epi16(v));
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(even + N + j),
                                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
                }
            }
        }
    }
}

}  // extern "C"
