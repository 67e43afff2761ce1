// One Qwen2 decoder layer's decode step as one call, and a decode step's whole stack of them, in either library
// (cpu_kernels.cpp's AVX-512 build, cpu_kernels_avx2.cpp's AVX2 one): the kernels between the linears are the
// headers below, written once over lanes.h's vector; the linears are the library's own layer_linear. In a decode
// step of a few rows the Python-level calls around each operator cost more than their work (measured in
// docs/PERFORMANCE.md).

#pragma once

#include <stdint.h>
#include <stdio.h>

#include "abi.h"
#include "activation.h"
#include "bf16.h"
#include "lanes.h"
#include "paged_decode_attention.h"
#include "rms_norm.h"

// How a weight or activation tensor is stored: kernels/native.py's FORMATS.
// FORMAT_INT8_TILES: int8 weights in the AMX-INT8 tiles' layout (w8a16_linear.h's atb_w8a16_tiles_linear_f32).
enum Format : int64_t { FORMAT_F32 = 0, FORMAT_INT8 = 1, FORMAT_BF16 = 2, FORMAT_INT8_TILES = 3 };

// One Qwen2 decoder layer as loaded: the four linears packed in groups of 64 output columns, each float32
// (panel_linear.h), bfloat16 (bf16_linear.h) or int8 (W8A16, with scales; w8a16_linear.h), bfloat16 and int8 in
// pairs of k-steps (kernels/linear.py's panel_layout and pair_layout); the norms' weights and the qkv bias in
// float32; the layer's KV cache in float32 or bfloat16. Declared for Python in kernels/native.py's STRUCTS, field
// for field.
struct LayerWeights {
    const float* input_norm;     // [hidden]
    const void* qkv;             // packed [(heads + 2 kv_heads) * head_dim / 64][hidden][64]
                                 // (bfloat16, int8: [..][hidden / 2][64][2]; int8 for tiles [..][2][hidden / 4][32][4])
    const float* qkv_bias;       // [(heads + 2 kv_heads) * head_dim]
    const void* o;               // packed [hidden / 64][heads * head_dim][64]
    const float* post_norm;      // [hidden]
    const void* gate_up;         // packed [2 intermediate / 64][hidden][64]: gate's columns, then up's
    const void* down;            // packed [hidden / 64][intermediate][64]
    void* k_cache;               // [blocks, kv_heads, block_size, head_dim] of kv_format
    void* v_cache;
    // Each linear's scales [out, groups] where its weights are int8, null otherwise.
    const float* qkv_scale;
    const float* o_scale;
    const float* gate_up_scale;
    const float* down_scale;
    int64_t qkv_groups, o_groups, gate_up_groups, down_groups;  // scale groups of each int8 linear
    int64_t qkv_format, o_format, gate_up_format, down_format;  // each linear's weights: a Format
    int64_t kv_format;           // the KV cache's: FORMAT_F32 or FORMAT_BF16
    int64_t hidden, heads, kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
};

// What every layer of one decode step shares: its sequences and rotary, and scratch for the layer's activations.
// Declared for Python in kernels/native.py's STRUCTS.
struct DecodeStep {
    int64_t rows;                 // sequences in the step, one new token each
    int64_t x_format;             // the residual stream's: FORMAT_F32, or FORMAT_BF16 (then read into `residual`)
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
    float* residual;              // [rows, hidden]: a bfloat16 residual stream in float32 through the layer
};

namespace {

// The library's own: y [rows, N] = x [rows, K] W^T + b by its kernel for the weights' format (a Format), where
// `bf16_model` says the residual stream is bfloat16 (see cpu_kernels.cpp's). Defined by the library's .cpp.
void layer_linear(int64_t rows, float* x, int64_t K, const void* weights, int64_t format, const float* scales,
                  int64_t groups, int64_t N, const float* bias, float* y, bool bf16_model);

}  // namespace

extern "C" {

// The library's account of itself, checked by Python at load (kernels/native.py):
// "version=V isa=ISA LayerWeights=BYTES DecodeStep=BYTES".
const char* atb_native_abi() {
    static char report[128];
    snprintf(report, sizeof report, "version=%d isa=%s LayerWeights=%zu DecodeStep=%zu", ATB_ABI_VERSION,
             Lanes::ISA, sizeof(LayerWeights), sizeof(DecodeStep));
    return report;
}

// x_io [rows, hidden], the residual stream (float32, or bfloat16 as x_format says), is updated in place:
// x += attention(norm(x)); x += mlp(norm(x)). The same operators, in the same order, as DecoderLayer.forward's
// operator-by-operator path, in float32 between the linears; a bfloat16 stream is read into float32 at the start
// and rounded back at the end.
void atb_decoder_layer_decode_f32(const LayerWeights* w, const DecodeStep* s, void* x_io) {
    const int64_t rows = s->rows, hidden = w->hidden, head_dim = w->head_dim;
    const int64_t q_width = w->heads * head_dim, qkv_width = (w->heads + 2 * w->kv_heads) * head_dim;
    const bool bf16_stream = s->x_format == FORMAT_BF16;
    float* x = bf16_stream ? s->residual : static_cast<float*>(x_io);
    if (bf16_stream) load_bf16_row(static_cast<const uint16_t*>(x_io), rows * hidden, x);
    atb_rms_norm_f32(x, nullptr, w->input_norm, rows, hidden, w->eps, nullptr, s->normed);
    layer_linear(rows, s->normed, hidden, w->qkv, w->qkv_format, w->qkv_scale, w->qkv_groups, qkv_width,
                 w->qkv_bias, s->qkv, bf16_stream);
    const float* k = s->qkv + q_width;
    const float* v = k + w->kv_heads * head_dim;
    if (w->kv_format == FORMAT_BF16)
        paged_decode_attention(s->qkv, qkv_width, k, qkv_width, v, qkv_width, s->cos, s->sin,
                               static_cast<uint16_t*>(w->k_cache), static_cast<uint16_t*>(w->v_cache),
                               s->block_tables, s->max_blocks, s->context_lens, rows, w->heads, w->kv_heads,
                               head_dim, w->block_size, w->scale, s->attention);
    else
        paged_decode_attention(s->qkv, qkv_width, k, qkv_width, v, qkv_width, s->cos, s->sin,
                               static_cast<float*>(w->k_cache), static_cast<float*>(w->v_cache), s->block_tables,
                               s->max_blocks, s->context_lens, rows, w->heads, w->kv_heads, head_dim,
                               w->block_size, w->scale, s->attention);
    layer_linear(rows, s->attention, q_width, w->o, w->o_format, w->o_scale, w->o_groups, hidden, nullptr,
                 s->projected, bf16_stream);
    // x += o; normed = norm(x) (the sum is written over x, each element after it is read).
    atb_rms_norm_f32(x, s->projected, w->post_norm, rows, hidden, w->eps, x, s->normed);
    layer_linear(rows, s->normed, hidden, w->gate_up, w->gate_up_format, w->gate_up_scale, w->gate_up_groups,
                 2 * w->intermediate, nullptr, s->gate_up, bf16_stream);
    atb_silu_and_mul_f32(s->gate_up, s->gate_up + w->intermediate, rows, w->intermediate, 2 * w->intermediate,
                         s->activated);
    layer_linear(rows, s->activated, w->intermediate, w->down, w->down_format, w->down_scale, w->down_groups, hidden,
                 nullptr, s->projected, bf16_stream);
    for (int64_t i = 0; i < rows * hidden; i++) x[i] += s->projected[i];
    if (bf16_stream) store_bf16(x, rows * hidden, static_cast<uint16_t*>(x_io));
}

// A decode step's layers[0:n] one after another, each as atb_decoder_layer_decode_f32 (a bfloat16 stream rounded
// back between them, as there), in one call: Python is not re-entered between the layers, where each visit found
// the interpreter's state evicted by the layer's weights streaming through the caches (docs/PERFORMANCE.md).
void atb_decoder_layers_decode_f32(const LayerWeights* const* layers, int64_t n, const DecodeStep* s, void* x_io) {
    for (int64_t i = 0; i < n; i++) atb_decoder_layer_decode_f32(layers[i], s, x_io);
}

}  // extern "C"
