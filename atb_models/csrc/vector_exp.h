// e^x a vector at a time (lanes.h: AVX-512's 16 lanes or AVX2's 8), and a row's maximum before it, shared by the
// kit's native kernels.

#pragma once

#include <stdint.h>

#include <cmath>

#include "lanes.h"

namespace {

// e^x for any x: e^r * 2^n with n = round(x log2 e) and r = x - n ln 2 (ln 2 in two parts, so that r keeps
// float's precision however large n: a product x log2 e rounded to float would carry an error of |x| ulps into the
// result), |r| <= ln 2 / 2, e^r from its Taylor series to the 7th power (relative error under 1e-8), 2^n applied by
// Lanes::scale2. x is clamped to [-104, 89] first: below, the result is 0 (scale2 takes it there); above, it
// overflows to infinity, as e^x does past 88.72 (and AVX2's scale2 needs a bounded n). A NaN stays NaN, as in
// PyTorch's softmax: max and min return their second operand where either is NaN, so x goes second.
inline Lanes::V exp_lanes(Lanes::V x) {
    using L = Lanes;
    const L::V clamped = L::min(L::set1(89.f), L::max(L::set1(-104.f), x));
    const L::V n = L::round(L::mul(clamped, L::set1(1.44269504088896341f)));
    // ln 2 = 0.693359375 (exact in 9 bits: n times it is exact) - 2.12194440e-4 (the rest)
    const L::V r = L::fmadd(n, L::set1(2.12194440e-4f), L::fmadd(n, L::set1(-0.693359375f), clamped));
    L::V p = L::set1(1.f / 5040);
    p = L::fmadd(p, r, L::set1(1.f / 720));
    p = L::fmadd(p, r, L::set1(1.f / 120));
    p = L::fmadd(p, r, L::set1(1.f / 24));
    p = L::fmadd(p, r, L::set1(1.f / 6));
    p = L::fmadd(p, r, L::set1(0.5f));
    p = L::fmadd(p, r, L::set1(1.f));
    p = L::fmadd(p, r, L::set1(1.f));
    return L::scale2(p, n);
}

// The largest of s[0:length]: a softmax's maximum, subtracted before exp_lanes.
inline float row_max(const float* s, int64_t length) {
    using L = Lanes;
    L::V top = L::set1(-INFINITY);
    int64_t t = 0;
    for (; t + L::N <= length; t += L::N) top = L::max(top, L::load(s + t));
    float m = L::max_of(top);
    for (; t < length; t++) m = s[t] > m ? s[t] : m;
    return m;
}

}  // namespace
