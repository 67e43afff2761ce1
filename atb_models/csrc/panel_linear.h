// y = x W^T + b in float32 for the CPU's decode row counts (1 to a few dozen rows), AVX-512.
//
// W is packed once at load in groups of 64 output columns: wp[N / 64][K][64]. A k-step of a group is 256 bytes (four
// 64-byte lines, four zmm registers), and a thread's groups lie one after another, so each thread reads its share of
// the weights as one sequential stream. On this kit's VM one stream per core reads 41-46 GB/s where three or four
// interleaved streams (the earlier layout of 16-column panels) read 31-35 GB/s (docs/PERFORMANCE.md).
//
// A register block keeps up to 6 rows x 4 zmm of accumulators (24 of the 32 registers) and broadcasts one x value per
// row per k-step, so each broadcast feeds four fused multiply-adds. K is cut into blocks that stay in L1 (128 k-steps
// x 256 B = 32 KB) while every chunk of up to 6 rows passes over them; the weights are read from memory once whatever
// the row count.
//
// At 16 rows a decode step is about as much arithmetic as memory traffic, so the memory stream must run while the
// multiply-adds do: every pass over a block prefetches its share of the next block (the next 32 KB of the same
// stream). With a single pass (6 rows or fewer) the prefetch runs a fixed distance ahead instead, where
// stream_prefetch_on says so (below).
//
// Threads: OpenMP, through the libgomp PyTorch has already loaded, so the kernel shares torch's thread count and
// pool; the groups are shared out as group_claims.h says. Compiled into cpu_kernels.cpp's library; chosen by
// atb_models/kernels/linear.py.

#pragma once

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "group_claims.h"

namespace {

constexpr int64_t GROUP = 64;          // output columns per group (kernels/linear.py PANEL_GROUP)
constexpr int64_t LINES = GROUP / 16;  // 64-byte lines per k-step of a group
constexpr int64_t K_BLOCK = 128;       // k-steps per block: 32 KB of weights, inside L1
constexpr int MAX_ROWS = 6;            // rows per register block
constexpr int64_t ROW_CHUNK = 256;     // rows per pass over the weights (prefill)
constexpr int64_t AHEAD = 16;          // single pass: prefetch this many k-steps ahead

// Whether a single pass over the weights (decode's few rows: this kernel's, bf16_linear.h's and w8a16_linear.h's)
// prefetches its stream in software (1) or leaves it to the hardware prefetchers (0). Which is faster is not a CPU
// flag: on this kit's AMD EPYC (Zen 4) the 24 layers of a decode step at batch 1 took 0.90-0.94 of the time without
// (float32, bfloat16 and int8 weights), where the kernels were written with them on an Intel Xeon. Python measures
// it once a process (kernels/linear.py's stream_prefetch_chosen) and sets it with atb_use_stream_prefetch.
int64_t stream_prefetch_on = 1;

// A process-wide switch of the library's (Python's choice, made once): set to whether `on`, where `on` is not
// negative and the build can (`able`); its value.
inline int64_t set_switch(int64_t& value, int64_t on, bool able = true) {
    if (on >= 0) value = on != 0 && able;
    return value;
}

alignas(64) constexpr float NO_BIAS[GROUP] = {};  // a group's sums start from these where there is no bias

// Where a block's sums of 64 columns start: the bias (or zero) on a group's first K block, the sums so far in y (rows
// ldy apart) on the later ones; row i's at from + i * stride. One place for every sum: with a choice per sum, GCC 12
// kept all of a register block's sums in memory around its loop and copied them into registers and back on every
// call (100-140 instructions more a call for 6 rows; docs/PERFORMANCE.md).
struct SumsStart {
    const float* from;
    int64_t stride;
};

inline SumsStart sums_start(const float* bias, bool first, const float* y, int64_t ldy) {
    return {first ? (bias ? bias : NO_BIAS) : y, first ? 0 : ldy};
}

// A register block's sums of MR rows x 64 columns to start from (sums_start), and their store.
template <int MR>
inline void start_sums(__m512 (&acc)[MR][4], const float* bias, bool first, const float* y, int64_t ldy) {
    const SumsStart start = sums_start(bias, first, y, ldy);
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_loadu_ps(start.from + i * start.stride + 16 * j);
}

template <int MR>
inline void store_sums(const __m512 (&acc)[MR][4], float* y, int64_t ldy) {
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(y + i * ldy + 16 * j, acc[i][j]);
}

// acc[MR][4] (+)= x[MR rows, k0:k1] * w[k0:k1][64], then stored to y (k0 < k1: a loop that might run no times made
// GCC 12 keep the sums in memory around it, as sums_start says). While it runs, prefetch `share` lines from `pf` on,
// spread evenly over the k-steps. SWAP_PAIRS (k0 even): w's step k multiplies x's step k ^ 1, for weights whose
// pairs of k-steps were stored swapped so that each pair is added in vdpbf16ps's order (bf16_linear.h).
template <int MR, bool SWAP_PAIRS = false>
void register_block(const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, const float* bias,
                    bool first, float* y, int64_t ldy, const float* pf, int64_t share) {
    __m512 acc[MR][4];
    start_sums(acc, bias, first, y, ldy);
    const int64_t len = k1 - k0;
    const char* line = reinterpret_cast<const char*>(pf);
    int64_t owed = 0;  // share / len lines per k-step, kept in whole lines by counting in units of 1 / len
    int64_t k = k0;
    do {
        const float* wk = w + k * GROUP;
        const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16), w2 = _mm512_loadu_ps(wk + 32),
                     w3 = _mm512_loadu_ps(wk + 48);
        for (owed += share; owed >= len; owed -= len, line += 64) _mm_prefetch(line, _MM_HINT_T0);
        for (int i = 0; i < MR; i++) {
            const __m512 b = _mm512_set1_ps(x[i * ldx + (SWAP_PAIRS ? k ^ 1 : k)]);
            acc[i][0] = _mm512_fmadd_ps(w0, b, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(w1, b, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(w2, b, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(w3, b, acc[i][3]);
        }
    } while (++k < k1);
    store_sums(acc, y, ldy);
}

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const float*, bool, float*, int64_t,
                         const float*, int64_t);

template <bool SWAP_PAIRS = false>
BlockFn block_for(int rows) {
    switch (rows) {
        case 1: return register_block<1, SWAP_PAIRS>;
        case 2: return register_block<2, SWAP_PAIRS>;
        case 3: return register_block<3, SWAP_PAIRS>;
        case 4: return register_block<4, SWAP_PAIRS>;
        case 5: return register_block<5, SWAP_PAIRS>;
        default: return register_block<6, SWAP_PAIRS>;
    }
}

}  // namespace

extern "C" {

// Turns single-pass prefetching on (1) or off (0) for every kernel (a negative `on` changes nothing); returns
// whether it is on.
int64_t atb_use_stream_prefetch(int64_t on) { return set_switch(stream_prefetch_on, on); }

// Evicts bytes from p on from every cache level (clflush), so that the next read of them comes from memory: how
// Python times a kernel as a decode step meets its weights (kernels/linear.py's _time_bf16_widening).
void atb_evict_from_caches(const void* p, int64_t bytes) {
    const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
    for (uintptr_t line = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63}; line < end; line += 64)
        _mm_clflush(reinterpret_cast<const void*>(line));
    _mm_mfence();
}

// x: [M, K] with row stride ldx; wp: [N / 64][K][64]; bias: [N] or null; y: [M, N].
// N must be a multiple of 64.
void atb_panel_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* wp, int64_t N,
                          const float* bias, float* y) {
    const int64_t groups = N / GROUP;
    // Prefill's many rows go in chunks small enough to stay in L2 while every group passes over them.
    GroupClaims claims(groups, M, ROW_CHUNK);
#pragma omp parallel
    {
        for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
            const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            const int64_t passes = (chunk + MAX_ROWS - 1) / MAX_ROWS;
            // One pass needs no K blocks: nothing else reads the weights again.
            const int64_t k_block = passes == 1 ? K : K_BLOCK;
            for (int64_t g; (g = claims.next(m0)) >= 0;) {
                const float* w = wp + g * K * GROUP;
                for (int64_t k0 = 0; k0 < K; k0 += k_block) {
                    const int64_t k1 = K - k0 < k_block ? K : k0 + k_block;
                    const int64_t lines = (k1 - k0) * LINES;
                    for (int64_t m = m0, pass = 0; m < m0 + chunk; m += MAX_ROWS, pass++) {
                        const int rows = m0 + chunk - m < MAX_ROWS ? static_cast<int>(m0 + chunk - m) : MAX_ROWS;
                        // What to prefetch: one pass runs AHEAD k-steps ahead of its own reads (if it prefetches);
                        // several share the next block's lines, which follow this block in memory (into the next
                        // group at the end).
                        const int64_t from = pass * lines / passes, to = (pass + 1) * lines / passes;
                        const int64_t share = passes > 1 ? to - from : stream_prefetch_on ? lines : 0;
                        const float* pf = passes == 1 ? w + (k0 + AHEAD) * GROUP : w + k1 * GROUP + from * 16;
                        block_for(rows)(x + m * ldx, ldx, w, k0, k1, bias ? bias + g * GROUP : nullptr, k0 == 0,
                                        y + m * N + g * GROUP, N, pf, share);
                    }
                }
            }
        }
    }
}

}  // extern "C"
