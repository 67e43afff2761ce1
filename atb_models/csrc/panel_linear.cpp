// y = x W^T + b in float32 for the CPU's decode row counts (1 to a few dozen rows), AVX-512.
//
// W is packed once at load as panels of 16 output columns: wp[N / 16][K][16], so one 64-byte load holds a k-step of
// a panel and every panel is one contiguous stream. A register block keeps MR rows x NB panels of accumulators
// (MR * NB <= 24 of the 32 zmm registers) and broadcasts one x value per row per k-step, so each broadcast feeds NB
// fused multiply-adds. K is cut into blocks whose NB panels stay in L1 while every chunk of up to 8 rows passes over
// them; the weights are read from memory once whatever the row count.
//
// At 16 rows a decode step is about as much arithmetic as memory traffic. oneDNN's linear computes first and
// streams next, so its time is their sum; here every pass over a block prefetches its share of the next block, so
// the memory stream runs while the multiply-adds do (docs/PERFORMANCE.md has the measurements). With a single pass
// (8 rows or fewer) the prefetch runs a fixed distance ahead instead.
//
// Threads: OpenMP, through the libgomp PyTorch has already loaded, so the kernel shares torch's thread count and
// pool. Built and loaded by atb_models/native.py; chosen by atb_models/platform.py.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

namespace {

constexpr int64_t K_BLOCK = 128;      // k-steps per block: 4 panels x 128 x 64 B = 32 KB, inside L1
constexpr int MAX_ROWS = 8;           // rows per register block
constexpr int64_t ROW_CHUNK = 256;    // rows per pass over the weights (prefill)
constexpr int64_t AHEAD = 16;         // single pass: prefetch this many k-steps ahead in every panel

// acc[MR][NB] (+)= x[MR rows, k0:k1] * panels[NB][k0:k1][16], then stored to y. While it runs, prefetch the lines
// `pf`'s NB panels, pass `pass` of `passes` taking its share of the block's lines.
template <int MR, int NB>
void register_block(const float* x, int64_t ldx, const float* wp, int64_t K, int64_t k0, int64_t k1,
                    const float* bias, bool first, float* y, int64_t ldy, const float* pf, int pass, int passes) {
    __m512 acc[MR][NB];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NB; j++)
            acc[i][j] = first ? (bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps())
                              : _mm512_loadu_ps(y + i * ldy + 16 * j);
    // This pass's share of the lines, [line, end), one every `passes` k-steps: spread over the whole pass.
    const int64_t len = k1 - k0, end = (pass + 1) * len / passes;
    int64_t line = pass * len / passes;
    int tick = 0;
    for (int64_t k = k0; k < k1; k++) {
        __m512 w[NB];
        for (int j = 0; j < NB; j++) w[j] = _mm512_loadu_ps(wp + (j * K + k) * 16);
        if (tick == 0 && line < end) {
            for (int j = 0; j < NB; j++)
                _mm_prefetch(reinterpret_cast<const char*>(pf + (j * K + line) * 16), _MM_HINT_T0);
            line++;
        }
        if (++tick == passes) tick = 0;
        for (int i = 0; i < MR; i++) {
            const __m512 b = _mm512_set1_ps(x[i * ldx + k]);
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(w[j], b, acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NB; j++) _mm512_storeu_ps(y + i * ldy + 16 * j, acc[i][j]);
}

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, const float*, bool, float*,
                         int64_t, const float*, int, int);

template <int NB>
BlockFn block_for_rows(int rows) {
    switch (rows) {
        case 1: return register_block<1, NB>;
        case 2: return register_block<2, NB>;
        case 3: return register_block<3, NB>;
        case 4: return register_block<4, NB>;
        case 5: return register_block<5, NB>;
        case 6: return register_block<6, NB>;
        case 7: return register_block<7, NB>;
        default: return register_block<8, NB>;
    }
}

BlockFn block_for(int rows, int panels) {
    switch (panels) {
        case 4: return block_for_rows<4>(rows);
        case 3: return block_for_rows<3>(rows);
        default: return block_for_rows<1>(rows);
    }
}

// Panels per register block for a chunk of `rows` rows: at most 24 accumulators. Few rows are bound by memory, not
// by the multiply-adds, and 4 streams at a time read faster there than 6 or 8 (measured at 1 row).
int panels_for(int rows) { return rows <= 6 ? 4 : 3; }

}  // namespace

extern "C" {

// x: [M, K] with row stride ldx; wp: [N / 16][K][16]; bias: [N] or null; y: [M, N]. N must be a multiple of 16.
void atb_panel_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* wp, int64_t N,
                          const float* bias, float* y) {
    const int64_t panels = N / 16;
    const int nb = panels_for(M < MAX_ROWS ? static_cast<int>(M) : MAX_ROWS);
#pragma omp parallel
    {
        // Each thread takes an equal run of panels (not of register blocks: 56 panels would split 24/32).
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t end = panels * (thread + 1) / threads;
        // Prefill's many rows go in chunks small enough to stay in L2 while every panel passes over them.
        for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
            const int64_t chunk = M - m0 < ROW_CHUNK ? M - m0 : ROW_CHUNK;
            const int passes = static_cast<int>((chunk + MAX_ROWS - 1) / MAX_ROWS);
            // One pass needs no K blocks: nothing else reads the panels again.
            const int64_t k_block = passes == 1 ? K : K_BLOCK;
            for (int64_t p = panels * thread / threads; p < end; p += nb) {
                const int width = end - p < nb ? static_cast<int>(end - p) : nb;
                const float* group = wp + p * K * 16;
                for (int64_t k0 = 0; k0 < K; k0 += k_block) {
                    const int64_t k1 = K - k0 < k_block ? K : k0 + k_block;
                    // What to prefetch: one pass runs AHEAD k-steps ahead in its own panels (running into the
                    // next panel near the end); several passes share the next block: these panels' next K
                    // block, or the next group's first.
                    const float* pf = passes == 1 ? group + AHEAD * 16 + k0 * 16
                                                  : (k1 < K ? group + k1 * 16 : wp + (p + nb) * K * 16);
                    for (int64_t m = m0; m < m0 + chunk; m += MAX_ROWS) {
                        const int rows = m0 + chunk - m < MAX_ROWS ? static_cast<int>(m0 + chunk - m) : MAX_ROWS;
                        const int pass = static_cast<int>((m - m0) / MAX_ROWS);
                        if (width == nb) {
                            block_for(rows, nb)(x + m * ldx, ldx, group, K, k0, k1, bias ? bias + p * 16 : nullptr,
                                                k0 == 0, y + m * N + p * 16, N, pf, pass, passes);
                        } else {
                            for (int j = 0; j < width; j++)
                                block_for(rows, 1)(x + m * ldx, ldx, group + j * K * 16, K, k0, k1,
                                                   bias ? bias + (p + j) * 16 : nullptr, k0 == 0,
                                                   y + m * N + (p + j) * 16, N, pf + j * K * 16, pass, passes);
                        }
                    }
                }
            }
        }
    }
}

}  // extern "C"
