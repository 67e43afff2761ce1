"""How a decoder layer runs: its own forward (operator by operator), or the kit's native decoder layer, which does
a whole Qwen2 decode step of a layer in one call (atb_models/csrc/cpu_kernels.cpp)."""

from __future__ import annotations

import weakref

import torch

from atb_models import distributed
from atb_models.kernels.linear import PANEL_GROUP


class LayerByLayer:
    """The layer's own forward."""

    name = "operator by operator"

    def __call__(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
        return layer(x, cos, sin, ctx)


class NativeDecoderLayer(LayerByLayer):
    """A Qwen2 decoder layer's (models.qwen2_vl.DecoderLayer's) whole decode step in one native call: the same
    kernels as the operator-by-operator path, without its ten-odd Python-level calls a layer. Float32 on an
    AVX-512 CPU, for a layer that holds all its heads (one rank: the kernel has no all-reduce), softmax in the
    activation dtype, one eps for both norms, and its four linears in the panel layout, float32 or int8 (W8A16,
    kernels.w8a16, each with its float32 scales); any other layer, and every prefill, runs its own forward.

    The layer is read through its parts (norm weights, packed linears, KV cache), once per KV cache it is given."""

    name = "native"

    def __init__(self, library):
        self._op = library.atb_decoder_layer_decode_f32
        self._layer_weights = library.structs["LayerWeights"]
        self._decode_step = library.structs["DecodeStep"]
        self._weights = weakref.WeakKeyDictionary()  # layer -> (the KV cache they were made for, weights or None)

    def __call__(self, layer, x, cos, sin, ctx):
        if ctx.is_prefill or x.dtype != torch.float32 or not x.is_contiguous():
            return layer(x, cos, sin, ctx)
        weights = self.weights_of(layer)
        if weights is None:
            return layer(x, cos, sin, ctx)
        step = ctx.kernel_state.get("decoder_layer")
        if step is None:
            step = ctx.kernel_state["decoder_layer"] = self.step(weights, x.shape[0], ctx.block_tables,
                                                                 ctx.context_lens, cos, sin)
        self._op(weights, step, x.data_ptr())  # the residual stream x goes through the layer in place
        return x

    def weights_of(self, layer):
        """The layer as the kernel reads it (made once, again if its KV cache is reallocated), or None where the
        layer is not the kernel's case. An int8 linear (W8A16) is one with a `weight_scale`."""
        made_for, weights = self._weights.get(layer, (None, None))
        if made_for is layer.k_cache and made_for is not None:
            return weights
        weights = None
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if distributed.tp_size() == 1 and not layer.upcast_attention and norms[0].eps == norms[1].eps:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            weights = self.pack_layer(
                norms[0].weight, attn.qkv_proj.weight, attn.qkv_proj.bias, attn.o_proj.weight, norms[1].weight,
                mlp.gate_up_proj.weight, mlp.down_proj.weight, layer.k_cache, layer.v_cache, layer.num_heads,
                layer.num_kv_heads, norms[0].eps, layer.scale,
                scales=tuple(getattr(linear, "weight_scale", None) for linear in linears))
        self._weights[layer] = (layer.k_cache, weights)
        return weights

    def pack_layer(self, input_norm, qkv, qkv_bias, o, post_norm, gate_up, down, k_cache, v_cache, heads: int,
                   kv_heads: int, eps: float, scale: float, scales=(None, None, None, None)):
        """The struct LayerWeights for these tensors, or None where they are not the kernel's case. `scales` are
        the four linears' (qkv, o, gate_up, down) W8A16 scales [out, groups], None for a float32 linear: a linear
        with scales has int8 weights (in kernels.w8a16's pair layout). It points into the tensors: it is right while they are
        the layer's."""
        linears = (qkv, o, gate_up, down)
        tensors = (input_norm, qkv_bias, post_norm, k_cache, v_cache,
                   *(w for w, s in zip(linears, scales) if s is None), *(s for s in scales if s is not None))
        if any(t is None or t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
               for t in tensors):
            return None
        if any(s is not None and (w.dtype != torch.int8 or not w.is_contiguous()) for w, s in zip(linears, scales)):
            return None
        hidden, head_dim = input_norm.shape[0], k_cache.shape[-1]
        intermediate = gate_up.shape[0] * PANEL_GROUP // 2  # gate's and up's columns, in either layout
        # Float32: [out / 64, in, 64] (kernels.linear.panel_layout); int8: [out / 64, in / 2, 64, 2]
        # (kernels.w8a16.pair_layout) with scales [out, groups], groups dividing in into even sizes; out and in as
        # the heads and sizes say.
        expected = ((qkv, (heads + 2 * kv_heads) * head_dim, hidden), (o, hidden, heads * head_dim),
                    (gate_up, 2 * intermediate, hidden), (down, hidden, intermediate))
        if head_dim % 16 or any(out % PANEL_GROUP or tuple(w.shape) != _packed_shape(out, inp, s)
                                for (w, out, inp), s in zip(expected, scales)):
            return None
        if any(s is not None and (s.dim() != 2 or s.shape[0] != out or inp % s.shape[1] or (inp // s.shape[1]) % 2)
               for s, (_, out, inp) in zip(scales, expected)):
            return None
        if qkv_bias.shape != ((heads + 2 * kv_heads) * head_dim,) or post_norm.shape != (hidden,):
            return None
        pointers = (input_norm, qkv, qkv_bias, o, post_norm, gate_up, down, k_cache, v_cache)
        return self._layer_weights(*(t.data_ptr() for t in pointers),
                                   *(None if s is None else s.data_ptr() for s in scales),
                                   *(0 if s is None else s.shape[1] for s in scales), hidden, heads, kv_heads,
                                   head_dim, intermediate, k_cache.shape[2], eps, scale)

    def step(self, layer_weights, rows: int, block_tables: torch.Tensor, context_lens: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor):
        """The struct DecodeStep of `rows` sequences for layers shaped like `layer_weights`, with its scratch. The
        tensors it points to live as long as it does."""
        lw = layer_weights
        q_width = lw.heads * lw.head_dim
        widths = (lw.hidden, q_width + 2 * lw.kv_heads * lw.head_dim, q_width, lw.hidden, 2 * lw.intermediate,
                  lw.intermediate)
        keep = [block_tables.contiguous(), context_lens.contiguous(), cos.float().contiguous(),
                sin.float().contiguous(), *(torch.empty(rows, width, dtype=torch.float32) for width in widths)]
        step = self._decode_step(rows, keep[0].data_ptr(), keep[0].shape[1], *(t.data_ptr() for t in keep[1:]))
        step.keep = keep
        return step


def _packed_shape(out_features: int, in_features: int, scale) -> tuple:
    """The shape a linear's packed weight has for the native layer: float32 (no scale) or int8."""
    if scale is None:
        return (out_features // PANEL_GROUP, in_features, PANEL_GROUP)
    return (out_features // PANEL_GROUP, in_features // 2, PANEL_GROUP, 2)
