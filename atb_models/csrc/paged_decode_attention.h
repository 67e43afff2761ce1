// One decode step of attention over the paged KV cache, float32 arithmetic, in one call per layer, written once
// over the library's vector (lanes.h: AVX-512's 16 lanes or AVX2's 8); the cache in float32 or bfloat16 (bf16.h:
// half the bytes to read, each row widened as it is loaded, the new K and V rounded to nearest even when stored, as
// PyTorch stores them).
//
// For every (row, KV head) pair: rotate the row's new K by its position's rotary and write the new K and V into the
// cache slot of the row's last position; then, once every row has, rotate the queries and attend from the query
// heads that share the KV head to the row's context, read in place through its block table. PyTorch would spend the
// rotation's five operators, two index_puts, two block gathers into a contiguous copy, a mask and a softmax on the
// same work (about fifteen operator calls a layer, each a few microseconds); this reads each context row
// once, straight from the cache.
//
// Layouts (atb_models/layers/attention.py): cache [num_blocks, kv_heads, block_size, head_dim]; q [batch, heads,
// head_dim] and k, v [batch, kv_heads, head_dim], each with its own row (batch) stride and contiguous inside a row;
// out [batch, heads, head_dim] contiguous. head_dim must be a multiple of 16. Scores and softmax in float32 with the
// maximum subtracted, as the reference does.

#pragma once

#include <omp.h>
#include <stdint.h>

#include <cmath>
#include <vector>

#include "bf16.h"
#include "lanes.h"
#include "vector_exp.h"

namespace {

constexpr int64_t PREFETCH_ROWS = 32;  // context rows prefetched ahead of the ones being scored

// Prefetch a cache row of n values.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
    const char* bytes = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(bytes + b, _MM_HINT_T0);
}

// out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]), as layers/rotary.py rotates.
inline void rotate(const float* x, const float* cos, const float* sin, int64_t dim, float* out) {
    using L = Lanes;
    const int64_t half = dim / 2;
    int64_t d = 0;
    for (; d + L::N <= half; d += L::N) {
        const L::V lo = L::load(x + d), hi = L::load(x + d + half);
        L::store(out + d, L::sub(L::mul(lo, L::load(cos + d)), L::mul(hi, L::load(sin + d))));
        L::store(out + d + half, L::add(L::mul(hi, L::load(cos + d + half)), L::mul(lo, L::load(sin + d + half))));
    }
    for (; d < half; d++) {
        out[d] = x[d] * cos[d] - x[d + half] * sin[d];
        out[d + half] = x[d + half] * cos[d + half] + x[d] * sin[d + half];
    }
}

// In place over s[0:length]: s = exp(s - max(s)); returns the sum.
inline float softmax_numerators(float* s, int64_t length) {
    using L = Lanes;
    const L::V vm = L::set1(row_max(s, length));
    L::V total = L::zero();
    for (int64_t t = 0; t < length; t += L::N) {
        const L::Mask live = L::first(length - t);
        const L::V e = exp_lanes(L::sub(L::load(live, s + t), vm));
        L::store(s + t, live, e);
        total = L::add(total, L::keep(live, e));
    }
    return L::sum(total);
}

// out[h] = inverse[h] * sum over t of s[h * length + t] * values[t][column:column + VEC * N], for NH heads (rows of
// `out` head_dim apart) and VEC vectors of columns from `column`.
template <int NH, int VEC, typename T>
void weighted_sum(const float* s, int64_t length, const T* const* values, int64_t column, const float* inverse,
                  float* out, int64_t head_dim) {
    using L = Lanes;
    L::V acc[NH][VEC];
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < VEC; c++) acc[h][c] = L::zero();
    for (int64_t t = 0; t < length; t++) {
        L::V row[VEC];
        for (int c = 0; c < VEC; c++) row[c] = load_lanes(values[t] + column + L::N * c);
        for (int h = 0; h < NH; h++) {
            const L::V weight = L::set1(s[h * length + t]);
            for (int c = 0; c < VEC; c++) acc[h][c] = L::fmadd(weight, row[c], acc[h][c]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < VEC; c++)
            L::store(out + h * head_dim + column + L::N * c, L::mul(acc[h][c], L::set1(inverse[h])));
}

// weighted_sum for a group's heads of VEC vectors: Lanes::ACCUMULATORS / VEC heads at a time, so that each V row is
// loaded once for all of them and that many accumulators are in flight (one head's VEC chains alone would wait on
// the multiply-add latency); a head row wider than the accumulators (AVX2's 16 vectors of a 128-wide head) in
// column blocks of them, one head at a time.
template <int VEC, typename T>
void weighted_sums(const float* scores, int64_t group, int64_t length, const T* const* values,
                   const float* inverse, float* out, int64_t head_dim) {
    constexpr int WIDE = VEC > Lanes::ACCUMULATORS;
    constexpr int HEADS = WIDE ? 1 : Lanes::ACCUMULATORS / VEC;
    constexpr int BLOCK = WIDE ? Lanes::ACCUMULATORS : VEC;  // vectors a pass accumulates
    static_assert(VEC % BLOCK == 0, "a head row is whole blocks of columns");
    int64_t i = 0;
    for (; i + HEADS <= group; i += HEADS)
        for (int c = 0; c < VEC; c += BLOCK)
            weighted_sum<HEADS, BLOCK>(scores + i * length, length, values, c * Lanes::N, inverse + i,
                                       out + i * head_dim, head_dim);
    const float* s = scores + i * length;
    float* o = out + i * head_dim;
    switch (group - i) {  // the rest: fewer than HEADS
        case 3: if constexpr (HEADS > 3) weighted_sum<3, VEC>(s, length, values, 0, inverse + i, o, head_dim); break;
        case 2: if constexpr (HEADS > 2) weighted_sum<2, VEC>(s, length, values, 0, inverse + i, o, head_dim); break;
        case 1: if constexpr (HEADS > 1) weighted_sum<1, VEC>(s, length, values, 0, inverse + i, o, head_dim); break;
        default: break;
    }
}

// Dot products, softmax and the weighted sum for one (sequence, KV head): VEC vectors per head row, or `vectors`
// at run time when VEC is 0. Scores N context rows at a time, the rows after next prefetched (K now, V for the
// weighted sum after the softmax): a context is a few short runs of the cache, too short for the hardware
// prefetcher to ramp up on.
template <int VEC, typename T>
void attend(const float* q_group, int64_t group, int64_t head_dim, int64_t vectors_rt, const T* const* keys,
            const T* const* values, int64_t length, float scale, float* scores, float* weights_inverse,
            float* out) {
    using L = Lanes;
    static const L::Folds folds;
    const int64_t vectors = VEC ? VEC : vectors_rt;
    const L::V vscale = L::set1(scale);
    for (int64_t t0 = 0; t0 < length; t0 += L::N) {
        const int64_t n = length - t0 < L::N ? length - t0 : L::N;
        for (int64_t t = t0 + PREFETCH_ROWS; t < t0 + PREFETCH_ROWS + L::N && t < length; t++) {
            prefetch_row(keys[t], head_dim);
            prefetch_row(values[t], head_dim);
        }
        // A short last block reads its missing rows from the first: their scores are never stored.
        const T* rows[L::N];
        for (int64_t t = 0; t < L::N; t++) rows[t] = keys[t0 + (t < n ? t : 0)];
        for (int64_t i = 0; i < group; i++) {
            const float* query = q_group + i * head_dim;
            L::V dots[L::N];
            for (int t = 0; t < L::N; t++) {
                L::V acc = L::mul(L::load(query), load_lanes(rows[t]));
                for (int64_t c = 1; c < vectors; c++)
                    acc = L::fmadd(L::load(query + L::N * c), load_lanes(rows[t] + L::N * c), acc);
                dots[t] = acc;
            }
            L::store(scores + i * length + t0, L::first(n), L::mul(L::sum_lanes(dots, folds), vscale));
        }
    }
    for (int64_t i = 0; i < group; i++)
        weights_inverse[i] = 1.f / softmax_numerators(scores + i * length, length);
    if constexpr (VEC != 0) {
        weighted_sums<VEC>(scores, group, length, values, weights_inverse, out, head_dim);
    } else {
        for (int64_t i = 0; i < group; i++) {
            const float* s = scores + i * length;
            const L::V inv = L::set1(weights_inverse[i]);
            for (int64_t c = 0; c < vectors; c++) {
                L::V acc = L::zero();
                for (int64_t t = 0; t < length; t++)
                    acc = L::fmadd(L::set1(s[t]), load_lanes(values[t] + L::N * c), acc);
                L::store(out + i * head_dim + L::N * c, L::mul(acc, inv));
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
    const int64_t group = heads / kv_heads, vectors = head_dim / Lanes::N;
#pragma omp parallel
    {
        // Flush denormals to zero here: a softmax over a wide spread of scores yields weights below 1e-38, and
        // arithmetic on them runs a hundred times slower (contributions that small change no output).
        const unsigned int saved_csr = _mm_getcsr();
        _mm_setcsr(saved_csr | 0x8040);  // FTZ | DAZ
        std::vector<float> scores, rotated, inverse;
        std::vector<const T*> keys, values;
        // Every row's new K and V go to their slots first (rows attend to themselves), all before any row attends:
        // several rows of one sequence at consecutive positions (a speculative step's guesses) each see the rows
        // before theirs, as a prefill chunk's tokens do.
#pragma omp for schedule(static)
        for (int64_t task = 0; task < batch * kv_heads; task++) {
            const int64_t b = task / kv_heads, g = task % kv_heads, last = context_lens[b] - 1;
            const int64_t at = ((block_tables[b * max_blocks + last / block_size] * kv_heads + g) * block_size +
                                last % block_size) * head_dim;
            const float* k_new = k + b * k_stride + g * head_dim;
            store_row(v + b * v_stride + g * head_dim, head_dim, v_cache + at);
            if (cos) {
                rotated.resize(head_dim);
                rotate(k_new, cos + b * head_dim, sin + b * head_dim, head_dim, rotated.data());
                store_row(rotated.data(), head_dim, k_cache + at);
            } else {
                store_row(k_new, head_dim, k_cache + at);
            }
        }
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
            const float* q_group = q + b * q_stride + g * group * head_dim;
            if (cos) {
                rotated.resize(group * head_dim);
                for (int64_t i = 0; i < group; i++)
                    rotate(q_group + i * head_dim, cos + b * head_dim, sin + b * head_dim, head_dim,
                           rotated.data() + i * head_dim);
                q_group = rotated.data();
            }
            scores.resize(group * length);
            inverse.resize(group);
            float* o = out + (b * heads + g * group) * head_dim;
            if (head_dim == 64)
                attend<64 / Lanes::N>(q_group, group, head_dim, vectors, keys.data(), values.data(), length, scale,
                          scores.data(), inverse.data(), o);
            else if (head_dim == 128)
                attend<128 / Lanes::N>(q_group, group, head_dim, vectors, keys.data(), values.data(), length, scale,
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
