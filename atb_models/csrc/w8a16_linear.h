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
//
// Where the CPU has AMX-INT8, kernels/w8a16.py packs the weights for the tiles instead (atb_w8a16_tiles_linear_f32,
// below): the same blocks and block sums, so the same outputs bit for bit, the products of more than a few rows by
// TDPBSSD / TDPBUSD on each activation's two bytes, and of a few rows by the same register blocks, reading the
// tiles' layout (a quad of k-steps, 32 columns, in each step's 128 bytes).

#pragma once

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <vector>

#include "amx_linear.h"
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
void quantize_row(const float* x, const Blocks& blocks, int16_t* q, float* s) {
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
        float inverse = largest > 0.0f ? INT16_MAX_F / largest : 0.0f, prescale = 1.0f;
        if (inverse == INFINITY) {  // a block under 32767 / FLT_MAX: scaled up by 2^64 first (exactly), then as above
            prescale = 0x1p64f;
            inverse = INT16_MAX_F / (largest * prescale);
        }
        const __m512 up = _mm512_set1_ps(prescale), by = _mm512_set1_ps(inverse);
        for (int64_t k = k0; k < k1; k += 16) {
            const __mmask16 in = k1 - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k1 - k)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, x + k), up), by);
            v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // |v| <= 32767 but NaN's
            v = _mm512_min_ps(_mm512_max_ps(v, minus_limit), limit);
            _mm256_mask_storeu_epi16(q + k, in, _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(v)));
        }
    }
}

// The weight scales of group `group` for the 16 x `vectors` output columns from n0 (64 by default): column n's is
// scales[n * groups + group].
inline void load_scales(const float* scales, int64_t groups, int64_t n0, int64_t group, __m512* s, int vectors = 4) {
    const __m512i stride = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)groups));
    for (int j = 0; j < vectors; j++) s[j] = _mm512_i32gather_ps(stride, scales + (n0 + 16 * j) * groups + group, 4);
}

constexpr int64_t HALF = GROUP / 2;  // output columns of a half of a group: the tiles' layout's column unit

// A block's step: a pair of k-steps of a 64-column group (pair_layout: PAIR_BYTES, 64 columns' 2 weights), or, in
// the tiles' layout (QUADS), a quad of k-steps of a 32-column half (4 weights of 32 columns: 128 bytes too).
template <bool QUADS>
struct W8Step {
    static constexpr int64_t COLUMNS = QUADS ? HALF : GROUP;
    static constexpr int64_t K_STEPS = QUADS ? 4 : 2;
};

// One step p: its products of MR rows q (int16, row stride ldq) and the step's 128 bytes of weights wp, added into
// acc or, for a block's first step (START), acc set to them (what vpdpwssd adds to zero, without the zeros: GCC 12
// kept sums that start from one shared zero in other registers than the loop's and copied them at every pair). A
// pair's sums are one column a lane; a quad's are two lanes a column (its two pairs), added by w8_store_sums.
template <int MR, bool START, bool QUADS>
inline void w8_step(__m512i (&acc)[MR][4], const int16_t* q, int64_t ldq, const int8_t* wp, int64_t p) {
    __m512i wv[4];
    for (int j = 0; j < 4; j++)
        wv[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * j)));
    for (int i = 0; i < MR; i++) {
        const int16_t* xi = q + i * ldq + W8Step<QUADS>::K_STEPS * p;
        const __m512i xp = QUADS ? _mm512_set1_epi64(*reinterpret_cast<const int64_t*>(xi))
                                 : _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xi));
        for (int j = 0; j < 4; j++)
            acc[i][j] = START ? _mm512_madd_epi16(wv[j], xp) : dot_pairs(acc[i][j], wv[j], xp);
    }
}

// 16 outputs of a block: y = base + (row_scale * sw) * sums, in this order (both kernels' outputs are the same bits
// because both end here).
inline void store_scaled(__m512i sums, __m512 row_scale, __m512 sw, const float* base, float* y) {
    _mm512_storeu_ps(y, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(row_scale, sw), _mm512_loadu_ps(base)));
}

// y[MR][columns] = start + sx * sw * the block's sums (start: sums_start's), a row's block scale sx[i * lds].
template <int MR, bool QUADS>
inline void w8_store_sums(__m512i (&acc)[MR][4], const float* sx, int64_t lds, const __m512* sw, SumsStart start,
                          float* y, int64_t ldy) {
    const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    for (int i = 0; i < MR; i++) {
        const __m512 row_scale = _mm512_set1_ps(sx[i * lds]);
        for (int j = 0; j < (QUADS ? 2 : 4); j++) {
            // (a quad's two lanes a column: columns 16j..16j+7 in acc[i][2j], 16j+8..16j+15 in acc[i][2j+1])
            const __m512i sums =
                QUADS ? _mm512_add_epi32(_mm512_permutex2var_epi32(acc[i][2 * j], evens, acc[i][2 * j + 1]),
                                         _mm512_permutex2var_epi32(acc[i][2 * j], odds, acc[i][2 * j + 1]))
                      : acc[i][j];
            store_scaled(sums, row_scale, sw[j], start.from + i * start.stride + 16 * j, y + i * ldy + 16 * j);
        }
    }
}

// Rows q[MR] (int16, row stride ldq, block scales sx with row stride lds) against one column unit's steps [p0, p1)
// (block b, p0 < p1) of w: y[MR][columns] = (first ? bias : y) + sx * sw * products. While it runs, prefetch `share`
// lines from `pf` on, spread evenly over the steps.
template <int MR, bool QUADS>
void w8_register_block(const int16_t* q, int64_t ldq, const float* sx, int64_t lds, int64_t b, const int8_t* w,
                       int64_t p0, int64_t p1, const __m512 sw[4], const float* bias, bool first, float* y,
                       int64_t ldy, const char* pf, int64_t share) {
    __m512i acc[MR][4];
    const int64_t len = p1 - p0;
    int64_t owed = 0;  // share / len lines per step, kept in whole lines by counting in units of 1 / len
    for (int64_t p = p0; p < p1; p++) {
        for (owed += share; owed >= len; owed -= len, pf += 64) {
            _mm_prefetch(pf, _MM_HINT_T0);
            _mm_prefetch(pf + W8_L2_AHEAD, _MM_HINT_T1);
        }
        if (p == p0)
            w8_step<MR, true, QUADS>(acc, q, ldq, w + p * PAIR_BYTES, p);
        else
            w8_step<MR, false, QUADS>(acc, q, ldq, w + p * PAIR_BYTES, p);
    }
    w8_store_sums<MR, QUADS>(acc, sx + b, lds, sw, sums_start(bias, first, y, ldy), y, ldy);
}

using W8BlockFn = void (*)(const int16_t*, int64_t, const float*, int64_t, int64_t, const int8_t*, int64_t,
                           int64_t, const __m512*, const float*, bool, float*, int64_t, const char*, int64_t);

template <bool QUADS>
W8BlockFn w8_block_for(int rows) {
    switch (rows) {
        case 1: return w8_register_block<1, QUADS>;
        case 2: return w8_register_block<2, QUADS>;
        case 3: return w8_register_block<3, QUADS>;
        case 4: return w8_register_block<4, QUADS>;
        case 5: return w8_register_block<5, QUADS>;
        default: return w8_register_block<6, QUADS>;
    }
}

// The calling thread's share of y [M, N] = q (M rows of K, int16, block scales sx) . w by the register blocks, inside
// a parallel region: the column units (64-column groups, or the tiles' layout's 32-column halves: w8_units) it
// claims, each one contiguous stream of the packed weights.
template <bool QUADS>
constexpr int64_t w8_units(int64_t N) { return N / W8Step<QUADS>::COLUMNS; }

template <bool QUADS>
void w8_vector_product(const int16_t* q, const float* sx, int64_t M, int64_t K, const Blocks& blocks, const int8_t* w8,
                       int64_t N, const float* scales, int64_t groups, const float* bias, float* y,
                       GroupClaims& claims) {
    constexpr int64_t COLUMNS = W8Step<QUADS>::COLUMNS, K_STEPS = W8Step<QUADS>::K_STEPS;
    const int64_t steps = K / K_STEPS;
    for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
        const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
        // (four rows of the tiles' layout in passes of 3 and 1: one pass of 4 read 1.06-1.10 of the pair layout's
        // time on a real decode step, though the two layouts' 4-row loops compile to the same instructions)
        const int pass_rows = QUADS && chunk == 4 ? 3 : MAX_ROWS;
        const int64_t passes = (chunk + pass_rows - 1) / pass_rows;
        for (int64_t g; (g = claims.next(m0)) >= 0;) {
            const int8_t* w = w8 + g * steps * PAIR_BYTES;
            __m512 sw[4];
            for (int64_t b = 0; b < blocks.count; b++) {
                if (b % blocks.per_group == 0)
                    load_scales(scales, groups, g * COLUMNS, b / blocks.per_group, sw, COLUMNS / 16);
                const int64_t p0 = 2 * blocks.first_pair(b) / K_STEPS, p1 = 2 * blocks.end_pair(b) / K_STEPS;
                const int64_t lines = 2 * (p1 - p0);
                for (int64_t m = m0, pass = 0; m < m0 + chunk; m += pass_rows, pass++) {
                    const int rows_here = m0 + chunk - m < pass_rows ? static_cast<int>(m0 + chunk - m) : pass_rows;
                    // One pass runs W8_AHEAD steps ahead of its own reads (if it prefetches: panel_linear.h's
                    // stream_prefetch_on); several share the next block's lines, which follow this block in memory
                    // (into the next unit at the end).
                    const int64_t from = pass * lines / passes, to = (pass + 1) * lines / passes;
                    const int64_t share = passes > 1 ? to - from : stream_prefetch_on ? lines : 0;
                    const char* pf = reinterpret_cast<const char*>(
                        passes == 1 ? w + (p0 + W8_AHEAD) * PAIR_BYTES : w + p1 * PAIR_BYTES + from * 64);
                    w8_block_for<QUADS>(rows_here)(q + m * K, K, sx + m * blocks.count, blocks.count, b, w, p0, p1,
                                                   sw, bias ? bias + g * COLUMNS : nullptr, b == 0,
                                                   y + m * N + g * COLUMNS, N, pf, share);
                }
            }
        }
    }
}

// The calling thread's buffers for the quantized activations, grown as needed and kept (prefill's are large).
struct QuantizedRows {
    std::vector<int16_t> q;
    std::vector<float> scales;
    std::vector<uint8_t> tiles;  // the tiles' kernel's: q's top (signed) and bottom bytes, as split_bytes lays them
};

// The calling thread's QuantizedRows, grown for M rows of K in `blocks` blocks (and the tiles' bytes where `tiles`).
QuantizedRows& quantized_rows(int64_t M, int64_t K, int64_t blocks, bool tiles) {
    static thread_local QuantizedRows rows;
    if (static_cast<int64_t>(rows.q.size()) < M * K) rows.q.resize(M * K);
    if (static_cast<int64_t>(rows.scales.size()) < M * blocks) rows.scales.resize(M * blocks);
    if (tiles && static_cast<int64_t>(rows.tiles.size()) < 2 * M * K) rows.tiles.resize(2 * M * K);
    return rows;
}

#ifdef ATB_AMX_INT8

// The tiles' int8 products (AMX-INT8, atb_w8a16_tiles_linear_f32): the same int32 block sums as the register blocks
// above, so the same outputs bit for bit. A tile multiplies bytes, 4 k-steps a 32-bit lane, so each int16 activation
// q goes in as two bytes, q = 256 hi + lo with hi = q >> 8 signed and lo = q & 255 unsigned: TDPBSSD sums hi's
// products and TDPBUSD lo's, both exactly in int32, and 256 hi_sum + lo_sum is the block's sum (in int32's wrapping
// arithmetic, whose end is right since the sum itself fits: see the top of this file).
//
// The weights are packed for the tiles in halves of a 64-column group, each half's k-steps in quads:
// wq[N / 64][2][K / 4][32][4] (kernels/w8a16.py's tile_layout), a half one stream of 32 K bytes. A B tile is 16 quads
// (64 k-steps) of 16 columns, 64 bytes a quad, 128 bytes apart. A k-step of 64 uses all eight tiles: the half's
// sums of hi and of lo for columns 0-15 and 16-31 (tiles 0-3), the rows' hi and lo bytes (4, 5), the two column
// tiles of weights (6, 7).
constexpr int64_t QUAD_STEPS = 64;   // k-steps of an int8 A tile: 16 quads of 4

// Row r of a block of `rows` rows, q[0:K] (int16), as the tiles load their bytes: for each 64 k-steps s, hi = q >> 8
// (arithmetic) of the block's rows, 64 bytes a row, then lo = q's low byte, at block + s * 128 * rows: a k-step's two
// input tiles in 2 x rows consecutive lines.
inline void split_bytes(const int16_t* q, int64_t K, uint8_t* block, int rows, int r) {
    for (int64_t s = 0; s < K / QUAD_STEPS; s++) {
        uint8_t* hi = block + s * 2 * rows * 64 + r * 64;
        uint8_t* lo = hi + rows * 64;
        for (int half = 0; half < 2; half++) {
            const __m512i v = _mm512_loadu_si512(q + s * QUAD_STEPS + 32 * half);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + 32 * half),
                                _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + 32 * half), _mm512_cvtepi16_epi8(v));  // (truncating)
        }
    }
}

// Where one block of rows streams a half's weights from memory, each k-step's 32 lines are prefetched W8_TILE_AHEAD
// bytes on (the next k-step), half before each weight tile's load (spread, as amx_group_in_three's), and into L2
// W8_L2_AHEAD bytes further on, as the register blocks do. 1-2 KB ahead beat 8 or 16 (1 row 0.93-0.95 of the time,
// 16 rows 0.90-0.93), with or without the L2 prefetches 16-64 KB on (docs/PERFORMANCE.md).
constexpr int64_t W8_TILE_AHEAD = 2048;
// Up to this many rows the register blocks multiply the tiles' layout (w8_vector_product<true>): the tiles' stream
// was the slower up to 3 rows, level at 4-5 and faster from 6 (docs/PERFORMANCE.md).
constexpr int64_t W8_VECTOR_ROWS = 5;

// sums[4][rows][16] (int32: hi's for columns 0-15, hi's for 16-31, lo's, lo's) = a block of rows' bytes `a` (as
// split_bytes lays them) over k-steps [k0, k1) (multiples of 64) against one half's weights w[K / 4][32][4], on
// tiles configured for the rows.
void w8_tiles_block(const uint8_t* a, int rows, const int8_t* w, int64_t k0, int64_t k1, int32_t* sums, bool stream) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = k0; k < k1; k += QUAD_STEPS) {
        const int8_t* wk = w + k * HALF;  // quad k / 4: 32 columns x 4 bytes
        const char* ahead = reinterpret_cast<const char*>(wk) + W8_TILE_AHEAD;
        const uint8_t* ak = a + k / QUAD_STEPS * 2 * rows * 64;  // (split_bytes' layout)
        _tile_loadd(4, ak, 64);
        _tile_loadd(5, ak + rows * 64, 64);
        if (stream)
            for (int line = 0; line < 16; line++) {
                _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
                _mm_prefetch(ahead + W8_L2_AHEAD + line * 64, _MM_HINT_T1);
            }
        _tile_loadd(6, wk, 2 * 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbusd(2, 5, 6);
        if (stream)
            for (int line = 16; line < 32; line++) {
                _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
                _mm_prefetch(ahead + W8_L2_AHEAD + line * 64, _MM_HINT_T1);
            }
        _tile_loadd(7, wk + 64, 2 * 64);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, sums, 64);
    _tile_stored(1, sums + rows * 16, 64);
    _tile_stored(2, sums + 2 * rows * 16, 64);
    _tile_stored(3, sums + 3 * rows * 16, 64);
}

// The calling thread's share of y [M, N] = (256 hi + lo) . wq by the tiles, inside a parallel region (the rows'
// bytes hi and lo, M rows of K; block scales sx): the halves it claims; rows ROW_CHUNK at a time, so that a
// half's weights stay in L2 while a chunk's blocks of 16 rows pass over them, and a chunk of one block (decode)
// streams them.
void w8_tiles_product(const uint8_t* a, const float* sx, int64_t M, int64_t K, const Blocks& blocks, const int8_t* wq,
                      int64_t N, const float* scales, int64_t groups, const float* bias, float* y,
                      GroupClaims& claims) {
    alignas(64) int32_t sums[4 * AMX_ROWS * 16];
    int configured = 0;  // the rows the tiles are configured for (0: not yet)
    for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
        const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
        const bool stream = chunk <= AMX_ROWS;
        for (int64_t h; (h = claims.next(m0)) >= 0;) {
            const int8_t* w = wq + h * HALF * K;
            __m512 sw[2];
            for (int64_t b = 0; b < blocks.count; b++) {
                if (b % blocks.per_group == 0)
                    load_scales(scales, groups, h * HALF, b / blocks.per_group, sw, 2);
                const int64_t k0 = 2 * blocks.first_pair(b), k1 = 2 * blocks.end_pair(b);
                for (int64_t m = m0; m < m0 + chunk; m += AMX_ROWS) {
                    const int n = m0 + chunk - m < AMX_ROWS ? static_cast<int>(m0 + chunk - m) : AMX_ROWS;
                    if (n != configured) {
                        configure_tiles(n, 6);
                        configured = n;
                    }
                    w8_tiles_block(a + m * 2 * K, n, w, k0, k1, sums, stream);
                    const SumsStart start =
                        sums_start(bias ? bias + h * HALF : nullptr, b == 0, y + m * N + h * HALF, N);
                    for (int i = 0; i < n; i++) {
                        const __m512 row_scale = _mm512_set1_ps(sx[(m + i) * blocks.count + b]);
                        for (int j = 0; j < 2; j++) {
                            const __m512i hi_sums = _mm512_load_si512(sums + (j * n + i) * 16);
                            const __m512i lo_sums = _mm512_load_si512(sums + ((2 + j) * n + i) * 16);
                            store_scaled(_mm512_add_epi32(_mm512_slli_epi32(hi_sums, 8), lo_sums), row_scale, sw[j],
                                         start.from + i * start.stride + 16 * j, y + (m + i) * N + h * HALF + 16 * j);
                        }
                    }
                }
            }
        }
    }
    if (configured) _tile_release();
}

#endif  // ATB_AMX_INT8

}  // namespace

extern "C" {

// x: [M, K] with row stride ldx; wp: int8 [N / 64][K / 2][64][2]; scales: [N, groups], groups dividing K into an
// even number of columns each; bias: [N] or null; y: [M, N]. N must be a multiple of 64, K even.
void atb_w8a16_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* wp, int64_t N,
                          const float* scales, int64_t groups, const float* bias, float* y) {
    const Blocks blocks(K, groups);
    QuantizedRows& rows = quantized_rows(M, K, blocks.count, false);
    int16_t* const q = rows.q.data();
    float* const sx = rows.scales.data();
    GroupClaims claims(w8_units<false>(N), M, ROW_CHUNK);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row(x + m * ldx, blocks, q + m * K, sx + m * blocks.count);
        w8_vector_product<false>(q, sx, M, K, blocks, wp, N, scales, groups, bias, y, claims);
    }
}

// The same product as atb_w8a16_linear_f32, bit for bit, by the tiles (AMX-INT8), on weights in the tiles' layout
// wq [N / 64][2][K / 4][32][4] (kernels/w8a16.py's tile_layout), K and the scale groups' sizes multiples of 64: the
// same blocks, each block's int32 sums by the tiles (w8_tiles_block) for up to 16 rows at a time, scaled into y as
// there. The threads claim the halves (group_claims.h); rows go ROW_CHUNK at a time, so a half's weights stay in L2
// while a chunk's blocks of 16 rows pass over them, and a chunk of one block (decode) streams them. Where this build
// or the process has no tiles (atb_w8a16_tiles_available: kernels/w8a16.py packs for them only then), y is NaN.
void atb_w8a16_tiles_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* wq, int64_t N,
                                const float* scales, int64_t groups, const float* bias, float* y) {
#ifdef ATB_AMX_INT8
    if (tiles_permitted()) {
        const Blocks blocks(K, groups);
        QuantizedRows& rows = quantized_rows(M, K, blocks.count, M > W8_VECTOR_ROWS);
        int16_t* const q = rows.q.data();
        uint8_t* const a = rows.tiles.data();
        float* const sx = rows.scales.data();
        // (the units: the vector product's, or the tiles' halves of 32 columns, HALF)
        GroupClaims claims(M <= W8_VECTOR_ROWS ? w8_units<true>(N) : N / HALF, M, ROW_CHUNK);
#pragma omp parallel
        {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) {
                quantize_row(x + m * ldx, blocks, q + m * K, sx + m * blocks.count);
                if (M > W8_VECTOR_ROWS) {  // (into the bytes of m's block of 16 rows, each block 2 K bytes a row)
                    const int64_t block = m - m % AMX_ROWS;
                    const int rows = M - block < AMX_ROWS ? static_cast<int>(M - block) : static_cast<int>(AMX_ROWS);
                    split_bytes(q + m * K, K, a + block * 2 * K, rows, static_cast<int>(m % AMX_ROWS));
                }
            }
            if (M <= W8_VECTOR_ROWS)
                w8_vector_product<true>(q, sx, M, K, blocks, wq, N, scales, groups, bias, y, claims);
            else
                w8_tiles_product(a, sx, M, K, blocks, wq, N, scales, groups, bias, y, claims);
        }
        return;
    }
#endif
    for (int64_t i = 0; i < M * N; i++) y[i] = NAN;
}

// Whether atb_w8a16_tiles_linear_f32 runs here: this build has AMX-INT8 and the process may use the tiles.
int64_t atb_w8a16_tiles_available() {
#ifdef ATB_AMX_INT8
    return tiles_permitted() ? 1 : 0;
#else
    return 0;
#endif
}

}  // extern "C"
