// e^x a vector at a time (lanes.h: AVX-512's 16 lanes or AVX2's 8), and a row's maximum before it, shared by the
// kit's native kernels.

#pragma once

#include <stdint.h>

#include <cmath>

#include "lanes.h"

namespace {

// e^x for x <= 0 (softmax scores minus their maximum, -|x| for a sigmoid): 2^(x log2 e) split into 2^n * 2^f,
// |f| <= 1/2, with 2^f from its Taylor series to the 7th power (relative error under 1e-8, below float's resolution)
// and 2^n applied by Lanes::scale2, which also takes very negative x to 0. A NaN stays NaN, as in PyTorch's
// softmax: the clamp's max returns its second operand where either is NaN, so x goes second.
inline Lanes::V exp_nonpositive(Lanes::V x) {
    using L = Lanes;
    const L::V t = L::mul(L::max(L::set1(-104.f), x), L::set1(1.44269504088896341f));
    const L::V n = L::round(t);
    const L::V f = L::sub(t, n);
    L::V p = L::set1(1.5252733804059841e-05f);
    p = L::fmadd(p, f, L::set1(1.5403530393381606e-04f));
    p = L::fmadd(p, f, L::set1(1.3333558146428441e-03f));
    p = L::fmadd(p, f, L::set1(9.6181291076284772e-03f));
    p = L::fmadd(p, f, L::set1(5.5504108664821580e-02f));
    p = L::fmadd(p, f, L::set1(2.4022650695910071e-01f));
    p = L::fmadd(p, f, L::set1(6.9314718055994531e-01f));
    p = L::fmadd(p, f, L::set1(1.f));
    return L::scale2(p, n);
}

// The largest of s[0:length]: a softmax's maximum, subtracted before exp_nonpositive.
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
