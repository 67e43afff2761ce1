// The AMX tiles in plain C++, for a test build of the AVX-512 library (-DATB_AMX_EMULATED: kernels/native.py builds
// it where ATB_MODELS_AMX_EMULATED=1): the kit's AMX kernels (amx_linear.h, w8a16_linear.h's tiles) run unchanged,
// each _tile_* intrinsic they use answered here, on a CPU without AMX. What it shows is the kernels' own logic (tile
// shapes, strides, layouts, which thread claims which columns, the switches around them); not the hardware's speed.
// TDPBF16PS adds in the order Intel's manual describes (and Bochs emulates): per output, the even and the odd
// products each chained by fused multiply-adds from zero over the instruction's k-steps, then their sum added to
// the destination; whether the kit's AMX CPU adds in just that order has not been checked (amx_linear.h), so no
// test expects the emulated sums to be the hardware's bit for bit.
//
// Each thread has its own eight tiles and configuration, as each core has. Where the hardware would fault (a
// configuration with reserved bits set or a tile with rows but no bytes, a tile used that is not configured, a
// product's shapes that do not fit or tiles that are not three different ones) the process stops with a message:
// a test that reaches it fails. Not emulated: a non-zero start row (faults here), and the hardware's refusal of a
// tile number that is not a constant (the real AMX build's compile shows that: tests/test_bf16_kernels.py).
//
// Included by amx_linear.h after <immintrin.h>: the intrinsics that are macros are redefined, the two that are
// functions (_tile_loadconfig, _tile_release) shadowed by macros for the code after this file.

#pragma once

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace amx_emulated {

constexpr int TILES = 8, MAX_ROWS = 16, ROW_BYTES = 64;

struct Tiles {
    bool configured = false;
    uint8_t rows[TILES] = {};
    uint16_t bytes[TILES] = {};  // bytes a row
    alignas(64) uint8_t data[TILES][MAX_ROWS * ROW_BYTES] = {};
};

inline thread_local Tiles tiles;

[[noreturn]] inline void fault(const char* what) {
    fprintf(stderr, "atb_models: emulated AMX: %s (the hardware would fault)\n", what);
    abort();
}

inline void release() { tiles = Tiles(); }

// LDTILECFG's 64 bytes: palette (byte 0), then each tile's bytes a row (16-bit, from byte 16) and rows (from 48).
inline void load_config(const void* config) {
    const uint8_t* c = static_cast<const uint8_t*>(config);
    if (c[0] == 0) {  // (palette 0: the tiles released)
        release();
        return;
    }
    if (c[0] != 1) fault("a palette other than 0 and 1");
    if (c[1] != 0) fault("a non-zero start row (not emulated)");
    for (int b = 2; b < 16; b++)
        if (c[b] != 0) fault("a reserved byte of the configuration set");
    for (int b = 16 + 2 * TILES; b < 48; b++)  // (tiles 8-15's bytes a row)
        if (c[b] != 0) fault("a tile past the eighth configured");
    for (int b = 48 + TILES; b < 64; b++)  // (their rows)
        if (c[b] != 0) fault("a tile past the eighth configured");
    Tiles& t = tiles;
    for (int i = 0; i < TILES; i++) {
        memcpy(&t.bytes[i], c + 16 + 2 * i, 2);
        t.rows[i] = c[48 + i];
        if (t.rows[i] > MAX_ROWS || t.bytes[i] > ROW_BYTES) fault("a tile larger than 16 x 64");
        if ((t.rows[i] == 0) != (t.bytes[i] == 0)) fault("a tile with rows but no bytes, or bytes but no rows");
    }
    memset(t.data, 0, sizeof t.data);
    t.configured = true;
}

inline uint8_t* tile(int i) {
    if (!tiles.configured) fault("a tile used before its configuration");
    if (i < 0 || i >= TILES || tiles.rows[i] == 0) fault("a tile that is not configured");
    if (tiles.bytes[i] % 4 != 0) fault("a tile whose bytes a row are not a multiple of 4");
    return tiles.data[i];
}

// Rows past a tile's configured rows, and bytes past its row's, read as zeros (TILELOADD zeroes them).
inline void load(int i, const void* base, int64_t stride) {
    uint8_t* t = tile(i);
    memset(t, 0, MAX_ROWS * ROW_BYTES);
    for (int r = 0; r < tiles.rows[i]; r++)
        memcpy(t + r * ROW_BYTES, static_cast<const uint8_t*>(base) + r * stride, tiles.bytes[i]);
}

inline void store(int i, void* base, int64_t stride) {
    const uint8_t* t = tile(i);
    for (int r = 0; r < tiles.rows[i]; r++)
        memcpy(static_cast<uint8_t*>(base) + r * stride, t + r * ROW_BYTES, tiles.bytes[i]);
}

inline void zero(int i) { memset(tile(i), 0, MAX_ROWS * ROW_BYTES); }

// A product's shapes: c rows x n lanes of 4 bytes += a (c's rows, k lanes of 4 bytes) . b (k rows, c's bytes a row);
// three different tiles.
inline void check_product(int c, int a, int b) {
    tile(c);
    tile(a);
    tile(b);
    if (c == a || c == b || a == b) fault("a product of tiles that are not three different ones");
    if (tiles.rows[a] != tiles.rows[c] || tiles.bytes[b] != tiles.bytes[c] || tiles.rows[b] != tiles.bytes[a] / 4)
        fault("tile shapes a product does not allow");
}

inline float flushed(float v) {  // (denormals as zeros: the tiles' DAZ on inputs, FTZ on sums)
    return fpclassify(v) == FP_SUBNORMAL ? copysignf(0.0f, v) : v;
}

inline float bf16_value(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float v;
    memcpy(&v, &wide, sizeof v);
    return flushed(v);
}

// TDPBF16PS: c[m][n] += (sum over k of a[m][2k] b[k][2n]) + (sum over k of a[m][2k + 1] b[k][2n + 1]), each sum a
// chain of fused multiply-adds from zero (the top of this file).
inline void dpbf16ps(int c, int a, int b) {
    check_product(c, a, b);
    float* sums = reinterpret_cast<float*>(tile(c));
    const uint16_t* x = reinterpret_cast<const uint16_t*>(tile(a));
    const uint16_t* w = reinterpret_cast<const uint16_t*>(tile(b));
    const int rows = tiles.rows[c], lanes = tiles.bytes[c] / 4, steps = tiles.bytes[a] / 4;
    for (int m = 0; m < rows; m++)
        for (int n = 0; n < lanes; n++) {
            float even = 0.0f, odd = 0.0f;
            for (int k = 0; k < steps; k++) {
                even = flushed(fmaf(bf16_value(x[m * 32 + 2 * k]), bf16_value(w[k * 32 + 2 * n]), even));
                odd = flushed(fmaf(bf16_value(x[m * 32 + 2 * k + 1]), bf16_value(w[k * 32 + 2 * n + 1]), odd));
            }
            sums[m * 16 + n] = flushed(sums[m * 16 + n] + flushed(even + odd));
        }
}

// TDPBSSD / TDPBUSD: c[m][n] += the four byte products of a[m]'s lane k and b[k]'s lane n over k, in int32's
// wrapping arithmetic; a's bytes signed or unsigned, b's signed.
template <bool SIGNED_A>
inline void dp_bytes(int c, int a, int b) {
    check_product(c, a, b);
    int32_t* sums = reinterpret_cast<int32_t*>(tile(c));
    const uint8_t* x = tile(a);
    const int8_t* w = reinterpret_cast<const int8_t*>(tile(b));
    const int rows = tiles.rows[c], lanes = tiles.bytes[c] / 4, steps = tiles.bytes[a] / 4;
    for (int m = 0; m < rows; m++)
        for (int n = 0; n < lanes; n++) {
            uint32_t s = static_cast<uint32_t>(sums[m * 16 + n]);
            for (int k = 0; k < steps; k++)
                for (int j = 0; j < 4; j++) {
                    const uint8_t byte = x[m * 64 + 4 * k + j];
                    const int32_t xa = SIGNED_A ? static_cast<int8_t>(byte) : byte;
                    s += static_cast<uint32_t>(xa * static_cast<int32_t>(w[k * 64 + 4 * n + j]));
                }
            sums[m * 16 + n] = static_cast<int32_t>(s);
        }
}

}  // namespace amx_emulated

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_dpbssd
#undef _tile_dpbusd
#define _tile_loadconfig(config) amx_emulated::load_config(config)
#define _tile_release() amx_emulated::release()
#define _tile_loadd(t, base, stride) amx_emulated::load(t, base, stride)
#define _tile_stored(t, base, stride) amx_emulated::store(t, base, stride)
#define _tile_zero(t) amx_emulated::zero(t)
#define _tile_dpbf16ps(c, a, b) amx_emulated::dpbf16ps(c, a, b)
#define _tile_dpbssd(c, a, b) amx_emulated::dp_bytes<true>(c, a, b)
#define _tile_dpbusd(c, a, b) amx_emulated::dp_bytes<false>(c, a, b)
