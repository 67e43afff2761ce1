// The kit's CPU kernels (AVX-512; float32 activations, float32 or int8 weights, int8 linears quantizing their
// inputs to int16 per block: w8a16_linear.h), one library: built with the
// machine's C++ compiler on first use and loaded with ctypes by atb_models/kernels/native.py, where its functions
// and structs are declared for Python (FUNCTIONS, STRUCTS); which of them run is atb_models/kernels' decision.
//
// Each header holds one kernel and its C entry point, called from Python one operator at a time. This file adds a
// whole decoder layer's decode step as one call: in a decode step of a few rows the Python-level calls around each
// operator cost more than their work (measured in docs/PERFORMANCE.md).

#include <stdint.h>
#include <stdio.h>

#include "activation.h"
#include "paged_decode_attention.h"
#include "panel_linear.h"
#include "rms_norm.h"
#include "w8a16_linear.h"

// One Qwen2 decoder layer as loaded: the four linears in the panel kernel's layout (kernels/linear.py's panel_layout),
// float32 or int8 (W8A16: a linear with scales), the norms' weights, the layer's KV cache. Declared for Python in
// kernels/native.py's STRUCTS, field for field.
struct LayerWeights {
    const float* input_norm;     // [hidden]
    const void* qkv;             // packed [(heads + 2 kv_heads) * head_dim / 64][hidden][64]
    const float* qkv_bias;       // [(heads + 2 kv_heads) * head_dim]
    const void* o;               // packed [hidden / 64][heads * head_dim][64]
    const float* post_norm;      // [hidden]
    const void* gate_up;         // packed [2 intermediate / 64][hidden][64]: gate's columns, then up's
    const void* down;            // packed [hidden / 64][intermediate][64]
    float* k_cache;              // [blocks, kv_heads, block_size, head_dim]
    float* v_cache;
    // Each linear's scales [out, groups] where its weights are int8 (w8a16_linear.h), null where they are float32.
    const float* qkv_scale;
    const float* o_scale;
    const float* gate_up_scale;
    const float* down_scale;
    int64_t qkv_groups, o_groups, gate_up_groups, down_groups;  // scale groups of each int8 linear
    int64_t hidden, heads, kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
};

// What every layer of one decode step shares: its sequences and rotary, and scratch for the layer's activations.
// Declared for Python in kernels/native.py's STRUCTS.
struct DecodeStep {
    int64_t rows;                 // sequences in the step, one new token each
    const int64_t* block_tables;  // [rows, max_blocks]
    int64_t max_blocks;
    const int64_t* context_lens;  // [rows], each counting the new token
    const float* cos;             // [rows, head_dim]
    const float* sin;
    float* normed;                // [rows, hidden]
    float* qkv;                   // [rows, (heads + 2 kv_heads) * head_dim]
    float* attention;             // [rows, heads * head_dim]
    float* projected;             // [rows, hidden]
    float* gate_up;               // [rows, 2 intermediate]
    float* activated;             // [rows, intermediate]
};

// Raised with kernels/native.py's ABI_VERSION whenever a signature or a struct changes.
#define ATB_ABI_VERSION 3

namespace {

// y [rows, N] = x [rows, K] W^T + b by the kernel for the weights' format: int8 where they have scales.
void layer_linear(const float* x, int64_t rows, int64_t K, const void* w, const float* scales, int64_t groups,
                  int64_t N, const float* bias, float* y) {
    if (scales)
        atb_w8a16_linear_f32(x, rows, K, K, static_cast<const int8_t*>(w), N, scales, groups, bias, y);
    else
        atb_panel_linear_f32(x, rows, K, K, static_cast<const float*>(w), N, bias, y);
}

}  // namespace

extern "C" {

// The library's account of itself, checked by Python at load: "version=V LayerWeights=BYTES DecodeStep=BYTES".
const char* atb_native_abi() {
    static char report[128];
    snprintf(report, sizeof report, "version=%d LayerWeights=%zu DecodeStep=%zu", ATB_ABI_VERSION,
             sizeof(LayerWeights), sizeof(DecodeStep));
    return report;
}

// x [rows, hidden], the residual stream, is updated in place: x += attention(norm(x)); x += mlp(norm(x)). The
// same operators, in the same order, as DecoderLayer.forward's operator-by-operator path.
void atb_decoder_layer_decode_f32(const LayerWeights* w, const DecodeStep* s, float* x) {
    const int64_t rows = s->rows, hidden = w->hidden, head_dim = w->head_dim;
    const int64_t q_width = w->heads * head_dim, qkv_width = (w->heads + 2 * w->kv_heads) * head_dim;
    atb_rms_norm_f32(x, nullptr, w->input_norm, rows, hidden, w->eps, nullptr, s->normed);
    layer_linear(s->normed, rows, hidden, w->qkv, w->qkv_scale, w->qkv_groups, qkv_width, w->qkv_bias, s->qkv);
    const float* k = s->qkv + q_width;
    atb_paged_decode_attention_f32(s->qkv, qkv_width, k, qkv_width, k + w->kv_heads * head_dim, qkv_width, s->cos,
                                   s->sin, w->k_cache, w->v_cache, s->block_tables, s->max_blocks, s->context_lens,
                                   rows, w->heads, w->kv_heads, head_dim, w->block_size, w->scale, s->attention);
    layer_linear(s->attention, rows, q_width, w->o, w->o_scale, w->o_groups, hidden, nullptr, s->projected);
    // x += o; normed = norm(x) (the sum is written over x, each element after it is read).
    atb_rms_norm_f32(x, s->projected, w->post_norm, rows, hidden, w->eps, x, s->normed);
    layer_linear(s->normed, rows, hidden, w->gate_up, w->gate_up_scale, w->gate_up_groups, 2 * w->intermediate,
                 nullptr, s->gate_up);
    atb_silu_and_mul_f32(s->gate_up, s->gate_up + w->intermediate, rows, w->intermediate, 2 * w->intermediate,
                         s->activated);
    layer_linear(s->activated, rows, w->intermediate, w->down, w->down_scale, w->down_groups, hidden, nullptr,
                 s->projected);
    for (int64_t i = 0; i < rows * hidden; i++) x[i] += s->projected[i];
}

}  // extern "C"
