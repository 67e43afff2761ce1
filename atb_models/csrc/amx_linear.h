// Products of bfloat16 weights by AMX tiles (TDPBF16PS), where the compiler targets AMX-BF16 (kernels/native.py adds
// -mamx-tile -mamx-bf16 where /proc/cpuinfo reports amx_bf16) and Linux lets the process use the tiles: a bfloat16
// model's, and a float32 model's whose weights hold bfloat16 values (a bfloat16 checkpoint computed in float32), its
// float32 inputs split exactly in three bfloat16 parts (split_in_three, amx_linear).
//
// The packed layout wp[N / 64][K / 2][64][2] (bf16_linear.h) is already what a tile multiplies: a B tile is 16 pairs
// of k-steps (rows) by 16 columns' pairs (64 bytes), and pair p's 16 columns q..q+15 of a group lie 256 bytes after
// pair p - 1's, so the tile loads straight from the weights with a 256-byte stride. An A tile is 16 rows' 32 k-steps
// of bfloat16 inputs (64 bytes a row, the rows' own stride; a float32 model's parts 64 bytes apart, as split_in_three
// lays them out). One TDPBF16PS adds a 16 x 16 block of sums' products of 32 k-steps: 8,192 multiply-adds, where
// vdpbf16ps does 32.
//
// The tiles add a pair's products in their own way (measured on the kit's first AMX CPU: neither of vdpbf16ps's
// orders nor one rounding a pair), so their sums are not the dot product's. A row's sums must not depend on its
// batch (what it was batched with, how much of its prompt the prefix cache held), so where the tiles are on
// (atb_bf16_use_amx: kernels/linear.py's bf16_amx_chosen) every product of a bfloat16 model runs on them, at any
// row count, decode's single rows included: a tile's rows are multiplied apart, each row's sums the same in any
// tile, from the bias on, 32 k-steps after 32 k-steps. Decode's few rows take tiles of as many rows. The same holds
// for a float32 model's products (atb_f32_use_amx: f32_amx_chosen), whose sums are then not k order's: each 32
// k-steps' products of the input's three parts are added in turn (hi's, mid's, lo's) into the row's one set of sums.
//
// Work: the threads claim the column groups (group_claims.h); for each, its rows in blocks of 16 (ROW_CHUNK rows at a
// time, so the group's weights stay in L2 over a chunk's blocks): four C tiles hold the block's 16 x 64 sums over
// the whole of K, one A tile the rows' next 32 k-steps, two B tiles the four column quarters' weights in turn (a
// float32 model's: three A tiles, one a part, and one B tile).

#pragma once

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"
#include "panel_linear.h"

// ATB_AMX_BF16 where this build multiplies bfloat16 on tiles, ATB_AMX_INT8 where int8 too: the compiler targets
// AMX-BF16 (and AMX-INT8), or a test build emulates the tiles (amx_emulated.h).
#if defined(ATB_AMX_EMULATED)
#include "amx_emulated.h"
#define ATB_AMX_BF16 1
#define ATB_AMX_INT8 1
#elif defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define ATB_AMX_BF16 1
#if defined(__AMX_INT8__)
#define ATB_AMX_INT8 1
#endif
#endif

namespace {

constexpr int64_t AMX_ROWS = 16;   // rows of an A and a C tile
constexpr int64_t AMX_STEPS = 32;  // k-steps an A tile holds (16 pairs: a B tile's rows)

#ifdef ATB_AMX_BF16

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
#ifdef ATB_AMX_EMULATED
    return true;  // (no state to ask for)
#else
    constexpr long REQUEST_PERMISSION = 0x1023, TILE_DATA = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    static const bool permitted = syscall(SYS_arch_prctl, REQUEST_PERMISSION, TILE_DATA) == 0;
    return permitted;
#endif
}

// Tiles 0 .. row_tiles - 1 hold `rows` rows of 64 bytes (a block's sums, 16 columns of float32 each, in tiles 0-3,
// then the rows' inputs), the rest 16 pairs of k-steps of weights: amx_group_block's 5 (one input tile; weights in
// 5 and 6), amx_group_in_three's 7 (three input tiles; weights in 7). Decode's single row is not padded to 16.
void configure_tiles(int rows, int row_tiles) {
    TileConfig config;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = t < row_tiles ? rows : AMX_ROWS;
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

// A block's sums in tiles 0-3, 16 columns each: loaded from start[rows][64], stored to sums[rows][64].
inline void load_sum_tiles(const float* start) {
    _tile_loadd(0, start, GROUP * 4);
    _tile_loadd(1, start + 16, GROUP * 4);
    _tile_loadd(2, start + 32, GROUP * 4);
    _tile_loadd(3, start + 48, GROUP * 4);
}

inline void store_sum_tiles(float* sums) {
    _tile_stored(0, sums, GROUP * 4);
    _tile_stored(1, sums + 16, GROUP * 4);
    _tile_stored(2, sums + 32, GROUP * 4);
    _tile_stored(3, sums + 48, GROUP * 4);
}

// sums[rows][64] (row stride 64) = start[rows][64] + x[rows][K] (bfloat16, row stride ldx) . the group's weights
// w[K / 2][64][2], 32 k-steps at a time, on tiles configured for the rows (prefetching the stream where `stream`).
// K a multiple of 32.
void amx_group_block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, const float* start, float* sums,
                     bool stream) {
    load_sum_tiles(start);
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
    store_sum_tiles(sums);
}

// A float32 model's rows (amx_linear with parts == 3), each input split in three bfloat16 parts: sums[rows][64]
// (row stride 64) = start + hi . w + mid . w + lo . w, all three parts' products added into the same sums, 32 k-steps
// at a time (hi's, then mid's, then lo's), from the weights w[K / 2][64][2] streamed past once. `at` holds the rows'
// parts as the tiles load them: for each 32 k-steps, hi's `rows` rows of 64 bytes, then mid's, then lo's
// (split_in_three's `step` layout), so a k-step's three input tiles are 3 x rows consecutive lines.
//
// The stream's prefetches go out a quarter (16 lines) before each weight tile's load, not all 64 at the k-step's
// start: this CPU's tiles take their loads and products in order, and a burst of 64 prefetches, each waiting for a
// fill buffer, held the tile work queued behind it (a streamed 4 KB of weights with 3 input tiles and 12 products
// read 8.2-9.1 GB/s a core in a bare loop, 12.1-12.7 with the prefetches spread; docs/PERFORMANCE.md).
void amx_group_in_three(const uint16_t* at, int rows, const uint16_t* w, int64_t K, const float* start, float* sums,
                        bool stream) {
    load_sum_tiles(start);
    const int64_t step = 3 * rows * AMX_STEPS;  // (bfloat16 values a k-step's three input tiles hold)
    for (int64_t k = 0; k < K; k += AMX_STEPS) {
        const uint16_t* wk = w + k * GROUP;
        const uint16_t* a = at + k / AMX_STEPS * step;
        const char* ahead = reinterpret_cast<const char*>(wk) + AMX_AHEAD;
        _tile_loadd(4, a, 64);
        _tile_loadd(5, a + rows * AMX_STEPS, 64);
        _tile_loadd(6, a + 2 * rows * AMX_STEPS, 64);
// Column quarter q's weights (tile 7) times hi, mid and lo, into the quarter's sums (tile q), the quarter's 16
// lines of the 32 k-steps AMX_AHEAD bytes on prefetched first. (A macro: a tile's number must be a literal.)
#define ATB_QUARTER_IN_THREE(q)                                                                           \
    if (stream)                                                                                           \
        for (int line = 0; line < 16; line++) _mm_prefetch(ahead + (q) * 1024 + line * 64, _MM_HINT_T0);  \
    _tile_loadd(7, wk + 32 * (q), GROUP * 4);                                                             \
    _tile_dpbf16ps(q, 4, 7);                                                                              \
    _tile_dpbf16ps(q, 5, 7);                                                                              \
    _tile_dpbf16ps(q, 6, 7);
        ATB_QUARTER_IN_THREE(0)
        ATB_QUARTER_IN_THREE(1)
        ATB_QUARTER_IN_THREE(2)
        ATB_QUARTER_IN_THREE(3)
#undef ATB_QUARTER_IN_THREE
    }
    store_sum_tiles(sums);
}

// x[0:n] (float32) = hi + mid + lo, three bfloat16 values each, exactly: hi keeps a value's top 8 bits of
// significand (truncated), mid the next 8 of what is left, lo the last 8 (the remainders are exact float32
// subtractions). Where a float32 model's weights hold bfloat16 values, each of the three products is exact too, so
// the tiles' sums of the three are a float32 product's on the input as it is (only added in another order). An
// infinity is its own hi, with no remainder (inf - inf would make the others NaN); a NaN stays a NaN. Parts below
// float32's normal range (of inputs under about 2^-103) are flushed to zero by the tiles. Each part's values
// i .. i + 31 (i a multiple of 32) go to part + i / 32 * step: the layout amx_group_in_three loads its tiles from.
inline void split_in_three(const float* x, int64_t n, uint16_t* hi, uint16_t* mid, uint16_t* lo, int64_t step) {
    const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    constexpr int INFINITIES = 0x08 | 0x10;  // vfpclassps: +inf, -inf
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __m512 h = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), top));
        const __m512 r = _mm512_maskz_sub_ps(~_mm512_fpclass_ps_mask(v, INFINITIES), v, h);
        const __m512 m = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), top));
        const __m512 l = _mm512_sub_ps(r, m);
        const int64_t at = i / AMX_STEPS * step + i % AMX_STEPS;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + at),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(h), 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(mid + at),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(m), 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + at),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(l), 16)));
    }
    for (; i < n; i++) {
        const int64_t at = i / AMX_STEPS * step + i % AMX_STEPS;
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        hi[at] = static_cast<uint16_t>(bits >> 16);
        const float r = (bits & 0x7fffffffu) == 0x7f800000u ? 0.0f : x[i] - bf16_to_float(hi[at]);
        memcpy(&bits, &r, sizeof bits);
        mid[at] = static_cast<uint16_t>(bits >> 16);
        const float l = r - bf16_to_float(mid[at]);
        memcpy(&bits, &l, sizeof bits);
        lo[at] = static_cast<uint16_t>(bits >> 16);
    }
}

// y = x W^T + bias by the tiles, for the entries of bf16_linear.h: x as float32 (x32; rows ldx apart) or bfloat16
// (x16, read where they lie); y as float32 (y32) or bfloat16 (y16, rounded to nearest even), rows N apart.
// With parts == 1, x32 holds bfloat16 values (a bfloat16 model's decode step), converted ROW_CHUNK rows at a time for
// the threads to share. With parts == 3 (a float32 model's products of bfloat16 weights), each row of x32 is split
// in three (split_in_three), laid out for the tiles a block of up to 16 rows at a time, and amx_group_in_three adds
// the three parts' products into one set of sums: one pass over the weights at any row count, each row's sums
// the same in any block (tiles multiply a row apart from the others).
void amx_linear(const float* x32, const uint16_t* x16, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp,
                int64_t N, const float* bias, float* y32, uint16_t* y16, int parts = 1) {
    const int64_t column_groups = N / GROUP;
    const int64_t chunk_rows = M < ROW_CHUNK ? M : ROW_CHUNK;
    // (parts == 3: blocks of 16 rows' parts, the last block's as many rows as it has)
    uint16_t* converted = conversion_buffer(x32, parts * chunk_rows, K);
    GroupClaims claims(column_groups, M, ROW_CHUNK);  // each chunk's groups (group_claims.h)
#pragma omp parallel
    {
        alignas(64) float start[AMX_ROWS * GROUP], sums[AMX_ROWS * GROUP];
        int configured = 0;  // the tiles' configuration in this call: rows x 8 + row tiles (0: none yet)
        auto configure = [&](int rows, int row_tiles) {
            if (rows * 8 + row_tiles != configured) {
                configure_tiles(rows, row_tiles);
                configured = rows * 8 + row_tiles;
            }
        };
        for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
            const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            int64_t ldxb = K;
            const uint16_t* xb;
            if (parts == 3) {
#pragma omp for
                for (int64_t m = 0; m < chunk; m++) {
                    const int64_t block = m - m % AMX_ROWS, r = m % AMX_ROWS;
                    const int64_t rows = chunk - block < AMX_ROWS ? chunk - block : AMX_ROWS;
                    uint16_t* at = converted + block * 3 * K;
                    split_in_three(x32 + (m0 + m) * ldx, K, at + r * AMX_STEPS, at + (rows + r) * AMX_STEPS,
                                   at + (2 * rows + r) * AMX_STEPS, 3 * rows * AMX_STEPS);
                }
                xb = converted;
            } else {
                xb = chunk_in_bf16(x32, x16, m0, chunk, ldx, K, converted, ldxb);
            }
            for (int64_t g; (g = claims.next(m0)) >= 0;) {
                const uint16_t* w = wp + g * K * GROUP;
                const int64_t tile_rows = chunk < AMX_ROWS ? chunk : AMX_ROWS;  // (the rows a block's tiles load)
                for (int64_t r = 0; r < tile_rows; r++)
                    for (int64_t c = 0; c < GROUP; c++) start[r * GROUP + c] = bias ? bias[g * GROUP + c] : 0.0f;
                for (int64_t m = 0; m < chunk; m += AMX_ROWS) {
                    const int rows = chunk - m < AMX_ROWS ? static_cast<int>(chunk - m) : AMX_ROWS;
                    // a chunk of one block streams the group's weights past; more blocks find them in L2
                    const bool stream = chunk <= AMX_ROWS;
                    if (parts == 1) {
                        configure(rows, 5);
                        amx_group_block(xb + m * ldxb, ldxb, w, K, start, sums, stream);
                    } else {
                        configure(rows, 7);
                        amx_group_in_three(xb + m * 3 * K, rows, w, K, start, sums, stream);
                    }
                    for (int64_t r = 0; r < rows; r++) {
                        const int64_t at = (m0 + m + r) * N + g * GROUP;
                        if (y16 != nullptr) {
                            store_bf16(sums + r * GROUP, GROUP, y16 + at);
                        } else {
                            for (int64_t c = 0; c < GROUP; c++) y32[at + c] = sums[r * GROUP + c];
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

#endif  // ATB_AMX_BF16

// Whether a bfloat16 model's products run on the tiles: off until atb_bf16_use_amx turns it on (kernels/linear.py).
int64_t bf16_amx_on = 0;
// Whether a float32 model's products of bfloat16 weights (atb_bf16_linear_f32, K a multiple of 32: every row count)
// run on the tiles in three parts: off until atb_f32_use_amx turns it on (kernels/linear.py's f32_amx_chosen).
int64_t f32_amx_on = 0;

}  // namespace

extern "C" {

// Whether this build has AMX-BF16 and the process may use the tiles.
int64_t atb_bf16_amx_available() {
#ifdef ATB_AMX_BF16
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
