// bfloat16 <-> float32 for the kit's native kernels, on any AVX-512F CPU (no AVX512-BF16 instructions needed).
//
// A bfloat16 is the top half of a float32: widening is a 16-bit left shift. Narrowing rounds to nearest, ties to
// even, as PyTorch's `.to(torch.bfloat16)` does (c10::round_to_nearest_even), NaN kept a quiet NaN.

#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

namespace {

inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// 16 bfloat16 values as 16 float32 lanes.
inline __m512 load_bf16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// 16 float32 lanes rounded to bfloat16 (nearest, ties to even; NaN to a quiet NaN).
inline __m256i round_to_bf16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(rounded);
}

// out[0:n] = bfloat16(x[0:n]).
inline void store_bf16(const float* x, int64_t n, uint16_t* out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), round_to_bf16(_mm512_loadu_ps(x + i)));
    for (; i < n; i++) out[i] = float_to_bf16(x[i]);
}

// x[0:n] = float32(bfloat16(x[0:n])), in place: the values a bfloat16 tensor would hold.
inline void round_to_bf16_values(float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i narrow = _mm512_cvtepu16_epi32(round_to_bf16(_mm512_loadu_ps(x + i)));
        _mm512_storeu_ps(x + i, _mm512_castsi512_ps(_mm512_slli_epi32(narrow, 16)));
    }
    for (; i < n; i++) x[i] = bf16_to_float(float_to_bf16(x[i]));
}

// out[0:n] = float32(x[0:n]).
inline void load_bf16_row(const uint16_t* x, int64_t n, float* out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, load_bf16(x + i));
    for (; i < n; i++) out[i] = bf16_to_float(x[i]);
}

}  // namespace
