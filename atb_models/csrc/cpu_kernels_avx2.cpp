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
// weights). Several passes over a group (batched rows) go over K blocks that stay in the caches while they do.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "bf16.h"
#include "decoder_layer.h"  // and through it the kernels between the linears, at AVX2's 8 lanes

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

// y[MR, 32] = (first ? bias : y) + x[MR, k0:k1] * w[k0:k1] over one half group of float32 weights (k stride 64).
template <int MR>
void f32_block(const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, const float* bias, bool first,
               float* y, int64_t ldy) {
    auto start = [&](int i, int j) {
        return i < MR ? block_start(first, bias, y + i * ldy, j) : _mm256_setzero_ps();
    };
    ATB_ROW_ACCUMULATORS(0);
    ATB_ROW_ACCUMULATORS(1);
    ATB_ROW_ACCUMULATORS(2);
    for (int64_t k = k0; k < k1; k++) {
        const float* wk = w + k * GROUP;
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
template <int MR>
void bf16_block(const float* x, int64_t ldx, const uint16_t* w, int64_t k0, int64_t k1, const float* bias,
                bool first, float* y, int64_t ldy) {
    auto start = [&](int i, int j) {
        return i < MR ? block_start(first, bias, y + i * ldy, j) : _mm256_setzero_ps();
    };
    ATB_ROW_ACCUMULATORS(0);
    ATB_ROW_ACCUMULATORS(1);
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t k = k0; k < k1; k += 2) {
        const uint16_t* wk = w + k * GROUP;  // the pair's 64 values of this half: 8 columns a ymm
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

// One linear over the groups: each thread an equal run of them (one contiguous stretch of the packed weights), each
// K block's two halves in turn (so that the block is read from memory once), rows in passes of up to ROWS; a
// single row runs ROW over the whole group instead. `half_offset` is a half's offset inside a k-step (or pair).
template <typename T>
using RowFn = void (*)(const float*, const T*, int64_t, const float*, float*);
template <typename T>
using BlockFn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, const float*, bool, float*, int64_t);

template <typename T, int ROWS, RowFn<T> ROW, BlockFn<T> BLOCK1, BlockFn<T> BLOCK2, BlockFn<T> BLOCK3>
void run_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const T* wp, int64_t N, const float* bias,
                float* y, int64_t half_offset) {
    const int64_t groups = N / GROUP;
#pragma omp parallel
    {
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t first_group = groups * thread / threads, end_group = groups * (thread + 1) / threads;
        for (int64_t g = first_group; g < end_group; g++) {
            if (M == 1) {
                ROW(x, wp + g * K * GROUP, K, bias ? bias + g * GROUP : nullptr, y + g * GROUP);
                continue;
            }
            for (int64_t k0 = 0; k0 < K; k0 += K_BLOCK) {
                const int64_t k1 = K - k0 < K_BLOCK ? K : k0 + K_BLOCK;
                for (int64_t h = 0; h < 2; h++) {
                    const T* w = wp + g * K * GROUP + h * half_offset;
                    const float* b = bias ? bias + g * GROUP + h * HALF : nullptr;
                    for (int64_t m = 0; m < M; m += ROWS) {
                        const int64_t rows = M - m < ROWS ? M - m : ROWS;
                        float* out = y + m * N + g * GROUP + h * HALF;
                        const float* in = x + m * ldx;
                        if (rows == 1) BLOCK1(in, ldx, w, k0, k1, b, k0 == 0, out, N);
                        else if (rows == 2) BLOCK2(in, ldx, w, k0, k1, b, k0 == 0, out, N);
                        else BLOCK3(in, ldx, w, k0, k1, b, k0 == 0, out, N);
                    }
                }
            }
        }
    }
}

}  // namespace

extern "C" {

// x: [M, K] with row stride ldx; wp: [N / 64][K][64]; bias: [N] or null; y: [M, N]. N a multiple of 64.
void atb_panel_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* wp, int64_t N,
                          const float* bias, float* y) {
    run_linear<float, 3, f32_row, f32_block<1>, f32_block<2>, f32_block<3>>(x, M, K, ldx, wp, N, bias, y, HALF);
}

// x: [M, K] with row stride ldx; wp: [N / 64][K / 2][64][2] bfloat16 bits; bias: [N] or null; y: [M, N]. K even.
void atb_bf16_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* wp, int64_t N,
                         const float* bias, float* y) {
    // Rows of three would need 12 accumulators, 6 broadcasts and the widened pair: more than AVX2's 16 registers.
    run_linear<uint16_t, 2, bf16_row, bf16_block<1>, bf16_block<2>, bf16_block<2>>(x, M, K, ldx, wp, N, bias, y,
                                                                              2 * HALF);
}

}  // extern "C"

namespace {

// The linears of atb_decoder_layer_decode_f32 (decoder_layer.h): float32 or bfloat16 panels. Int8 (W8A16) layers are
// not given to this library (kernels/decoder_layer.py declines them); a bfloat16 stream's linear inputs are rounded
// to bfloat16 values, as in cpu_kernels.cpp's, and multiplied by the widening kernel.
void layer_linear(int64_t rows, float* x, int64_t K, const void* weights, int64_t format, const float*, int64_t,
                  int64_t N, const float* bias, float* y, bool bf16_model) {
    if (format == FORMAT_BF16) {
        if (bf16_model) round_to_bf16_values(x, rows * K);
        atb_bf16_linear_f32(x, rows, K, K, static_cast<const uint16_t*>(weights), N, bias, y);
    } else {
        atb_panel_linear_f32(x, rows, K, K, static_cast<const float*>(weights), N, bias, y);
    }
}

}  // namespace
