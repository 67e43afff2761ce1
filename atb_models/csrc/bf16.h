// bfloat16 <-> float32 rows for the kit's native kernels, over the library's vector (lanes.h: AVX-512F's or AVX2's;
// no AVX512-BF16 instructions needed), and the scalar conversions for a row's tail.
//
// A bfloat16 is the top half of a float32: widening is a 16-bit left shift. Narrowing rounds to nearest, ties to
// even, as PyTorch's `.to(torch.bfloat16)` does (c10::round_to_nearest_even), NaN kept a quiet NaN.

#pragma once

#include <stdint.h>
#include <string.h>

#include <vector>

#include "lanes.h"

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

// out[0:n] = bfloat16(x[0:n]).
inline void store_bf16(const float* x, int64_t n, uint16_t* out) {
    using L = Lanes;
    int64_t i = 0;
    for (; i + L::N <= n; i += L::N) L::store_bf16(out + i, L::load(x + i));
    for (; i < n; i++) out[i] = float_to_bf16(x[i]);
}

// The calling thread's buffer for up to `rows` rows of K bfloat16 inputs converted from x32 (where x32 is given:
// chunk_in_bf16's conversions, amx_linear.h's three parts), kept for its next call and shared with the team it
// starts; 64-byte aligned, so that rows of a multiple of 32 values start on a cache line (an AMX tile row that
// straddles two lines costs two loads).
inline uint16_t* conversion_buffer(const float* x32, int64_t rows, int64_t K) {
    constexpr int64_t LINE = 32;  // bfloat16 values a 64-byte line
    thread_local std::vector<uint16_t> inputs;
    if (x32 != nullptr && static_cast<int64_t>(inputs.size()) < rows * K + LINE) inputs.resize(rows * K + LINE);
    const uintptr_t at = reinterpret_cast<uintptr_t>(inputs.data());
    return inputs.data() + ((64 - at % 64) % 64) / 2;
}

// Called by every thread of a parallel region: a chunk's rows m0 .. m0 + chunk as bfloat16, and their stride in
// `ld`: x16's where they lie, or x32's (ldx apart) converted into `converted` (K apart), shared by the team (the
// conversion's loop ends when every thread is done with it).
inline const uint16_t* chunk_in_bf16(const float* x32, const uint16_t* x16, int64_t m0, int64_t chunk, int64_t ldx,
                                     int64_t K, uint16_t* converted, int64_t& ld) {
    ld = x16 != nullptr ? ldx : K;
    if (x16 != nullptr) return x16 + m0 * ldx;
#pragma omp for
    for (int64_t m = 0; m < chunk; m++) store_bf16(x32 + (m0 + m) * ldx, K, converted + m * K);
    return converted;
}

// x[0:n] = float32(bfloat16(x[0:n])), in place: the values a bfloat16 tensor would hold.
inline void round_to_bf16_values(float* x, int64_t n) {
    using L = Lanes;
    int64_t i = 0;
    for (; i + L::N <= n; i += L::N) L::store(x + i, L::round_bf16(L::load(x + i)));
    for (; i < n; i++) x[i] = bf16_to_float(float_to_bf16(x[i]));
}

// out[0:n] = float32(x[0:n]).
inline void load_bf16_row(const uint16_t* x, int64_t n, float* out) {
    using L = Lanes;
    int64_t i = 0;
    for (; i + L::N <= n; i += L::N) L::store(out + i, L::load_bf16(x + i));
    for (; i < n; i++) out[i] = bf16_to_float(x[i]);
}

// Values stored as float32 or as bfloat16 (uint16_t), for kernels written once over both: a vector of them as
// float32, a float32 vector or row stored as them (a float32 one as it is, a bfloat16 one rounded), and a float32
// vector rounded as storing it would round it.
inline Lanes::V load_lanes(const float* p) { return Lanes::load(p); }
inline Lanes::V load_lanes(const uint16_t* p) { return Lanes::load_bf16(p); }
inline void store_lanes(float* p, Lanes::V v) { Lanes::store(p, v); }
inline void store_lanes(uint16_t* p, Lanes::V v) { Lanes::store_bf16(p, v); }
inline void store_row(const float* row, int64_t n, float* out) {
    for (int64_t d = 0; d < n; d++) out[d] = row[d];
}
inline void store_row(const float* row, int64_t n, uint16_t* out) { store_bf16(row, n, out); }
inline void load_row(const float* x, int64_t n, float* out) { store_row(x, n, out); }  // float32 both ways: a copy
inline void load_row(const uint16_t* x, int64_t n, float* out) { load_bf16_row(x, n, out); }
inline Lanes::V as_stored(Lanes::V v, const float*) { return v; }
inline Lanes::V as_stored(Lanes::V v, const uint16_t*) { return Lanes::round_bf16(v); }

}  // namespace
