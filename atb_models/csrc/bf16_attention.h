// Attention within segments in bfloat16 by AVX512-BF16's dot product (vdpbf16ps): a prompt's queries against its
// keys (causal, grouped-query heads), or a vision block's images, frames or windows (each attending to itself), in
// one call. PyTorch's SDPA does the same work at 110-160 GFLOP/s on the AMD EPYC (Zen 4) this was written on, as
// float32 or bfloat16 alike; this kernel at 250-340 (docs/PERFORMANCE.md).
//
// The arithmetic is what PyTorch's bfloat16 attention does: each score the float32 sum of exact products of bfloat16
// queries and keys, times the scale; the softmax in float32 with the row's maximum subtracted; the weights rounded
// to bfloat16 for the product with the values (nearest, ties to even), that product summed in float32 and divided
// by the float32 sum of the weights; the output rounded to bfloat16. Only the order of the sums differs.
//
// vdpbf16ps adds the products of 16 pairs of bfloat16s into 16 float32 lanes. So that its lanes are 16 outputs,
// both operands are first packed in pairs along the dimension summed over: the keys as [key blocks of 16][head_dim
// / 2][16] (a lane holds one key's two consecutive dimensions) and the values as [key pairs][head_dim] (a lane holds
// one dimension of two consecutive keys), once a call for all query heads of a KV head. A query's two consecutive
// dimensions, and a weight row's two consecutive keys, are then one 32-bit value broadcast to every lane.
//
// Work: tasks of (segment, query head, block of QUERY_BLOCK rows), taken dynamically (a causal block's cost grows
// with its position). A task scores its rows against every key they may see into a per-thread buffer (QUERY_BLOCK
// x keys float32: 196 KB at 1536 keys), takes the softmax row by row, and multiplies the weights by the values.

#pragma once

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "bf16.h"
#include "lanes.h"
#include "vector_exp.h"

namespace {

#ifdef __AVX512BF16__

constexpr int64_t QUERY_BLOCK = 32;  // query rows per task
constexpr int64_t KEY_TILE = 64;     // keys per register block of scores: 4 vectors of 16
constexpr int SCORE_ROWS = 4;        // rows per register block of scores (16 accumulators)

inline __m512i widen_u16(const uint16_t* p) {  // 16 bfloat16s, each in the low half of a 32-bit lane
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline uint32_t pair_at(const uint16_t* p) {  // two consecutive bfloat16s as one 32-bit value (low: the first)
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

// s[r][0:64] = scale * q_r . keys of the tile, for SCORE_ROWS query rows (q[r]: the row's head, `pairs` pairs).
inline void score_tile(const uint16_t* const* q, const uint32_t* keys, int64_t pairs, float scale, float* s,
                       int64_t lds) {
    __m512 acc[SCORE_ROWS][4];
    for (int r = 0; r < SCORE_ROWS; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    const int64_t block = pairs * 16;  // dwords of one block of 16 keys
    for (int64_t p = 0; p < pairs; p++) {
        const uint32_t* kp = keys + p * 16;
        const __m512i k0 = _mm512_loadu_si512(kp), k1 = _mm512_loadu_si512(kp + block),
                      k2 = _mm512_loadu_si512(kp + 2 * block), k3 = _mm512_loadu_si512(kp + 3 * block);
        for (int r = 0; r < SCORE_ROWS; r++) {
            const __m512i b = _mm512_set1_epi32(static_cast<int>(pair_at(q[r] + 2 * p)));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)k0, (__m512bh)b);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)k1, (__m512bh)b);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], (__m512bh)k2, (__m512bh)b);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], (__m512bh)k3, (__m512bh)b);
        }
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int r = 0; r < SCORE_ROWS; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * lds + 16 * c, _mm512_mul_ps(acc[r][c], vscale));
}

// Over s[0:length]: the bfloat16 weights exp(s - max) into w[0:length], zeros after them up to w[padded]; returns
// the float32 sum of the weights before rounding (NaN where a score is NaN, and so is the row's output then, as
// PyTorch's: exp_lanes keeps a NaN).
inline float softmax_row(const float* s, int64_t length, int64_t padded, uint16_t* w) {
    using L = Lanes;
    const L::V vm = L::set1(row_max(s, length));
    L::V total = L::zero();
    int64_t t = 0;
    for (; t + L::N <= length; t += L::N) {
        const L::V e = exp_lanes(L::sub(L::load(s + t), vm));
        L::store_bf16(w + t, e);
        total = L::add(total, e);
    }
    if (t < length) {  // the tail through a full vector's buffer
        alignas(64) float e[L::N];
        const L::Mask live = L::first(length - t);
        const L::V ev = L::keep(live, exp_lanes(L::sub(L::load(live, s + t), vm)));
        L::store(e, ev);
        total = L::add(total, ev);
        for (int64_t j = t; j < length; j++) w[j] = float_to_bf16(e[j - t]);
    }
    for (t = length; t < padded; t++) w[t] = 0;
    return L::sum(total);
}

// out[r][0:VEC*16] = bfloat16((w_r . values) / sums[r]) for ROWS rows: w[r] the row's bfloat16 weights (pairs of
// keys), values packed [key pairs][VEC * 16].
template <int ROWS, int VEC>
void value_tile(const uint16_t* const* w, const uint32_t* values, int64_t key_pairs, const float* sums,
                uint16_t* const* out) {
    __m512 acc[ROWS][VEC];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < VEC; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < key_pairs; t++) {
        __m512i v[VEC];
        for (int c = 0; c < VEC; c++) v[c] = _mm512_loadu_si512(values + (t * VEC + c) * 16);
        for (int r = 0; r < ROWS; r++) {
            const __m512i b = _mm512_set1_epi32(static_cast<int>(pair_at(w[r] + 2 * t)));
            for (int c = 0; c < VEC; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)v[c], (__m512bh)b);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        const __m512 sum = _mm512_set1_ps(sums[r]);
        for (int c = 0; c < VEC; c++) Lanes::store_bf16(out[r] + 16 * c, _mm512_div_ps(acc[r][c], sum));
    }
}

// The attention of VEC * 16-wide heads: see atb_bf16_attention. keys/values: the packing buffers (sized by it).
template <int VEC>
void bf16_attention(const uint16_t* q, int64_t q_stride, const uint16_t* k, int64_t k_stride, const uint16_t* v,
                    int64_t v_stride, int64_t count, int64_t n_q, int64_t n_k, int64_t heads, int64_t kv_heads,
                    bool causal, float scale, uint16_t* out, int64_t out_stride, uint32_t* keys, uint32_t* values) {
    constexpr int64_t head_dim = VEC * 16, pairs = head_dim / 2;
    constexpr int VALUE_ROWS = VEC <= 4 ? 5 : VEC <= 5 ? 4 : 2;  // value_tile's accumulators: 20, 20, 16
    const int64_t key_tiles = (n_k + KEY_TILE - 1) / KEY_TILE, key_blocks = key_tiles * (KEY_TILE / 16);
    const int64_t key_pairs = (n_k + 1) / 2;
    const int64_t keys_per_head = key_blocks * pairs * 16, values_per_head = key_pairs * head_dim;
    const int64_t group = heads / kv_heads, query_blocks = (n_q + QUERY_BLOCK - 1) / QUERY_BLOCK;
    const int64_t lds = key_tiles * KEY_TILE;  // scores per row; weights per row (bfloat16) likewise
    const int64_t offset = n_k - n_q;          // causal: query i sees keys 0..offset + i
#pragma omp parallel
    {
        const unsigned int saved_csr = _mm_getcsr();
        _mm_setcsr(saved_csr | 0x8040);  // FTZ | DAZ: a weight below 1e-38 changes no output, and runs slowly
        // Keys: [segment, kv head][block][pair][16 keys], zero past n_k.
#pragma omp for schedule(static)
        for (int64_t task = 0; task < count * kv_heads * key_blocks; task++) {
            const int64_t sg = task / key_blocks, block = task % key_blocks;  // sg: segment * kv_heads + kv head
            uint32_t* dst = keys + sg * keys_per_head + block * pairs * 16;
            for (int64_t j = 0; j < 16; j++) {
                const int64_t key = block * 16 + j;
                const uint16_t* row = k + (sg / kv_heads * n_k + key) * k_stride + sg % kv_heads * head_dim;
                for (int64_t p = 0; p < pairs; p++) dst[p * 16 + j] = key < n_k ? pair_at(row + 2 * p) : 0u;
            }
        }
        // Values: [segment, kv head][key pair][head_dim], a lane the dimension's values of the pair's two keys (the
        // second zero past n_k).
#pragma omp for schedule(static)
        for (int64_t task = 0; task < count * kv_heads * key_pairs; task++) {
            const int64_t sg = task / key_pairs, t = task % key_pairs;
            const uint16_t* first = v + (sg / kv_heads * n_k + 2 * t) * v_stride + sg % kv_heads * head_dim;
            const uint16_t* second = 2 * t + 1 < n_k ? first + v_stride : nullptr;
            uint32_t* dst = values + sg * values_per_head + t * head_dim;
            for (int64_t d = 0; d < head_dim; d += 16) {
                const __m512i lo = widen_u16(first + d);
                const __m512i hi = second ? widen_u16(second + d) : _mm512_setzero_si512();
                _mm512_storeu_si512(dst + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        }
        // Scores and weights of this thread's query block.
        static thread_local std::vector<float> scores;  // (a worker's own: the pool's threads outlive the call)
        static thread_local std::vector<uint16_t> weights;
        scores.resize(QUERY_BLOCK * lds);
        weights.resize(QUERY_BLOCK * lds);
        float sums[QUERY_BLOCK];
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < count * heads * query_blocks; task++) {
            const int64_t segment = task / (heads * query_blocks), h = task / query_blocks % heads;
            const int64_t i0 = task % query_blocks * QUERY_BLOCK;
            const int64_t rows = n_q - i0 < QUERY_BLOCK ? n_q - i0 : QUERY_BLOCK;
            const int64_t sg = segment * kv_heads + h / group;
            const uint16_t* q_segment = q + segment * n_q * q_stride;
            uint16_t* out_segment = out + segment * n_q * out_stride;
            const auto seen = [&](int64_t i) { return causal ? (offset + i + 1 < n_k ? offset + i + 1 : n_k) : n_k; };
            const int64_t widest = seen(i0 + rows - 1);  // keys the block's last row sees: the most of any row
            const int64_t tiles = (widest + KEY_TILE - 1) / KEY_TILE;
            const uint32_t* head_keys = keys + sg * keys_per_head;
            for (int64_t r0 = 0; r0 < rows; r0 += SCORE_ROWS) {
                const uint16_t* q_rows[SCORE_ROWS];
                for (int r = 0; r < SCORE_ROWS; r++)  // past the block's rows: its first row again (not stored)
                    q_rows[r] = q_segment + (i0 + (r0 + r < rows ? r0 + r : 0)) * q_stride + h * head_dim;
                alignas(64) float spare[SCORE_ROWS * KEY_TILE];
                const bool whole = r0 + SCORE_ROWS <= rows;
                for (int64_t tile = 0; tile < tiles; tile++) {
                    float* s = whole ? scores.data() + r0 * lds + tile * KEY_TILE : spare;
                    score_tile(q_rows, head_keys + tile * 4 * pairs * 16, pairs, scale, s, whole ? lds : KEY_TILE);
                    if (!whole)
                        for (int64_t r = r0; r < rows; r++)
                            memcpy(scores.data() + r * lds + tile * KEY_TILE, spare + (r - r0) * KEY_TILE,
                                   KEY_TILE * sizeof(float));
                }
            }
            const int64_t padded = (widest + 1) / 2 * 2;
            for (int64_t r = 0; r < rows; r++)
                sums[r] = softmax_row(scores.data() + r * lds, seen(i0 + r), padded, weights.data() + r * lds);
            for (int64_t r0 = 0; r0 < rows; r0 += VALUE_ROWS) {
                const uint16_t* w_rows[VALUE_ROWS];
                uint16_t* out_rows[VALUE_ROWS];
                alignas(64) uint16_t spare[VALUE_ROWS][head_dim];
                float row_sums[VALUE_ROWS];
                for (int r = 0; r < VALUE_ROWS; r++) {
                    const bool live = r0 + r < rows;
                    w_rows[r] = weights.data() + (live ? r0 + r : 0) * lds;
                    out_rows[r] = live ? out_segment + (i0 + r0 + r) * out_stride + h * head_dim : spare[r];
                    row_sums[r] = sums[live ? r0 + r : 0];
                }
                value_tile<VALUE_ROWS, VEC>(w_rows, values + sg * values_per_head, padded / 2, row_sums, out_rows);
            }
        }
        _mm_setcsr(saved_csr);
    }
}

#endif  // __AVX512BF16__

}  // namespace

extern "C" {

// For each of `count` segments (consecutive runs of n_q query rows and of n_k key and value rows): out[i][h] =
// softmax(scale * q[i][h] . k[j][g]) . v[j][g] over the keys j query i sees, g = h / (heads / kv_heads): all n_k
// keys of its segment, or with `causal` keys 0..n_k - n_q + i. Rows in bfloat16, with their strides in elements: q
// [count * n_q][heads * head_dim], k and v [count * n_k][kv_heads * head_dim], out [count * n_q][heads * head_dim]
// (each head's head_dim values contiguous). Returns 0, or -1 where this build cannot (no AVX512-BF16; head_dim not
// 64, 80 or 128; no rows; causal with n_q > n_k).
int64_t atb_bf16_attention(const uint16_t* q, int64_t q_stride, const uint16_t* k, int64_t k_stride,
                           const uint16_t* v, int64_t v_stride, int64_t count, int64_t n_q, int64_t n_k,
                           int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t causal, float scale,
                           uint16_t* out, int64_t out_stride) {
#ifdef __AVX512BF16__
    if (count <= 0 || n_q <= 0 || n_k <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || (causal && n_q > n_k))
        return -1;
    // The packed keys and values, kept from call to call by the calling thread (its own, whichever it is).
    static thread_local std::vector<uint32_t> keys, values;
    const int64_t key_blocks = (n_k + KEY_TILE - 1) / KEY_TILE * (KEY_TILE / 16);
    keys.resize(count * kv_heads * key_blocks * head_dim / 2 * 16);
    values.resize(count * kv_heads * ((n_k + 1) / 2) * head_dim);
    uint32_t* packed_keys = keys.data();  // taken here: inside the parallel region a thread_local is the worker's
    uint32_t* packed_values = values.data();
    const bool is_causal = causal != 0;
    switch (head_dim) {
        case 64:
            bf16_attention<4>(q, q_stride, k, k_stride, v, v_stride, count, n_q, n_k, heads, kv_heads, is_causal,
                              scale, out, out_stride, packed_keys, packed_values);
            return 0;
        case 80:
            bf16_attention<5>(q, q_stride, k, k_stride, v, v_stride, count, n_q, n_k, heads, kv_heads, is_causal,
                              scale, out, out_stride, packed_keys, packed_values);
            return 0;
        case 128:
            bf16_attention<8>(q, q_stride, k, k_stride, v, v_stride, count, n_q, n_k, heads, kv_heads, is_causal,
                              scale, out, out_stride, packed_keys, packed_values);
            return 0;
        default:
            return -1;
    }
#else
    (void)q, (void)q_stride, (void)k, (void)k_stride, (void)v, (void)v_stride, (void)count, (void)n_q, (void)n_k;
    (void)heads, (void)kv_heads, (void)head_dim, (void)causal, (void)scale, (void)out, (void)out_stride;
    return -1;
#endif
}

}  // extern "C"
