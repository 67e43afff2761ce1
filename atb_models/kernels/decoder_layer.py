"""How a decoder layer runs: its own forward (operator by operator), or the kit's native decoder layer, which does
a whole Qwen2 decode step of a layer in one call (atb_models/csrc/decoder_layer.h)."""

from __future__ import annotations

import ctypes
import weakref

import torch

from atb_models import distributed
from atb_models.kernels.linear import PANEL_GROUP, packed_shape
from atb_models.kernels.native import FORMATS, INT8_TILES_FORMAT, kernel_name
from atb_models.kernels.w8a16 import TILE_STEPS, tile_shape
from atb_models.layers.sharding import ceil_div


class LayerByLayer:
    """The layer's own forward."""

    name = "operator by operator"

    def __call__(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
        return layer(x, cos, sin, ctx)

    def run_layers(self, layers, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx) -> torch.Tensor:
        """The decoder stack: each layer in turn, as __call__ runs it."""
        for layer in layers:
            x = self(layer, x, cos, sin, ctx)
        return x


class NativeDecoderLayer(LayerByLayer):
    """A Qwen2 decoder layer's (models.qwen2_vl.DecoderLayer's) whole decode step in one native call: the same kernels
    as the operator-by-operator path, without its ten-odd Python-level calls a layer. On a CPU with AVX-512 (or AVX2:
    the AVX2 library, which has no int8 linear), for a layer that holds all its heads (one rank: the kernel has no
    all-reduce), softmax in the activation dtype, one eps for both norms, and its four linears packed for the kit's
    kernels: float32 or bfloat16 panels (kernels.linear.PanelLinear) or int8 ones (W8A16, kernels.w8a16, each with its
    float32 scales). The residual stream and the KV cache are float32 or bfloat16; the arithmetic between the linears is
    float32 either way. In a bfloat16 model a linear's input is rounded to bfloat16 as PyTorch's bfloat16 path rounds
    it; a float32 model's bfloat16 panels (float32 weights that are bfloat16 values, kernels.linear.PanelLinear.pack)
    take it unrounded. Any other layer, and every prefill, runs its own forward.

    The layer is read through its parts (norm weights, packed linears, KV cache), once per KV cache it is given."""

    name = "native"

    def __init__(self, library):
        self._op = library.atb_decoder_layer_decode_f32
        self._layers_op = library.atb_decoder_layers_decode_f32
        self._layer_weights = library.structs["LayerWeights"]
        self._decode_step = library.structs["DecodeStep"]
        self._int8 = hasattr(library, "atb_w8a16_linear_f32")  # the library multiplies int8 (W8A16) weights
        self.name = kernel_name(self.name, library)
        self._weights = weakref.WeakKeyDictionary()  # layer -> (the KV cache they were made for, weights or None)
        self._stack = ((), None)  # the latest stack's weights, and the array of pointers to them

    @staticmethod
    def _step_suits(x: torch.Tensor, ctx) -> bool:
        """Whether the step is the kernel's case: a decode step of a contiguous float32 or bfloat16 stream."""
        return not ctx.is_prefill and x.dtype in STREAM_DTYPES and x.is_contiguous()

    def __call__(self, layer, x, cos, sin, ctx):
        if not self._step_suits(x, ctx):
            return layer(x, cos, sin, ctx)
        weights = self.weights_of(layer)
        if weights is None:
            return layer(x, cos, sin, ctx)
        self._op(weights, self._step_for(weights, x, cos, sin, ctx), x.data_ptr())  # x goes through in place
        return x

    def run_layers(self, layers, x, cos, sin, ctx):
        """A decode step's layers in one native call (atb_decoder_layers_decode_f32) where every one is the kernel's
        case, else layer by layer. After each layer's weights have streamed through the caches, Python's code and
        objects are read back from memory: in one call Python is entered once a step instead of once a layer
        (measured in docs/PERFORMANCE.md)."""
        if not self._step_suits(x, ctx):
            return super().run_layers(layers, x, cos, sin, ctx)
        weights = tuple(self.weights_of(layer) for layer in layers)
        if not weights or None in weights:
            return super().run_layers(layers, x, cos, sin, ctx)
        made_for, pointers = self._stack
        if len(made_for) != len(weights) or any(a is not b for a, b in zip(made_for, weights)):
            array = (ctypes.POINTER(self._layer_weights) * len(weights))(*map(ctypes.pointer, weights))
            pointers = ctypes.cast(array, ctypes.c_void_p)
            pointers.array = array  # the pointers live as long as their address is used
            self._stack = (weights, pointers)
        self._layers_op(pointers, len(weights), self._step_for(weights[0], x, cos, sin, ctx), x.data_ptr())
        return x

    def _step_for(self, weights, x, cos, sin, ctx):
        """The step's DecodeStep, made by the first layer that needs it (the layers share it)."""
        step = ctx.kernel_state.get("decoder_layer")
        if step is None:
            step = ctx.kernel_state["decoder_layer"] = self.step(weights, x, ctx.block_tables, ctx.context_lens,
                                                                 cos, sin)
        return step

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
                norms[0].weight, attn.qkv_proj.bias, norms[1].weight,
                tuple((linear.weight, getattr(linear, "weight_scale", None)) for linear in linears),
                layer.k_cache, layer.v_cache, layer.num_heads, layer.num_kv_heads, norms[0].eps, layer.scale)
        self._weights[layer] = (layer.k_cache, weights)
        return weights

    def pack_layer(self, input_norm, qkv_bias, post_norm, linears, k_cache, v_cache, heads: int, kv_heads: int,
                   eps: float, scale: float):
        """The struct LayerWeights for these tensors, or None where they are not the kernel's case. `linears`: the
        four (qkv, o, gate_up, down) as (packed weight, W8A16 scales [out, groups] or None); a linear with scales
        has int8 weights. The norms and the bias are read in float32 (copies kept with the struct where they are
        bfloat16); the rest is pointed to: the struct is right while the tensors are the layer's."""
        vectors = (input_norm, qkv_bias, post_norm)
        if any(t is None or t.device.type != "cpu" or t.dtype not in STREAM_DTYPES for t in vectors):
            return None
        if k_cache.dtype not in STREAM_DTYPES or v_cache.dtype != k_cache.dtype or k_cache.device.type != "cpu":
            return None
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return None
        hidden, head_dim = input_norm.shape[0], k_cache.shape[-1]
        weights, scales = zip(*linears)
        intermediate = weights[2].shape[0] * PANEL_GROUP // 2  # gate's columns and up's, in any layout
        if head_dim % 16:
            return None
        # Each linear's (out, in) as the heads and sizes say; scales [out, groups] with groups dividing in.
        sizes = (((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * intermediate, hidden),
                 (hidden, intermediate))
        formats = [_packed_format(w, s, out, inp) for (w, s), (out, inp) in zip(linears, sizes)]
        if None in formats or (not self._int8 and {FORMATS[torch.int8], INT8_TILES_FORMAT} & set(formats)):
            return None
        if qkv_bias.shape != (sizes[0][0],) or post_norm.shape != (hidden,):
            return None
        keep = [t.float().contiguous() for t in vectors]
        pointers = (keep[0], weights[0], keep[1], weights[1], keep[2], weights[2], weights[3], k_cache, v_cache)
        layer_weights = self._layer_weights(
            *(t.data_ptr() for t in pointers), *(None if s is None else s.data_ptr() for s in scales),
            *(0 if s is None else s.shape[1] for s in scales), *formats, FORMATS[k_cache.dtype], hidden, heads,
            kv_heads, head_dim, intermediate, k_cache.shape[2], eps, scale)
        layer_weights.keep = keep
        return layer_weights

    def step(self, layer_weights, x: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor):
        """The struct DecodeStep of the residual stream x's rows (one sequence each) for layers shaped like
        `layer_weights`, with its scratch. The tensors it points to live as long as it does."""
        lw, rows = layer_weights, x.shape[0]
        q_width = lw.heads * lw.head_dim
        widths = (lw.hidden, q_width + 2 * lw.kv_heads * lw.head_dim, q_width, lw.hidden, 2 * lw.intermediate,
                  lw.intermediate, lw.hidden)
        # The scratch in one tensor, each part from a 64-byte boundary: each tensor made in a step costs it 10-20 us,
        # its allocator's memory evicted by the weights (docs/PERFORMANCE.md).
        starts, floats = [], 0
        for width in widths:
            starts.append(floats)
            floats += ceil_div(rows * width, 16) * 16  # (16 floats: 64 bytes)
        scratch = torch.empty(floats, dtype=torch.float32)
        keep = [block_tables.contiguous(), context_lens.contiguous(), cos.float().contiguous(),
                sin.float().contiguous(), scratch]
        step = self._decode_step(rows, FORMATS[x.dtype], keep[0].data_ptr(), keep[0].shape[1],
                                 *(t.data_ptr() for t in keep[1:4]),
                                 *(scratch.data_ptr() + 4 * start for start in starts))
        step.keep = keep
        return step


STREAM_DTYPES = (torch.float32, torch.bfloat16)  # the residual stream's, the KV cache's, the norms'


def _packed_format(weight: torch.Tensor, scale, out: int, inp: int) -> int | None:
    """The library's format of a linear packed for its kernel with `out` x `inp` weights, or None where it is not
    packed so (kernels.linear.packed_shape: float32 or bfloat16 without scales, int8 with scales [out, groups],
    groups dividing in into even sizes; or int8 in kernels.w8a16's tile_layout, groups of multiples of 64), or not
    contiguous."""
    tiles = weight.dim() == 5
    shape = tile_shape(out, inp) if tiles else packed_shape(weight.dtype, out, inp)
    if weight.device.type != "cpu" or not weight.is_contiguous() or tuple(weight.shape) != shape:
        return None
    if scale is not None:  # int8 with its scales
        right = (weight.dtype == torch.int8 and scale.dtype == torch.float32 and scale.is_contiguous()
                 and scale.dim() == 2 and scale.shape[0] == out and inp % scale.shape[1] == 0
                 and (inp // scale.shape[1]) % (TILE_STEPS if tiles else 2) == 0)
    else:
        right = weight.dtype != torch.int8
    return (INT8_TILES_FORMAT if tiles else FORMATS[weight.dtype]) if right else None
