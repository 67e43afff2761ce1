// The kit's CPU kernels for an AVX-512 CPU (float32 arithmetic; float32, bfloat16 or int8 weights: int8 linears
// quantize their inputs to int16 per block, w8a16_linear.h; bfloat16 attention by AVX512-BF16's dot product where
// the CPU has it, bf16_attention.h), one library: built with the machine's C++ compiler on first use and loaded
// with ctypes by atb_models/kernels/native.py, where its functions and structs are declared for Python (FUNCTIONS,
// STRUCTS); which of them run is atb_models/kernels' decision.
//
// Each header holds one kernel and its C entry point, called from Python one operator at a time; decoder_layer.h
// adds a whole decoder layer's decode step as one call, over this file's layer_linear.

#include <stdint.h>

#include "bf16.h"
#include "bf16_attention.h"
#include "bf16_linear.h"
#include "decoder_layer.h"
#include "panel_linear.h"
#include "vision.h"
#include "w8a16_linear.h"

namespace {

// y [rows, N] = x [rows, K] W^T + b by the kernel for the weights' format. In a bfloat16 model (`bf16_model`: its
// residual stream is bfloat16) a bfloat16 linear's input (the layer's scratch, read by this linear alone) is first
// rounded to bfloat16 values, as PyTorch's bfloat16 linear is given it (and multiplied by AVX512-BF16's dot
// product where the build has it: bf16_linear.h); a float32 model's bfloat16 weights (exact bfloat16 values of a
// float32 weight) take the float32 input as it is.
void layer_linear(int64_t rows, float* x, int64_t K, const void* weights, int64_t format, const float* scales,
                  int64_t groups, int64_t N, const float* bias, float* y, bool bf16_model) {
    if (format == FORMAT_INT8) {
        atb_w8a16_linear_f32(x, rows, K, K, static_cast<const int8_t*>(weights), N, scales, groups, bias, y);
    } else if (format == FORMAT_INT8_TILES) {
        atb_w8a16_tiles_linear_f32(x, rows, K, K, static_cast<const int8_t*>(weights), N, scales, groups, bias, y);
    } else if (format == FORMAT_BF16) {
        if (bf16_model) {
            round_to_bf16_values(x, rows * K);
            atb_bf16_dot_linear_f32(x, rows, K, K, static_cast<const uint16_t*>(weights), N, bias, y);
        } else {
            atb_bf16_linear_f32(x, rows, K, K, static_cast<const uint16_t*>(weights), N, bias, y);
        }
    } else {
        atb_panel_linear_f32(x, rows, K, K, static_cast<const float*>(weights), N, bias, y);
    }
}

}  // namespace

