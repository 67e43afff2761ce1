// The float32 vector of the library being compiled, for kernels written once for both: AVX-512's 16 lanes in
// cpu_kernels.cpp's build, AVX2's 8 in cpu_kernels_avx2.cpp's (chosen by the compiler's macros, as csrc's other
// optional instructions are). Every operation is one or a few instructions, inlined: a kernel written over Lanes
// compiles to what it would be written in the instruction set's intrinsics.
//
// Besides arithmetic: partial vectors (a Mask of the first n lanes, for a row's tail), bfloat16 <-> float32 (a
// bfloat16 is the top half of a float32; narrowing rounds to nearest, ties to even, NaN kept a quiet NaN, as PyTorch's
// `.to(torch.bfloat16)` does), and sum_lanes, N vectors' sums in one vector.

#pragma once

#include <immintrin.h>
#include <stdint.h>

namespace {

#if defined(__AVX512F__)
struct Lanes {
    using V = __m512;
    using Mask = __mmask16;
    static constexpr int64_t N = 16;
    static constexpr const char* ISA = "avx512";
    // Vectors a kernel may keep accumulating at once (half of the 32 registers: its operands need the rest).
    static constexpr int ACCUMULATORS = 16;

    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static V zero() { return _mm512_setzero_ps(); }
    static V set1(float f) { return _mm512_set1_ps(f); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }
    static V min(V a, V b) { return _mm512_min_ps(a, b); }
    static V abs(V v) { return _mm512_abs_ps(v); }
    static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static float sum(V v) { return _mm512_reduce_add_ps(v); }
    static float max_of(V v) { return _mm512_reduce_max_ps(v); }
    static V round(V v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    // v * 2^n for whole numbers n >= -150 (a result below float's range is 0).
    static V scale2(V v, V n) { return _mm512_scalef_ps(v, n); }

    // The first n lanes (none for n <= 0, all of them for n >= N).
    static Mask first(int64_t n) {
        return n >= N ? static_cast<Mask>(0xFFFF) : n <= 0 ? static_cast<Mask>(0) : static_cast<Mask>((1u << n) - 1);
    }
    static V load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }  // the other lanes 0
    static void store(float* p, Mask m, V v) { _mm512_mask_storeu_ps(p, m, v); }
    static V keep(Mask m, V v) { return _mm512_maskz_mov_ps(m, v); }                // the other lanes 0

    // N bfloat16 values widened.
    static V load_bf16(const uint16_t* p) {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
    // v rounded to bfloat16, each in the low half of its 32-bit lane.
    static __m512i bf16_bits(V v) {
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i rounded =
            _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
        return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    }
    static void store_bf16(uint16_t* p, V v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
    }
    // The values v holds once rounded to bfloat16.
    static V round_bf16(V v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }

    // sum_lanes's permutations: four rounds fold pairs of vectors into one, halving the lanes each source keeps (16
    // sources x 16 lanes -> ... -> 16 x 1), 15 folds of two permutes and an add, where reducing each vector alone
    // would take 16 horizontal reductions of about nine instructions each.
    struct Folds {
        __m512i low[4], high[4];
        Folds() {
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
    // Lane t of the result: the sum of v[t]'s lanes (v, N vectors, is overwritten).
    static V sum_lanes(V* v, const Folds& folds) {
        for (int round = 0, count = 16; round < 4; round++, count /= 2)
            for (int j = 0; j < count / 2; j++)
                v[j] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * j], folds.low[round], v[2 * j + 1]),
                                     _mm512_permutex2var_ps(v[2 * j], folds.high[round], v[2 * j + 1]));
        return v[0];
    }
};
#else
struct Lanes {
    using V = __m256;
    using Mask = __m256i;  // all ones in a live lane
    static constexpr int64_t N = 8;
    static constexpr const char* ISA = "avx2";
    static constexpr int ACCUMULATORS = 8;  // of 16 registers

    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static V zero() { return _mm256_setzero_ps(); }
    static V set1(float f) { return _mm256_set1_ps(f); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V max(V a, V b) { return _mm256_max_ps(a, b); }
    static V min(V a, V b) { return _mm256_min_ps(a, b); }
    static V abs(V v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
    static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static float sum(V v) {
        const __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        return _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)));
    }
    static float max_of(V v) {
        const __m128 pair = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 quad = _mm_max_ps(pair, _mm_movehl_ps(pair, pair));
        return _mm_cvtss_f32(_mm_max_ss(quad, _mm_shuffle_ps(quad, quad, 1)));
    }
    static V round(V v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    // AVX2 has no vscalefps: 2^n is built in the exponent bits, in two factors 2^a 2^b (a = floor(n / 2), b = n - a,
    // both >= -75, so each is a normal float); v * 2^a is exact and the last product rounds once, as vscalefps does.
    static V scale2(V v, V n) {
        const __m256i whole = _mm256_cvtps_epi32(n);
        const __m256i a = _mm256_srai_epi32(whole, 1), b = _mm256_sub_epi32(whole, a);
        const __m256i bias = _mm256_set1_epi32(127);
        const V two_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23));
        const V two_b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23));
        return _mm256_mul_ps(_mm256_mul_ps(v, two_a), two_b);
    }

    static Mask first(int64_t n) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 0 ? 0 : n < N ? n : N)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static V load(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }  // masked lanes are not read
    static void store(float* p, Mask m, V v) { _mm256_maskstore_ps(p, m, v); }
    static V keep(Mask m, V v) { return _mm256_and_ps(_mm256_castsi256_ps(m), v); }

    static V load_bf16(const uint16_t* p) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
    static __m256i bf16_bits(V v) {
        const __m256i bits = _mm256_castps_si256(v);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        const __m256i rounded =
            _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    }
    static void store_bf16(uint16_t* p, V v) {
        // packus narrows within each 128-bit half: 64-bit pieces 0 and 2 hold lanes 0-3 and 4-7.
        const __m256i bits = bf16_bits(v);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    }
    static V round_bf16(V v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }

    struct Folds {};  // nothing to precompute: sum_lanes's shuffles are immediate
    // Pairwise horizontal adds within each 128-bit half (8 -> 4 -> 2 sources' partial sums), then the halves added.
    static V sum_lanes(V* v, const Folds&) {
        const V h0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        const V h4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
    }
};
#endif

}  // namespace
