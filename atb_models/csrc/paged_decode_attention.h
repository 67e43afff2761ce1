// One decode step of attention over the paged KV cache, float32 arithmetic, AVX-512, in one call per layer; the
// cache in float32 or bfloat16 (bf16.h: half the bytes to read, each row widened as it is loaded, the new K and V
// rounded to nearest even when stored, as PyTorch stores them).
//
// For every (sequence, KV head) pair: rotate the step's new K row and the queries by the position's rotary, write
// the new K and V rows into the cache slot of the sequence's last position, then attend from the query heads that
// share the KV head to the sequence's context, read in place through its block table. PyTorch would spend the
// rotation's five operators, two index_puts, two block gathers into a contiguous copy, a mask and a softmax on the
// same work (about fifteen operator calls a layer, each a few microseconds); this reads each context
// row once, straight from the cache.
//
// Layouts (atb_models/layers/attention.py): cache [num_blocks, kv_heads, block_size, head_dim]; q [batch, heads,
// head_dim] and k, v [batch, kv_heads, head_dim], each with its own row (batch) stride and contiguous inside a row;
// out [batch, heads, head_dim] contiguous. head_dim must be a multiple of 16. Scores and softmax in float32 with the
// maximum subtracted, as the reference does.

#pragma once

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <cmath>
#include <vector>

#include "bf16.h"
#include "vector_exp.h"

namespace {

constexpr int64_t PREFETCH_ROWS = 32;  // context rows prefetched ahead of the ones being scored

// 16 cache values from p as float32, and a row stored into the cache: a float32 cache is read and written as it
// is, a bfloat16 one widened and rounded.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return load_bf16(p); }
inline void store_row(const float* row, int64_t n, float* out) {
    for (int64_t d = 0; d < n; d++) out[d] = row[d];
}
inline void store_row(const float* row, int64_t n, uint16_t* out) { store_bf16(row, n, out); }

// Prefetch a cache row of n values.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
    const char* bytes = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(bytes + b, _MM_HINT_T0);
}

// out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]), as layers/rotary.py rotates.
inline void rotate(const float* x, const float* cos, const float* sin, int64_t dim, float* out) {
    const int64_t half = dim / 2;
    int64_t d = 0;
    for (; d + 16 <= half; d += 16) {
        const __m512 lo = _mm512_loadu_ps(x + d), hi = _mm512_loadu_ps(x + d + half);
        _mm512_storeu_ps(out + d, _mm512_sub_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(cos + d)),
                                                _mm512_mul_ps(hi, _mm512_loadu_ps(sin + d))));
        _mm512_storeu_ps(out + d + half, _mm512_add_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(cos + d + half)),
                                                       _mm512_mul_ps(lo, _mm512_loadu_ps(sin + d + half))));
    }
    for (; d < half; d++) {
        out[d] = x[d] * cos[d] - x[d + half] * sin[d];
        out[d + half] = x[d + half] * cos[d + half] + x[d] * sin[d + half];
    }
}

// In place over s[0:length]: s = exp(s - max(s)); returns the sum.
inline float softmax_numerators(float* s, int64_t length) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= length; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + t));
    float m = _mm512_reduce_max_ps(top);
    for (; t < length; t++) m = s[t] > m ? s[t] : m;
    const __m512 vm = _mm512_set1_ps(m);
    __m512 total = _mm512_setzero_ps();
    for (t = 0; t < length; t += 16) {
        const __mmask16 live = length - t >= 16 ? static_cast<__mmask16>(0xFFFF)
                                                : static_cast<__mmask16>((1u << (length - t)) - 1);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), vm));
        _mm512_mask_storeu_ps(s + t, live, e);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, e));
    }
    return _mm512_reduce_add_ps(total);
}

// Lane t of the result: the sum of v[t]'s 16 lanes. Four rounds fold pairs of vectors into one, halving the lanes
// each source keeps (16 sources x 16 lanes -> ... -> 16 x 1): 15 folds of two permutes and an add, where reducing
// each vector alone would take 16 horizontal reductions of about nine instructions each.
struct LaneFolds {
    __m512i low[4], high[4];
    LaneFolds() {
        for (int round = 0, keep = 16, sources = 1; round < 4; round++, keep /= 2, sources *= 2) {
            alignas(64) int lo[16], hi[16];
            for (int lane = 0; lane < 16; lane++) {
                // Output lane: source `k` (a's sources first, then b's), element `e` of its keep / 2.
                const int k = lane / (keep / 2), e = lane % (keep / 2);
                lo[lane] = k < sources ? k * keep + e : 16 + (k - sources) * keep + e;
                hi[lane] = lo[lane] + keep / 2;
            }
            low[round] = _mm512_load_si512(lo);
            high[round] = _mm512_load_si512(hi);
        }
    }
};

inline __m512 sum_lanes(__m512* v, const LaneFolds& folds) {
    for (int round = 0, count = 16; round < 4; round++, count /= 2)
        for (int j = 0; j < count / 2; j++)
            v[j] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * j], folds.low[round], v[2 * j + 1]),
                                 _mm512_permutex2var_ps(v[2 * j], folds.high[round], v[2 * j + 1]));
    return v[0];
}

// out[h] = inverse[h] * sum over t of s[h * length + t] * values[t], for NH heads of VEC vectors each.
template <int NH, int VEC, typename T>
void weighted_sum(const float* s, int64_t length, const T* const* values, const float* inverse, float* out,
                  int64_t head_dim) {
    __m512 acc[NH][VEC];
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < VEC; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < length; t++) {
        __m512 row[VEC];
        for (int c = 0; c < VEC; c++) row[c] = load16(values[t] + 16 * c);
        for (int h = 0; h < NH; h++) {
            const __m512 weight = _mm512_set1_ps(s[h * length + t]);
            for (int c = 0; c < VEC; c++) acc[h][c] = _mm512_fmadd_ps(weight, row[c], acc[h][c]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < VEC; c++)
            _mm512_storeu_ps(out + h * head_dim + 16 * c, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inverse[h])));
}

// weighted_sum for a group's heads, 16 / VEC at a time: each V row is loaded once for all of them, and 16
// accumulators are in flight (one head's VEC chains alone would wait on the multiply-add latency).
template <int VEC, typename T>
void weighted_sums(const float* scores, int64_t group, int64_t length, const T* const* values,
                   const float* inverse, float* out, int64_t head_dim) {
    constexpr int HEADS = 16 / VEC;
    int64_t i = 0;
    for (; i + HEADS <= group; i += HEADS)
        weighted_sum<HEADS, VEC>(scores + i * length, length, values, inverse + i, out + i * head_dim, head_dim);
    const float* s = scores + i * length;
    float* o = out + i * head_dim;
    switch (group - i) {  // the rest: fewer than HEADS
        case 3: if constexpr (HEADS > 3) weighted_sum<3, VEC>(s, length, values, inverse + i, o, head_dim); break;
        case 2: if constexpr (HEADS > 2) weighted_sum<2, VEC>(s, length, values, inverse + i, o, head_dim); break;
        case 1: weighted_sum<1, VEC>(s, length, values, inverse + i, o, head_dim); break;
        default: break;
    }
}

// Dot products, softmax and the weighted sum for one (sequence, KV head): VEC vectors of 16 per head row, or
// `vectors` at run time when VEC is 0. Scores 16 context rows at a time, the rows after next prefetched (K now, V
// for the weighted sum after the softmax): a context is a few short runs of the cache, too short for the hardware
// prefetcher to ramp up on.
template <int VEC, typename T>
void attend(const float* q_group, int64_t group, int64_t head_dim, int64_t vectors_rt, const T* const* keys,
            const T* const* values, int64_t length, float scale, float* scores, float* weights_inverse,
            float* out) {
    static const LaneFolds folds;
    const int64_t vectors = VEC ? VEC : vectors_rt;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < length; t0 += 16) {
        const int64_t n = length - t0 < 16 ? length - t0 : 16;
        for (int64_t t = t0 + PREFETCH_ROWS; t < t0 + PREFETCH_ROWS + 16 && t < length; t++) {
            prefetch_row(keys[t], head_dim);
            prefetch_row(values[t], head_dim);
        }
        // A short last block reads its missing rows from the first: their scores are never stored.
        const T* rows[16];
        for (int64_t t = 0; t < 16; t++) rows[t] = keys[t0 + (t < n ? t : 0)];
        for (int64_t i = 0; i < group; i++) {
            const float* query = q_group + i * head_dim;
            __m512 dots[16];
            for (int t = 0; t < 16; t++) {
                __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(query), load16(rows[t]));
                for (int64_t c = 1; c < vectors; c++)
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(query + 16 * c), load16(rows[t] + 16 * c), acc);
                dots[t] = acc;
            }
            const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
            _mm512_mask_storeu_ps(scores + i * length + t0, live, _mm512_mul_ps(sum_lanes(dots, folds), vscale));
        }
    }
    for (int64_t i = 0; i < group; i++)
        weights_inverse[i] = 1.f / softmax_numerators(scores + i * length, length);
    if constexpr (VEC != 0) {
        weighted_sums<VEC>(scores, group, length, values, weights_inverse, out, head_dim);
    } else {
        for (int64_t i = 0; i < group; i++) {
            const float* s = scores + i * length;
            const __m512 inv = _mm512_set1_ps(weights_inverse[i]);
            for (int64_t c = 0; c < vectors; c++) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t t = 0; t < length; t++)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(s[t]), load16(values[t] + 16 * c), acc);
                _mm512_storeu_ps(out + i * head_dim + 16 * c, _mm512_mul_ps(acc, inv));
            }
        }
    }
}


// The step for a cache of T (float, or uint16_t holding bfloat16): see atb_paged_decode_attention_f32.
template <typename T>
void paged_decode_attention(const float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* v,
                            int64_t v_stride, const float* cos, const float* sin, T* k_cache, T* v_cache,
                            const int64_t* block_tables, int64_t max_blocks, const int64_t* context_lens,
                            int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                            float scale, float* out) {
    const int64_t group = heads / kv_heads, vectors = head_dim / 16;
#pragma omp parallel
    {
        // Flush denormals to zero here: a softmax over a wide spread of scores yields weights below 1e-38, and
        // arithmetic on them runs a hundred times slower (contributions that small change no output).
        const unsigned int saved_csr = _mm_getcsr();
        _mm_setcsr(saved_csr | 0x8040);  // FTZ | DAZ
        std::vector<float> scores, rotated, inverse;
        std::vector<const T*> keys, values;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < batch * kv_heads; task++) {
            const int64_t b = task / kv_heads, g = task % kv_heads, length = context_lens[b];
            const int64_t* table = block_tables + b * max_blocks;
            // Where each context row lives, walked block by block (no division per row).
            keys.resize(length);
            values.resize(length);
            for (int64_t t0 = 0, j = 0; t0 < length; t0 += block_size, j++) {
                const int64_t base = (table[j] * kv_heads + g) * block_size * head_dim;
                for (int64_t t = t0; t < length && t < t0 + block_size; t++) {
                    keys[t] = k_cache + base + (t - t0) * head_dim;
                    values[t] = v_cache + base + (t - t0) * head_dim;
                }
            }
            // The next pair's first rows (a thread's pairs are consecutive): their misses overlap this pair's work.
            if (task + 1 < batch * kv_heads) {
                const int64_t nb = (task + 1) / kv_heads, ng = (task + 1) % kv_heads;
                const int64_t rows = context_lens[nb] < PREFETCH_ROWS ? context_lens[nb] : PREFETCH_ROWS;
                for (int64_t t = 0; t < rows; t++) {
                    const int64_t at = ((block_tables[nb * max_blocks + t / block_size] * kv_heads + ng) * block_size +
                                        t % block_size) * head_dim;
                    prefetch_row(k_cache + at, head_dim);
                    prefetch_row(v_cache + at, head_dim);
                }
            }
            // The new token's K and V go to its slot first: it attends to itself.
            const float* k_new = k + b * k_stride + g * head_dim;
            const float* v_new = v + b * v_stride + g * head_dim;
            T* k_slot = const_cast<T*>(keys[length - 1]);
            T* v_slot = const_cast<T*>(values[length - 1]);
            store_row(v_new, head_dim, v_slot);
            const float* q_group = q + b * q_stride + g * group * head_dim;
            rotated.resize((group + 1) * head_dim);
            if (cos) {
                float* k_rotated = rotated.data() + group * head_dim;
                rotate(k_new, cos + b * head_dim, sin + b * head_dim, head_dim, k_rotated);
                store_row(k_rotated, head_dim, k_slot);
                for (int64_t i = 0; i < group; i++)
                    rotate(q_group + i * head_dim, cos + b * head_dim, sin + b * head_dim, head_dim,
                           rotated.data() + i * head_dim);
                q_group = rotated.data();
            } else {
                store_row(k_new, head_dim, k_slot);
            }
            scores.resize(group * length);
            inverse.resize(group);
            float* o = out + (b * heads + g * group) * head_dim;
            if (vectors == 4)
                attend<4>(q_group, group, head_dim, vectors, keys.data(), values.data(), length, scale,
                          scores.data(), inverse.data(), o);
            else if (vectors == 8)
                attend<8>(q_group, group, head_dim, vectors, keys.data(), values.data(), length, scale,
                          scores.data(), inverse.data(), o);
            else
                attend<0>(q_group, group, head_dim, vectors, keys.data(), values.data(), length, scale,
                          scores.data(), inverse.data(), o);
        }
        _mm_setcsr(saved_csr);
    }
}

}  // namespace

extern "C" {

// cos, sin: [batch, head_dim] contiguous, the rotary of each sequence's new position, applied to q and the new k
// here (rotate-half convention, as layers/rotary.py); both null: q and k arrive rotated.
void atb_paged_decode_attention_f32(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                                    const float* v, int64_t v_stride, const float* cos, const float* sin,
                                    float* k_cache, float* v_cache, const int64_t* block_tables, int64_t max_blocks,
                                    const int64_t* context_lens, int64_t batch, int64_t heads, int64_t kv_heads,
                                    int64_t head_dim, int64_t block_size, float scale, float* out) {
    paged_decode_attention(q, q_stride, k, k_stride, v, v_stride, cos, sin, k_cache, v_cache, block_tables,
                           max_blocks, context_lens, batch, heads, kv_heads, head_dim, block_size, scale, out);
}

}  // extern "C"
