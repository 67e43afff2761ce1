// The float32 vector of the library being compiled, for kernels written once for both: AVX-512's 16 lanes in
// cpu_kernels.cpp's build, AVX2's 8 in cpu_kernels_avx2.cpp's (chosen by the compiler's macros, as csrc's other
// optional instructions are).

#pragma once

#include <immintrin.h>
#include <stdint.h>

namespace {

#if defined(__AVX512F__)
struct Lanes {
    using V = __m512;
    static constexpr int64_t N = 16;
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static V zero() { return _mm512_setzero_ps(); }
    static V set1(float f) { return _mm512_set1_ps(f); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#else
struct Lanes {
    using V = __m256;
    static constexpr int64_t N = 8;
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static V zero() { return _mm256_setzero_ps(); }
    static V set1(float f) { return _mm256_set1_ps(f); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static float sum(V v) {
        const __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        const __m128 quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        return _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)));
    }
};
#endif

}  // namespace
