// y = x (W_int8 * scale)^T + b, weight-only int8 (W8A16): int8 weights, 16-bit activations, int32 products.
//
// W is packed in groups of 64 output columns like the panel kernel's float32 weights (panel_linear.h), with each
// column's two weights of a pair of input columns side by side: wp[N / 64][K / 2][64][2] (kernels/w8a16.py's
// pack). A pair of k-steps of a group is 128 bytes, and a thread's groups are one sequential stream of a quarter of
// float32's bytes. Scales are the quantizer's own [N, groups] (kernels/w8a16.py): per output channel (groups = 1)
// or per group of K / groups input columns.
//
// The activations are quantized on entry, per row and per block of at most BLOCK_PAIRS pairs of input columns
// inside one scale group, to int16 with a float32 scale (amax / 32767): 16-bit activations, about 2^-16 of each
// block's largest value, next to the int8 weights' 2^-8 of each row's. Then a product is integer arithmetic:
// 32 weights are sign-extended to int16 in one instruction (_mm512_cvtepi8_epi16) and multiplied with a row's
// broadcast pair of activations and summed into 16 int32 columns in one more (vpdpwssd, AVX512-VNNI;
// _mm512_madd_epi16 + _mm512_add_epi32 without it), where float32 activations took six instructions for the same
// 32 weights (widen to int32, convert, multiply-add, twice). A block's int32 sums are turned to float32 and scaled
// (the block's activation scale times the column's weight scale) into y once per block. A block is at most 256
// pairs: |sum| <= 256 * 2 * 127 * 32767 < 2^31, no overflow.
//
// Each group's K blocks stay in L1 (256 pairs x 128 B = 32 KB) while every chunk of up to 6 rows passes over them,
// so the weights are read from memory once whatever the row count; the passes prefetch the next block, a single
// pass (where it prefetches: panel_linear.h's stream_prefetch_on) a fixed distance ahead, and every line is
// prefetched into L2 a further 32 KB ahead first (on this kit's Xeon one row's int8 stream was too thin for the L1
// prefetches alone to keep memory busy: docs/PERFORMANCE.md).

#pragma once

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <vector>

#include "panel_linear.h"

namespace {

constexpr int64_t PAIR_BYTES = 2 * GROUP;  // one pair of k-steps of a column group: 128 bytes, two lines
constexpr int64_t BLOCK_PAIRS = 256;       // pairs per int32 block: no overflow (see above), 32 KB of weights
constexpr int64_t W8_AHEAD = 64;           // single pass: prefetch this many pairs (two lines each, 8 KB) ahead
constexpr float INT16_MAX_F = 32767.0f;
constexpr int64_t W8_L2_AHEAD = 32768;  // bytes: each line prefetched into L2 this far ahead of its L1 prefetch

#ifdef __AVX512VNNI__
// vpdpwssd written out: GCC 12 compiled _mm512_dpwssd_epi32 with each sum copied into another register and back (and,
// at 5-6 rows, stored to the stack) at every pair; here the sum is the instruction's own destination.
inline __m512i dot_pairs(__m512i acc, __m512i w, __m512i x) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
}
#else
inline __m512i dot_pairs(__m512i acc, __m512i w, __m512i x) { return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x)); }
#endif

// Where row i's block b starts and ends: blocks never cross a scale group, and hold at most BLOCK_PAIRS pairs.
struct Blocks {
    int64_t group_pairs, per_group, count;  // pairs per scale group, blocks per group, blocks per row
    Blocks(int64_t K, int64_t groups) {
        group_pairs = K / 2 / groups;
        per_group = (group_pairs + BLOCK_PAIRS - 1) / BLOCK_PAIRS;
        count = groups * per_group;
    }
    int64_t first_pair(int64_t b) const {
        return b / per_group * group_pairs + (b % per_group) * BLOCK_PAIRS;
    }
    int64_t end_pair(int64_t b) const {
        const int64_t end = first_pair(b) + BLOCK_PAIRS, group_end = (b / per_group + 1) * group_pairs;
        return end < group_end ? end : group_end;
    }
};

// Row x[K] as int16 q[K] with one scale per block: q = round(x / s) (half to even), s = amax / 32767 over the block.
// A NaN or an infinity in a block makes its scale NaN, so that its outputs are NaN, as a float product's are.
void quantize_row(const float* x, int64_t K, const Blocks& blocks, int16_t* q, float* s) {
    const __m512 limit = _mm512_set1_ps(INT16_MAX_F), minus_limit = _mm512_set1_ps(-INT16_MAX_F);
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    for (int64_t b = 0; b < blocks.count; b++) {
        const int64_t k0 = 2 * blocks.first_pair(b), k1 = 2 * blocks.end_pair(b);
        __m512 amax = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int64_t k = k0; k < k1; k += 16) {
            const __mmask16 in = k1 - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k1 - k)) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(in, x + k);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            amax = _mm512_max_ps(amax, _mm512_and_ps(v, magnitude));
        }
        float largest = _mm512_reduce_max_ps(amax);
        if (nan || !(largest < INFINITY)) largest = NAN;
        s[b] = largest / INT16_MAX_F;
        const __m512 inverse = _mm512_set1_ps(largest > 0.0f ? INT16_MAX_F / largest : 0.0f);
        for (int64_t k = k0; k < k1; k += 16) {
            const __mmask16 in = k1 - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k1 - k)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, x + k), inverse);
            v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // |v| <= 32767 but NaN's
            v = _mm512_min_ps(_mm512_max_ps(v, minus_limit), limit);
            _mm256_mask_storeu_epi16(q + k, in, _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(v)));
        }
    }
}

// The weight scales of group `group` for the 64 output columns from n0: column n's is scales[n * groups + group].
inline void load_scales(const float* scales, int64_t groups, int64_t n0, int64_t group, __m512 s[4]) {
    const __m512i stride = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)groups));
    for (int j = 0; j < 4; j++) s[j] = _mm512_i32gather_ps(stride, scales + (n0 + 16 * j) * groups + group, 4);
}

// One pair p of k-steps: its products of MR rows q (int16, row stride ldq) and one column group's pair wp, added into
// acc or, for a block's first pair (START), acc set to them (what vpdpwssd adds to zero, without the zeros: GCC 12
// kept sums that start from one shared zero in other registers than the loop's and copied them at every pair).
template <int MR, bool START>
inline void w8_pair(__m512i (&acc)[MR][4], const int16_t* q, int64_t ldq, const int8_t* wp, int64_t p) {
    __m512i wv[4];
    for (int j = 0; j < 4; j++)
        wv[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * j)));
    for (int i = 0; i < MR; i++) {
        const __m512i xp = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(q + i * ldq + 2 * p));
        for (int j = 0; j < 4; j++)
            acc[i][j] = START ? _mm512_madd_epi16(wv[j], xp) : dot_pairs(acc[i][j], wv[j], xp);
    }
}

// Rows q[MR] (int16, row stride ldq, block scales sx with row stride lds) against one column group's pairs
// [p0, p1) (block b, p0 < p1) of w: y[MR][64] = (first ? bias : y) + sx * sw * products. While it runs, prefetch
// `share` lines from `pf` on, spread evenly over the pairs.
template <int MR>
void w8_register_block(const int16_t* q, int64_t ldq, const float* sx, int64_t lds, int64_t b, const int8_t* w,
                       int64_t p0, int64_t p1, const __m512 sw[4], const float* bias, bool first, float* y,
                       int64_t ldy, const char* pf, int64_t share) {
    __m512i acc[MR][4];
    const int64_t len = p1 - p0;
    int64_t owed = 0;  // share / len lines per pair, kept in whole lines by counting in units of 1 / len
    for (int64_t p = p0; p < p1; p++) {
        for (owed += share; owed >= len; owed -= len, pf += 64) {
            _mm_prefetch(pf, _MM_HINT_T0);
            _mm_prefetch(pf + W8_L2_AHEAD, _MM_HINT_T1);
        }
        if (p == p0)
            w8_pair<MR, true>(acc, q, ldq, w + p * PAIR_BYTES, p);
        else
            w8_pair<MR, false>(acc, q, ldq, w + p * PAIR_BYTES, p);
    }
    const SumsStart start = sums_start(bias, first, y, ldy);
    for (int i = 0; i < MR; i++) {
        const __m512 row_scale = _mm512_set1_ps(sx[i * lds + b]);
        for (int j = 0; j < 4; j++) {
            const __m512 base = _mm512_loadu_ps(start.from + i * start.stride + 16 * j);
            const __m512 scale = _mm512_mul_ps(row_scale, sw[j]);
            _mm512_storeu_ps(y + i * ldy + 16 * j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), scale, base));
        }
    }
}

using W8BlockFn = void (*)(const int16_t*, int64_t, const float*, int64_t, int64_t, const int8_t*, int64_t,
                           int64_t, const __m512*, const float*, bool, float*, int64_t, const char*, int64_t);

W8BlockFn w8_block_for(int rows) {
    switch (rows) {
        case 1: return w8_register_block<1>;
        case 2: return w8_register_block<2>;
        case 3: return w8_register_block<3>;
        case 4: return w8_register_block<4>;
        case 5: return w8_register_block<5>;
        default: return w8_register_block<6>;
    }
}

// The calling thread's buffers for the quantized activations, grown as needed and kept (prefill's are large).
struct QuantizedRows {
    std::vector<int16_t> q;
    std::vector<float> scales;
};

QuantizedRows& quantized_rows() {
    static thread_local QuantizedRows rows;
    return rows;
}

}  // namespace

extern "C" {

// x: [M, K] with row stride ldx; wp: int8 [N / 64][K / 2][64][2]; scales: [N, groups], groups dividing K into an
// even number of columns each; bias: [N] or null; y: [M, N]. N must be a multiple of 64, K even.
void atb_w8a16_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* wp, int64_t N,
                          const float* scales, int64_t groups, const float* bias, float* y) {
    const Blocks blocks(K, groups);
    QuantizedRows& rows = quantized_rows();
    if (static_cast<int64_t>(rows.q.size()) < M * K) rows.q.resize(M * K);
    if (static_cast<int64_t>(rows.scales.size()) < M * blocks.count) rows.scales.resize(M * blocks.count);
    int16_t* const q = rows.q.data();
    float* const sx = rows.scales.data();
    const int64_t column_groups = N / GROUP, pairs = K / 2;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row(x + m * ldx, K, blocks, q + m * K, sx + m * blocks.count);
        // Each thread takes an equal run of column groups: one contiguous stretch of the packed weights.
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t first = column_groups * thread / threads, end = column_groups * (thread + 1) / threads;
        for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
            const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            const int64_t passes = (chunk + MAX_ROWS - 1) / MAX_ROWS;
            for (int64_t g = first; g < end; g++) {
                const int8_t* w = wp + g * pairs * PAIR_BYTES;
                __m512 sw[4];
                for (int64_t b = 0; b < blocks.count; b++) {
                    if (b % blocks.per_group == 0) load_scales(scales, groups, g * GROUP, b / blocks.per_group, sw);
                    const int64_t p0 = blocks.first_pair(b), p1 = blocks.end_pair(b), lines = 2 * (p1 - p0);
                    for (int64_t m = m0, pass = 0; m < m0 + chunk; m += MAX_ROWS, pass++) {
                        const int rows_here = m0 + chunk - m < MAX_ROWS ? static_cast<int>(m0 + chunk - m) : MAX_ROWS;
                        // One pass runs W8_AHEAD pairs ahead of its own reads (if it prefetches: panel_linear.h's
                        // stream_prefetch_on); several share the next block's lines, which follow this block in
                        // memory (into the next group at the end).
                        const int64_t from = pass * lines / passes, to = (pass + 1) * lines / passes;
                        const int64_t share = passes > 1 ? to - from : stream_prefetch_on ? lines : 0;
                        const char* pf = reinterpret_cast<const char*>(
                            passes == 1 ? w + (p0 + W8_AHEAD) * PAIR_BYTES : w + p1 * PAIR_BYTES + from * 64);
                        w8_block_for(rows_here)(q + m * K, K, sx + m * blocks.count, blocks.count, b, w, p0, p1, sw,
                                                bias ? bias + g * GROUP : nullptr, b == 0, y + m * N + g * GROUP, N,
                                                pf, share);
                    }
                }
            }
        }
    }
}

}  // extern "C"
