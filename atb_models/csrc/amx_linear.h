// Products of bfloat16 weights by AMX tiles (TDPBF16PS), where the compiler targets AMX-BF16 (kernels/native.py adds
// -mamx-tile -mamx-bf16 where /proc/cpuinfo reports amx_bf16) and Linux lets the process use the tiles: a bfloat16
// model's, and a float32 model's whose weights hold bfloat16 values (a bfloat16 checkpoint computed in float32), its
// float32 inputs split exactly in three bfloat16 parts (split_in_three, amx_linear).
//
// The packed layout wp[N / 64][K / 2][64][2] (bf16_linear.h) is already what a tile multiplies: a B tile is 16 pairs
// of k-steps (rows) by 16 columns' pairs (64 bytes), and pair p's 16 columns q..q+15 of a group lie 256 bytes after
// pair p - 1's, so the tile loads straight from the weights with a 256-byte stride. An A tile is 16 rows' 32 k-steps
// of bfloat16 inputs (64 bytes a row, the rows' own stride). One TDPBF16PS adds a 16 x 16 block of sums' products of
// 32 k-steps: 8,192 multiply-adds, where vdpbf16ps does 32.
//
// The tiles add a pair's products in their own way (measured on the kit's first AMX CPU: neither of vdpbf16ps's
// orders nor one rounding a pair), so their sums are not the dot product's. A row's sums must not depend on its
// batch (what it was batched with, how much of its prompt the prefix cache held), so where the tiles are on
// (atb_bf16_use_amx: kernels/linear.py's bf16_amx_chosen) every product of a bfloat16 model runs on them, at any
// row count, decode's single rows included: a tile's rows are multiplied apart, each row's sums the same in any
// tile, from the bias on, 32 k-steps after 32 k-steps. Decode's few rows take tiles of as many rows. The same holds
// for a float32 model's products (atb_f32_use_amx: f32_amx_chosen), whose sums are then not k order's.
//
// Work: each thread takes a share of the column groups; for each, its rows in blocks of 16 (ROW_CHUNK rows at a
// time, so the group's weights stay in L2 over a chunk's blocks): four C tiles hold the block's 16 x 64 sums over
// the whole of K, one A tile the rows' next 32 k-steps, two B tiles the four column quarters' weights in turn.

#pragma once

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"
#include "panel_linear.h"

namespace {

constexpr int64_t AMX_ROWS = 16;   // rows of an A and a C tile
constexpr int64_t AMX_STEPS = 32;  // k-steps an A tile holds (16 pairs: a B tile's rows)

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

// What LDTILECFG reads: palette 1, each tile's rows and bytes a row.
struct TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
};

// Linux hands a process the tiles' 8 KB of state only when asked (arch_prctl, kernel 5.16 on); once a process.
bool tiles_permitted() {
    constexpr long REQUEST_PERMISSION = 0x1023, TILE_DATA = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    static const bool permitted = syscall(SYS_arch_prctl, REQUEST_PERMISSION, TILE_DATA) == 0;
    return permitted;
}

// Tiles 0-3: a block's sums (`rows` rows x 16 columns of float32 each); 4: the rows' inputs; 5, 6: weights (16
// pairs of k-steps). A tile of fewer rows takes that much less time: decode's single row is not padded to 16.
void configure_tiles(int rows) {
    TileConfig config;
    for (int t = 0; t < 7; t++) {
        config.rows[t] = t < 5 ? rows : AMX_ROWS;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

// Where a group's rows are one block (up to 16 rows: decode), which streams its weights from memory past the tiles,
// the 64 lines of the 32 k-steps AMX_AHEAD bytes on are prefetched: a tile load takes its 16 lines 256 bytes apart,
// which the hardware prefetchers alone follow too slowly (one row, the 24 layers' linears of cpu-small: 1.12 times
// the widening kernel's time without, 1.03 with; into L2 or past the caches was slower, as were 4 and 32 KB;
// docs/PERFORMANCE.md). More rows' blocks find the weights in L2, where the prefetches only cost (64 rows: 1.13x).
constexpr int64_t AMX_AHEAD = 8192;

// sums[rows][64] (row stride 64) = start[rows][64] + x[rows][K] (bfloat16, row stride ldx) . the group's weights
// w[K / 2][64][2], 32 k-steps at a time, on tiles configured for the rows (prefetching the stream where `stream`).
// K a multiple of 32.
void amx_group_block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, const float* start, float* sums,
                     bool stream) {
    _tile_loadd(0, start, GROUP * 4);
    _tile_loadd(1, start + 16, GROUP * 4);
    _tile_loadd(2, start + 32, GROUP * 4);
    _tile_loadd(3, start + 48, GROUP * 4);
    for (int64_t k = 0; k < K; k += AMX_STEPS) {
        const uint16_t* wk = w + k * GROUP;  // pair k / 2's lanes: 64 columns x 2 = 128 values, 256 bytes a pair
        if (stream) {
            const char* ahead = reinterpret_cast<const char*>(wk) + AMX_AHEAD;
            for (int line = 0; line < 64; line++) _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
        }
        _tile_loadd(4, x + k, ldx * 2);
        _tile_loadd(5, wk, GROUP * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, wk + 32, GROUP * 4);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, wk + 64, GROUP * 4);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, wk + 96, GROUP * 4);
        _tile_dpbf16ps(3, 4, 6);
    }
    _tile_stored(0, sums, GROUP * 4);
    _tile_stored(1, sums + 16, GROUP * 4);
    _tile_stored(2, sums + 32, GROUP * 4);
    _tile_stored(3, sums + 48, GROUP * 4);
}

// x[0:n] (float32) = hi + mid + lo, three bfloat16 values each, exactly: hi keeps a value's top 8 bits of
// significand (truncated), mid the next 8 of what is left, lo the last 8 (the remainders are exact float32
// subtractions). Where a float32 model's weights hold bfloat16 values, each of the three products is exact too, so
// the tiles' three sums are a float32 product's on the input as it is (only added in another order). An infinity is
// its own hi, with no remainder (inf - inf would make the others NaN); a NaN stays a NaN. Parts below float32's
// normal range (of inputs under about 2^-103) are flushed to zero by the tiles.
inline void split_in_three(const float* x, int64_t n, uint16_t* hi, uint16_t* mid, uint16_t* lo) {
    const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    constexpr int INFINITIES = 0x08 | 0x10;  // vfpclassps: +inf, -inf
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __m512 h = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), top));
        const __m512 r = _mm512_maskz_sub_ps(~_mm512_fpclass_ps_mask(v, INFINITIES), v, h);
        const __m512 m = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), top));
        const __m512 l = _mm512_sub_ps(r, m);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + i),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(h), 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(mid + i),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(m), 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + i),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(l), 16)));
    }
    for (; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        hi[i] = static_cast<uint16_t>(bits >> 16);
        const float r = (bits & 0x7fffffffu) == 0x7f800000u ? 0.0f : x[i] - bf16_to_float(hi[i]);
        memcpy(&bits, &r, sizeof bits);
        mid[i] = static_cast<uint16_t>(bits >> 16);
        const float l = r - bf16_to_float(mid[i]);
        memcpy(&bits, &l, sizeof bits);
        lo[i] = static_cast<uint16_t>(bits >> 16);
    }
}

// y = x W^T + bias by the tiles, for the entries of bf16_linear.h: x as float32 (x32; rows ldx apart) or bfloat16
// (x16, read where they lie); y as float32 (y32) or bfloat16 (y16, rounded to nearest even), rows N apart.
// With parts == 1, x32 holds bfloat16 values (a bfloat16 model's decode step), converted ROW_CHUNK rows at a time for
// the threads to share. With parts == 3 (a float32 model's products of bfloat16 weights), each row of x32 is split
// in three (split_in_three) and each part multiplied on the tiles apart: the row's sums are hi's (from the bias on)
// + (mid's + lo's). A chunk of up to 5 rows (decode) takes its 3 x rows parts in one block of tiles, as many rows as a
// bfloat16 model's 16 would take; more rows take three blocks of up to 16, one a part, one after another over the
// group's weights (the later two find them in L2). Tiles multiply a row apart from the others in the block, so a
// row's three sums are the same either way.
void amx_linear(const float* x32, const uint16_t* x16, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp,
                int64_t N, const float* bias, float* y32, uint16_t* y16, int parts = 1) {
    const int64_t column_groups = N / GROUP;
    const int64_t chunk_rows = M < ROW_CHUNK ? M : ROW_CHUNK;
    uint16_t* converted = conversion_buffer(x32, parts * chunk_rows, K);
#pragma omp parallel
    {
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t first = column_groups * thread / threads, end = column_groups * (thread + 1) / threads;
        alignas(64) float start[AMX_ROWS * GROUP], zeros[AMX_ROWS * GROUP] = {}, sums[3][AMX_ROWS * GROUP];
        int configured = 0;  // the rows the tiles are configured for (0: not yet, in this call)
        auto block = [&](const uint16_t* x, int64_t ldxb, const uint16_t* w, int rows, const float* from, float* to,
                         bool stream) {
            if (rows != configured) {
                configure_tiles(rows);
                configured = rows;
            }
            amx_group_block(x, ldxb, w, K, from, to, stream);
        };
        for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
            const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            int64_t ldxb = K;
            const uint16_t* xb;
            if (parts == 3) {
#pragma omp for
                for (int64_t m = 0; m < chunk; m++)
                    split_in_three(x32 + (m0 + m) * ldx, K, converted + m * K, converted + (chunk + m) * K,
                                   converted + (2 * chunk + m) * K);
                xb = converted;
            } else {
                xb = chunk_in_bf16(x32, x16, m0, chunk, ldx, K, converted, ldxb);
            }
            // parts == 3 in one block: rows 0 .. chunk - 1 of the tiles are hi's (from the bias), the rest mid's and
            // lo's (from zero)
            const bool one_block = parts == 3 && 3 * chunk <= AMX_ROWS;
            for (int64_t g = first; g < end; g++) {
                const uint16_t* w = wp + g * K * GROUP;
                const int64_t biased = one_block ? chunk : (chunk < AMX_ROWS ? chunk : AMX_ROWS);
                const int64_t tile_rows = one_block ? 3 * chunk : biased;  // (the rows a block's tiles load)
                for (int64_t r = 0; r < tile_rows; r++)
                    for (int64_t c = 0; c < GROUP; c++)
                        start[r * GROUP + c] = r < biased && bias ? bias[g * GROUP + c] : 0.0f;
                for (int64_t m = 0; m < chunk; m += AMX_ROWS) {
                    const int rows = chunk - m < AMX_ROWS ? static_cast<int>(chunk - m) : AMX_ROWS;
                    const float* row_sums[3];
                    if (parts == 1) {
                        block(xb + m * ldxb, ldxb, w, rows, start, sums[0], chunk <= AMX_ROWS);
                        row_sums[0] = sums[0];
                    } else if (one_block) {
                        block(xb, K, w, 3 * rows, start, sums[0], true);
                        for (int p = 0; p < 3; p++) row_sums[p] = sums[0] + p * rows * GROUP;
                    } else {
                        for (int p = 0; p < 3; p++) {
                            block(xb + (p * chunk + m) * K, K, w, rows, p == 0 ? start : zeros, sums[p],
                                  p == 0 && chunk <= AMX_ROWS);
                            row_sums[p] = sums[p];
                        }
                    }
                    for (int64_t r = 0; r < rows; r++) {
                        alignas(64) float combined[GROUP];
                        const float* row = row_sums[0] + r * GROUP;
                        if (parts == 3) {
                            for (int64_t c = 0; c < GROUP; c++)
                                combined[c] = row[c] + (row_sums[1][r * GROUP + c] + row_sums[2][r * GROUP + c]);
                            row = combined;
                        }
                        const int64_t at = (m0 + m + r) * N + g * GROUP;
                        if (y16 != nullptr) {
                            store_bf16(row, GROUP, y16 + at);
                        } else {
                            for (int64_t c = 0; c < GROUP; c++) y32[at + c] = row[c];
                        }
                    }
                }
            }
            if (x16 == nullptr) {
#pragma omp barrier
                // (every thread is done with this chunk's rows before the next chunk overwrites them)
            }
        }
        if (configured) _tile_release();
    }
}

#endif  // __AMX_TILE__ && __AMX_BF16__

// Whether a bfloat16 model's products run on the tiles: off until atb_bf16_use_amx turns it on (kernels/linear.py).
int64_t bf16_amx_on = 0;
// Whether a float32 model's products of bfloat16 weights (atb_bf16_linear_f32, K a multiple of 32: every row count)
// run on the tiles in three parts: off until atb_f32_use_amx turns it on (kernels/linear.py's f32_amx_chosen).
int64_t f32_amx_on = 0;

}  // namespace

extern "C" {

// Whether this build has AMX-BF16 and the process may use the tiles.
int64_t atb_bf16_amx_available() {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    return tiles_permitted() ? 1 : 0;
#else
    return 0;
#endif
}

// Turns the tiles on (1) or off (0) for a bfloat16 model's products (atb_bf16_dot_linear_f32 and _bf16, whose K is
// a multiple of 32: every row count), where they are available (a negative `on` changes nothing); returns whether
// they are on.
int64_t atb_bf16_use_amx(int64_t on) { return set_switch(bf16_amx_on, on, atb_bf16_amx_available()); }

// The same for a float32 model's products of bfloat16 weights (atb_bf16_linear_f32), each input split in three
// bfloat16 parts (amx_linear).
int64_t atb_f32_use_amx(int64_t on) { return set_switch(f32_amx_on, on, atb_bf16_amx_available()); }

}  // extern "C"
