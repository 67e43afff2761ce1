"""The matrix product behind every linear layer, y = x W^T + b, and the layout each kernel packs weights into.

F.linear everywhere (the vendor's GEMM on accelerators); on the CPU, oneDNN's linear or the kit's own panel kernels
(atb_models/csrc/panel_linear.h for float32 weights, bf16_linear.h for bfloat16 ones), chosen by
$ATB_MODELS_CPU_LINEAR (`cpu_kernel_choice`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from atb_models.errors import UserError
from atb_models.host import HugePages, empty_on_huge_pages, last_level_cache_bytes
from atb_models.kernels.native import NativeLibrary, kernel_name

logger = logging.getLogger("atb_models.kernels")

ONEDNN_MIN_WEIGHT_ELEMENTS = 256 * 1024
ONEDNN_PACK_ROWS = 16  # the row count oneDNN is told to lay packed weights out for (see OneDnnLinear.pack)
PANEL_GROUP = 64       # output columns per group of PanelLinear's layout (four AVX-512 registers of float32)
MAX_ROWS = 6           # rows of the native kernels' register blocks: decode's rows take one pass (csrc/panel_linear.h)
CPU_LINEAR_CHOICES = ("auto", "panel", "onednn", "torch")
# Rows from which a bfloat16 model's products go to oneDNN on unpacked weights where $ATB_MODELS_CPU_BF16_PREFILL asks
# for it (bf16_prefill_chosen: prefill, the vision tower); fewer (an LM head's in a decode step, say) would unpack a
# whole weight for a few rows' work.
ONEDNN_PREFILL_ROWS = 128
# Weights are unpacked for oneDNN a slice of column groups at a time, into a scratch of at most this many values
# (8 MB of bfloat16: it stays in the last-level cache for oneDNN to read, and a large LM head needs no copy of itself)
UNPACK_SLICE_ELEMENTS = 1 << 22


class LinearKernel:
    """F.linear: the vendor's GEMM on accelerators, and the CPU's fallback."""

    name = "torch"
    # The rows whose product streams the weights through once (None: no such bound known): past them a step's
    # cost grows with its rows; speculative decoding keeps its guesses within them (engine.scheduler).
    rows_per_pass: int | None = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The loaded weight in the layout this kernel reads fastest, or None to keep it as it is."""
        return None

    def pack_panels(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The loaded weight in panel_layout, whose rows can be read back (packed_rows), where this kernel streams
        it so; else None."""
        return None


class OneDnnLinear(LinearKernel):
    """oneDNN's linear on the CPU (the kernel PyTorch's own compiler uses for frozen CPU models). It beats the MKL
    GEMM F.linear calls for float32 at the small row counts of decoding, and more so on weights packed once into
    its blocked layout (`pack`) instead of re-laid out on every call; see docs/PERFORMANCE.md.

    oneDNN has no CPU float16 inner product, and its call overhead outweighs its speed on tiny matrices (the demo
    and test models): those stay on F.linear."""

    name = "onednn"

    def __init__(self, linear_op, reorder_op):
        self._linear = linear_op
        self._reorder = reorder_op

    def _suits(self, weight: torch.Tensor) -> bool:
        return weight.dtype != torch.float16 and weight.numel() >= ONEDNN_MIN_WEIGHT_ELEMENTS

    def __call__(self, x, weight, bias=None):
        if weight.is_mkldnn or self._suits(weight):
            return self._linear(x, weight, bias, "none", [], "")
        return super().__call__(x, weight, bias)

    def pack(self, weight):
        if self._reorder is None or not self._suits(weight):
            return None
        # The layout is chosen for ONEDNN_PACK_ROWS rows and stays right for any count (prefill included).
        return self._reorder(weight.contiguous(), ONEDNN_PACK_ROWS)


class PanelLinear(OneDnnLinear):
    """The kit's own kernels for the CPU (the AVX-512 library's, or on a CPU without AVX-512 the AVX2 one's): weights
    packed in groups of 64 output columns so that each thread reads one sequential stream, and the next weights streamed
    in while the current ones are multiplied, where oneDNN multiplies and streams in turn (docs/PERFORMANCE.md). Float32
    weights go to csrc/panel_linear.h (csrc/cpu_kernels_avx2.cpp's for the AVX2 build, both layouts); bfloat16 ones,
    where `bf16_op` (the library's atb_bf16_linear_f32) is given, to csrc/bf16_linear.h in groups too, each column's
    weights of two k-steps side by side (pair_layout), at half the bytes, widened to float32 in registers (products and
    sums in float32 on the input's values: a bfloat16 model's inputs are bfloat16 values, as PyTorch's bfloat16 linear
    takes them; for such inputs `bf16_dot_op`, atb_bf16_dot_linear_f32, adds each pair of k-steps in the order of
    AVX512-BF16's dot product and multiplies by it where the library has it and it measured faster, bf16_dot_chosen
    and bf16_dot_decode_chosen: batched rows at twice the float32 rate on AMD Zen 4;
    `bf16_rows_op`, atb_bf16_dot_linear_bf16, is the same product on bfloat16 rows into bfloat16 outputs, with no
    float32 copies of either: a bfloat16 model's prefill and vision tower, past the fused decode step). With
    `narrow_exact`, a float32 weight whose every value is a bfloat16 value (a bfloat16 checkpoint computed in float32)
    is packed as bfloat16 too: the same products, half the bytes to stream. Where the CPU has AMX, either model's
    products of bfloat16 weights run on its tiles instead (bf16_amx_chosen, f32_amx_chosen: csrc/amx_linear.h).
    With `unpack_op` (atb_bf16_unpack_pairs, where bf16_prefill_chosen says the user asked for it, for an AMX CPU's
    oneDNN), bfloat16 inputs of ONEDNN_PREFILL_ROWS rows or more go to oneDNN's bfloat16 linear on the weight unpacked,
    a slice of UNPACK_SLICE_ELEMENTS at a time, into a scratch buffer (one per thread), so that the weights are held
    once, in the decode step's layout. Weights it does not pack (another dtype, fewer than ONEDNN_MIN_WEIGHT_ELEMENTS,
    output size not a multiple of 64, a bfloat16 input size that is odd) go to oneDNN as before."""

    name = "panel"
    rows_per_pass = MAX_ROWS

    def __init__(self, native_op, linear_op, reorder_op, bf16_op=None, narrow_exact: bool = False,
                 bf16_dot_op=None, name: str = "panel", unpack_op=None, bf16_rows_op=None):
        super().__init__(linear_op, reorder_op)
        # "panel (AVX2)": the ops of the AVX2 library (kernels.native.NativeLibrary.load_avx2)
        self._native = native_op
        self.bf16_op = bf16_op
        self.narrow_exact = narrow_exact and bf16_op is not None
        # bfloat16 inputs (a bfloat16 model's) against bfloat16 weights: AVX512-BF16's dot product where the
        # library has it (atb_bf16_dot_linear_f32), else the widening kernel
        self.bf16_dot_op = bf16_dot_op or bf16_op
        self.bf16_rows_op = bf16_rows_op
        self.unpack_op = unpack_op if bf16_op is not None else None
        self._unpacked = threading.local()  # .buffer: this thread's scratch for unpacked weights
        self.pages = HugePages()  # where pack lays the panels, one after another
        self.name = name if self.unpack_op is None else f"{name}, bfloat16 from {ONEDNN_PREFILL_ROWS} rows by oneDNN"

    def __call__(self, x, weight, bias=None):
        """x [..., in] against a weight in panel_layout, on x's values: float32 out for float32 weights, x's dtype
        for bfloat16 ones."""
        if not is_panel_packed(weight):
            return super().__call__(x, weight, bias)
        bf16 = weight.dtype == torch.bfloat16
        groups, in_features = weight.shape[0], weight.shape[1] * (2 if bf16 else 1)
        out_features = groups * PANEL_GROUP
        if bf16 and x.dtype == torch.bfloat16:
            if self.unpack_op is not None and x.numel() >= ONEDNN_PREFILL_ROWS * in_features:
                return self._by_onednn(x, weight, bias)
            if self.bf16_rows_op is not None:
                return self._bf16_rows(x, weight, bias, in_features, out_features)
        op = (self.bf16_dot_op if x.dtype == torch.bfloat16 else self.bf16_op) if bf16 else self._native
        rows = x.reshape(-1, in_features)
        if rows.stride(-1) != 1 or rows.dtype != torch.float32:
            rows = rows.contiguous().float()
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
        if rows.shape[0]:
            op(rows.data_ptr(), rows.shape[0], in_features, rows.stride(0), weight.data_ptr(), out_features,
               None if bias is None else bias.data_ptr(), y.data_ptr())
        y = y.view(*x.shape[:-1], out_features)
        return y.to(x.dtype) if bf16 else y

    def _bf16_rows(self, x, weight, bias, in_features: int, out_features: int) -> torch.Tensor:
        """bf16_rows_op: bfloat16 rows in, bfloat16 sums out (the kernel reads a row's inputs in pairs, 32 bits at a
        time: rows that start off a 4-byte boundary are copied first)."""
        if x.shape[-1] != in_features:
            raise ValueError(f"inputs of {x.shape[-1]} features against a weight of {in_features}")
        rows = x.reshape(-1, in_features)
        if rows.stride(-1) != 1 or rows.stride(0) % 2 or rows.data_ptr() % 4:
            rows = rows.contiguous()
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        y = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
        if rows.shape[0]:
            self.bf16_rows_op(rows.data_ptr(), rows.shape[0], in_features, rows.stride(0), weight.data_ptr(),
                              out_features, None if bias is None else bias.data_ptr(), y.data_ptr())
        return y.view(*x.shape[:-1], out_features)

    def _by_onednn(self, x, weight, bias) -> torch.Tensor:
        """PyTorch's bfloat16 linear (oneDNN) on the weight unpacked a slice of column groups at a time."""
        groups, in_features = weight.shape[0], 2 * weight.shape[1]
        if bias is not None:
            bias = bias.to(x.dtype)
        per_slice = max(1, UNPACK_SLICE_ELEMENTS // (in_features * PANEL_GROUP))
        if groups <= per_slice:
            return F.linear(x, self.unpacked(weight).t(), bias)
        y = torch.empty(*x.shape[:-1], groups * PANEL_GROUP, dtype=x.dtype)
        for first in range(0, groups, per_slice):
            part = weight[first:first + per_slice]  # (contiguous: the groups lie one after another)
            columns = slice(first * PANEL_GROUP, (first + part.shape[0]) * PANEL_GROUP)
            y[..., columns] = F.linear(x, self.unpacked(part).t(), None if bias is None else bias[columns])
        return y

    def unpacked(self, weight: torch.Tensor) -> torch.Tensor:
        """W^T [in, out] of a bfloat16 panel weight, in this thread's scratch buffer (valid until its next call)."""
        groups, pairs = weight.shape[0], weight.shape[1]
        out_features, in_features = groups * PANEL_GROUP, 2 * pairs
        buffer = getattr(self._unpacked, "buffer", None)
        if buffer is None or buffer.numel() < weight.numel():
            buffer = self._unpacked.buffer = torch.empty(weight.numel(), dtype=torch.bfloat16)
        transposed = buffer[:weight.numel()].view(in_features, out_features)
        self.unpack_op(weight.data_ptr(), out_features, in_features, transposed.data_ptr())
        return transposed

    def pack(self, weight):
        panels = self.pack_panels(weight)
        return panels if panels is not None else super().pack(weight)

    def pack_panels(self, weight):
        packs = weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and self.bf16_op is not None)
        if not packs or not self._suits(weight) or packed_shape(weight.dtype, *weight.shape) is None:
            return None  # (bfloat16 panels pair the k-steps: an odd input size has none)
        if (weight.dtype == torch.float32 and self.narrow_exact and packed_shape(torch.bfloat16, *weight.shape)
                and holds_bf16_values(weight)):
            weight = weight.bfloat16()  # exact: every value keeps its bits
        return panel_layout(weight, self.pages)


def holds_bf16_values(weight: torch.Tensor) -> bool:
    """Whether every value of a float32 tensor is a bfloat16 value: the low 16 bits of each are zero."""
    return not torch.any(weight.contiguous().view(torch.int32) & 0xFFFF).item()


def panel_layout(weight: torch.Tensor, pages: HugePages | None = None) -> torch.Tensor:
    """The layout of PanelLinear's kernels, on huge pages where it can (packed_copy: the decode step streams it).
    float32 [out, in] -> [out / 64, in, 64]: group g, step k holds W[64g:64g+64, k]. bfloat16 (in even) ->
    pair_layout's [out / 64, in / 2, 64, 2]. out a multiple of PANEL_GROUP."""
    if weight.dtype != torch.float32:
        return pair_layout(weight, pages)
    out_features, in_features = weight.shape
    return packed_copy(weight.reshape(out_features // PANEL_GROUP, PANEL_GROUP, in_features).transpose(1, 2), pages)


def pair_layout(weight: torch.Tensor, pages: HugePages | None = None) -> torch.Tensor:
    """[out, in] -> [out / 64, in / 2, 64, 2] (out a multiple of PANEL_GROUP, in even): group g, pair p, column c
    holds W[64g + c, 2p : 2p + 2], the two weights a 32-bit lane of the kernels holds (bfloat16: the pair
    AVX512-BF16's dot product multiplies; int8: kernels.w8a16's). On huge pages where it can."""
    out_features, in_features = weight.shape
    return packed_copy(weight.reshape(out_features // PANEL_GROUP, PANEL_GROUP, in_features // 2, 2).transpose(1, 2),
                       pages)


def packed_copy(view: torch.Tensor, pages: HugePages | None = None) -> torch.Tensor:
    """A contiguous copy of a packing's strided view, on huge pages where it can: after the weights packed before it
    in `pages` (a kernel's, host.HugePages), or in a mapping of its own (host.empty_on_huge_pages)."""
    shape = tuple(view.shape)
    return (empty_on_huge_pages(shape, view.dtype) if pages is None else pages.empty(shape, view.dtype)).copy_(view)


def packed_shape(dtype: torch.dtype, out_features: int, in_features: int) -> tuple | None:
    """The shape of an [out, in] weight of `dtype` packed for the native kernels (panel_layout, pair_layout), or
    None where it has none: float32 [out / 64, in, 64]; bfloat16 and int8 in pairs of k-steps, [out / 64, in / 2,
    64, 2] (in even); out a multiple of PANEL_GROUP."""
    if out_features % PANEL_GROUP or dtype not in (torch.float32, torch.bfloat16, torch.int8):
        return None
    if dtype == torch.float32:
        return out_features // PANEL_GROUP, in_features, PANEL_GROUP
    return (out_features // PANEL_GROUP, in_features // 2, PANEL_GROUP, 2) if in_features % 2 == 0 else None


def is_panel_packed(weight: torch.Tensor | None) -> bool:
    """Whether a weight is in panel_layout (packed_shape's float32 or bfloat16 shape of some out, in)."""
    if weight is None or weight.is_mkldnn or weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() < 3:
        return False
    in_features = weight.shape[1] * (2 if weight.dtype == torch.bfloat16 else 1)
    return tuple(weight.shape) == packed_shape(weight.dtype, weight.shape[0] * PANEL_GROUP, in_features)


def packed_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (ids, any shape) of the [out, in] weight that panel_layout packed into `weight`, as [*rows.shape,
    in] of the packed dtype (the values themselves: packing moves them, a float32 weight narrowed to bfloat16 only
    where each value is one)."""
    flat = rows.reshape(-1)
    groups, columns = flat // PANEL_GROUP, flat % PANEL_GROUP
    if weight.dtype == torch.float32:  # [out / 64, in, 64]
        picked = weight[groups, :, columns]
    else:  # [out / 64, in / 2, 64, 2]
        picked = weight[groups, :, columns, :]
    return picked.reshape(*rows.shape, -1)


PLAIN_LINEAR = LinearKernel()


def cpu_kernel_choice(choice: str | None = None) -> str:
    """`choice`, else $ATB_MODELS_CPU_LINEAR, else "auto", checked: which CPU kernels run (linear_kernel says what
    each value means; the native kernels besides the linears follow "auto" and "panel")."""
    choice = choice or os.environ.get("ATB_MODELS_CPU_LINEAR") or "auto"
    if choice not in CPU_LINEAR_CHOICES:
        raise UserError(f"ATB_MODELS_CPU_LINEAR={choice!r}: expected one of {', '.join(CPU_LINEAR_CHOICES)}")
    return choice


def linear_kernel(plan, choice: str | None = None) -> LinearKernel:
    """The linear kernel for a plan's device: on the CPU by `choice` (cpu_linear_kernel, loading the kit's native
    library where the choice may use it), F.linear (the vendor's GEMM) on accelerators."""
    choice = cpu_kernel_choice(choice)
    if plan.kind != "cpu":
        return PLAIN_LINEAR
    library = NativeLibrary.load() if choice in ("auto", "panel") else None
    return cpu_linear_kernel(choice, linear_library(choice, plan, library), bf16_inputs=has_bf16_inputs(plan))


def linear_library(choice: str, plan, library):
    """The native library a CPU's linears take: `library` (NativeLibrary.load's AVX-512 build) where there is one;
    else, for a model without bfloat16 inputs and a choice that may use it, the AVX2 build (NativeLibrary.load_avx2:
    None on a CPU without AVX2)."""
    if library is not None or choice not in ("auto", "panel") or has_bf16_inputs(plan):
        return library
    return NativeLibrary.load_avx2()


def has_bf16_inputs(plan) -> bool:
    """Whether a plan's linears are given bfloat16 inputs (its language model or vision tower is bfloat16)."""
    return torch.bfloat16 in (plan.llm_dtype, plan.vision_dtype)


def cpu_linear_kernel(choice: str, library, bf16_inputs: bool = False) -> LinearKernel:
    """By `choice`: "auto" takes the kit's panel kernel where `library` (a kernels.native.NativeLibrary, its AVX-512
    build or the AVX2 one, or None) is there (packing float32 weights that hold bfloat16 values as bfloat16), else
    oneDNN where this build has a working one, else F.linear; "panel" (float32 weights kept float32) and "onednn" ask
    for one (falling back the same way when it is missing), "torch" is F.linear. With `bf16_inputs` (a bfloat16 model's)
    the panel kernel also gets the dot product's entry, which multiplies by the dot product where bf16_dot_chosen and
    bf16_dot_decode_chosen say so; a float32 model never gives its linears bfloat16 inputs, so it spares the
    measurements. Where the CPU has AMX, either model's products of bfloat16 weights
    run on its tiles (bf16_amx_chosen, f32_amx_chosen)."""
    if choice == "torch" or not torch.backends.mkldnn.is_available():
        return PLAIN_LINEAR
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if onednn is None:
        return PLAIN_LINEAR
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    # Some builds register the ops without a working kernel for this CPU.
    if not _runs(lambda: onednn(torch.ones(1, 2), torch.ones(3, 2), torch.zeros(3), "none", [], "")):
        return PLAIN_LINEAR
    if reorder is not None and not _runs(lambda: reorder(torch.ones(3, 2), ONEDNN_PACK_ROWS)):
        reorder = None
    if choice in ("auto", "panel") and library is not None and _panel_products_right(library.atb_panel_linear_f32):
        bf16_op = library.atb_bf16_linear_f32 if _bf16_products_right(library.atb_bf16_linear_f32) else None
        if library.isa == "avx2":  # nothing to measure: an AVX2 CPU's model is float32, its library has no switches
            return PanelLinear(library.atb_panel_linear_f32, onednn, reorder, bf16_op, narrow_exact=choice == "auto",
                               name=kernel_name("panel", library))
        stream_prefetch_chosen(library)
        f32_amx = False
        if bf16_op is not None:
            bf16_widening_chosen(library)  # batched rows' way, a float32 model's and a bfloat16 model's widened ones
            if choice == "auto" and not bf16_inputs:  # a float32 model whose weights may be narrowed
                f32_amx = f32_amx_chosen(library)
        dot_op = rows_op = unpack_op = None
        amx = False
        if bf16_inputs and bf16_op is not None:  # a bfloat16 model, whose bfloat16 weights the kit packs
            amx = bf16_amx_chosen(library)
            bf16_dot_chosen(library)
            bf16_dot_decode_chosen(library, tiles=amx)
            # Its float32 rows (where rows_op is missing) by the entry that adds a pair in vdpbf16ps's order, as the
            # fused decode step does, whatever the switches chose (the tiles, the dot product, the widening): so
            # that its sums do not depend on a measurement.
            dot_op = (library.atb_bf16_dot_linear_f32 if _bf16_products_right(library.atb_bf16_dot_linear_f32, rows=19)
                      else None)
            rows_op = (library.atb_bf16_dot_linear_bf16 if _bf16_rows_right(library.atb_bf16_dot_linear_bf16)
                       else None)
            unpack_op = library.atb_bf16_unpack_pairs if bf16_prefill_chosen(library) else None
        else:  # the bfloat16 switches go unread, but a bad value is bad input all the same
            for name, values in ((BF16_DOT_ENV, BF16_DOT_VALUES), (BF16_DOT_DECODE_ENV, BF16_DOT_DECODE_VALUES),
                                 (BF16_PREFILL_ENV, BF16_PREFILL_VALUES), (BF16_AMX_ENV, BF16_AMX_VALUES)):
                _pinned(name, *values)
        return PanelLinear(library.atb_panel_linear_f32, onednn, reorder, bf16_op, narrow_exact=choice == "auto",
                           bf16_dot_op=dot_op, unpack_op=unpack_op, bf16_rows_op=rows_op,
                           name="panel, bfloat16 on AMX tiles" if amx else F32_TILES_NAME if f32_amx else "panel")
    return OneDnnLinear(onednn, reorder)


def _panel_products_right(op) -> bool:
    """A wrong build must not reach the model: one small product against F.linear first."""
    kernel = PanelLinear(op, None, None)
    x, w, b = torch.randn(3, 40), torch.randn(2 * PANEL_GROUP, 40), torch.randn(2 * PANEL_GROUP)
    if torch.allclose(kernel(x, panel_layout(w), b), F.linear(x, w, b), atol=1e-4):
        return True
    logger.warning("the kit's panel linear kernel gave wrong products here: using oneDNN")
    return False


def _bf16_products_right(op, rows: int = 3) -> bool:
    """The same for a bfloat16 kernel (bfloat16 weights and rows, against F.linear in float32 on their values;
    `rows` past the register block's 6 for the dot product's own path), where a wrong one leaves bfloat16 weights to
    oneDNN (or, for the dot product, to the widening kernel)."""
    kernel = PanelLinear(None, None, None, op)
    x, w, b = _bf16_case(rows, 42)
    if torch.allclose(kernel(x.float(), panel_layout(w), b), F.linear(x.float(), w.float(), b), atol=1e-4):
        return True
    logger.warning("the kit's bfloat16 kernel %s gave wrong products here: not using it", getattr(op, "__name__", op))
    return False


def _bf16_case(rows: int, in_features: int) -> tuple:
    """A load check's product: bfloat16 rows x [rows, in_features], a bfloat16 weight of two column groups and a
    float32 bias, drawn in that order from seed 0."""
    generator = torch.Generator().manual_seed(0)
    x, w = (torch.randn(shape, generator=generator).bfloat16() for shape in ((rows, in_features),
                                                                           (2 * PANEL_GROUP, in_features)))
    return x, w, torch.randn(2 * PANEL_GROUP, generator=generator)


def _bf16_rows_right(op) -> bool:
    """The same for the kernel on bfloat16 rows and outputs (atb_bf16_dot_linear_bf16), at 3 rows (a decode pass)
    and at 19 (batched), within the outputs' bfloat16 rounding; a wrong one leaves such rows to the float32
    kernels."""
    generator = torch.Generator().manual_seed(0)
    w, b = torch.randn(2 * PANEL_GROUP, 42, generator=generator).bfloat16(), torch.randn(2 * PANEL_GROUP)
    packed = panel_layout(w)
    for rows in (3, 19):
        x = torch.randn(rows, 42, generator=generator).bfloat16()
        y = torch.full((rows, 2 * PANEL_GROUP), float("nan"), dtype=torch.bfloat16)
        op(x.data_ptr(), rows, 42, 42, packed.data_ptr(), 2 * PANEL_GROUP, b.data_ptr(), y.data_ptr())
        if not torch.allclose(y.float(), F.linear(x.float(), w.float(), b), rtol=1e-2, atol=1e-2):
            logger.warning("the kit's bfloat16 kernel on bfloat16 rows gave wrong products here: not using it")
            return False
    return True


# A float32 model's panel kernel where its bfloat16-valued weights (narrow_exact) multiply on the tiles
F32_TILES_NAME = "panel, bfloat16 weights on AMX tiles (float32 inputs in three parts)"
BF16_AMX_ENV = "ATB_MODELS_CPU_BF16_AMX"
BF16_AMX_VALUES = (("0", "1"), "1 (products of bfloat16 weights, and of int8 ones, on AMX tiles, where the CPU has "
                   "them) or 0 (on the vector kernels)")


def amx_tiles_allowed() -> bool:
    """Whether products may go on AMX tiles where the CPU has them: unless $ATB_MODELS_CPU_BF16_AMX=0 (the one
    switch for the tiles, which also stands a CPU with AMX in for one without)."""
    return _pinned(BF16_AMX_ENV, *BF16_AMX_VALUES) != "0"


_bf16_amx_decided: dict = {}  # the library's switch (its address) -> whether the tiles are on: once a process


def bf16_amx_chosen(library) -> bool:
    """Whether a bfloat16 model's products (every linear whose input size is a multiple of 32, at every row count)
    run on AMX tiles (csrc/amx_linear.h); the library is told (atb_bf16_use_amx). Where the CPU has AMX-BF16, Linux
    lets the process use the tiles and their products check right (_amx_products_right), they do unless
    $ATB_MODELS_CPU_BF16_AMX=0. The tiles add a pair's products in their own way, so a row's sums are not the
    vector kernels' (both within bfloat16's rounding of the exact sums): the choice is all or nothing, never by row
    count, so that a row's sums do not depend on its batch; and it is made once a process, by the first bfloat16
    model's load, since the switch is the library's and a later load must not change the sums of a model already
    serving (a later value that differs is logged and not followed). Decode's few rows gain nothing from the tiles
    (memory decides), prefill's many gain several times (docs/PERFORMANCE.md)."""
    return _tiles_chosen(library, "atb_bf16_use_amx", "a bfloat16 model's products", _amx_products_right)


def f32_amx_chosen(library) -> bool:
    """Whether a float32 model's products of bfloat16 weights (a bfloat16 checkpoint computed in float32, whose
    weights PanelLinear packs as bfloat16: every linear whose input size is a multiple of 32, at every row count) run
    on AMX tiles, each float32 input split in three bfloat16 parts whose products with the weights are exact
    (csrc/amx_linear.h): float32 products of the input as given, only summed in the tiles' order, not k order
    (closer to the exact sums than k order, measured). Chosen as bf16_amx_chosen chooses, by the same switch
    ($ATB_MODELS_CPU_BF16_AMX), once a process by the first float32 model's load, and told to the library
    (atb_f32_use_amx). Three parts cost three times the tiles' work, which the weights' one stream hides at decode's
    row counts (cpu-small's 24 layers' linears: one row as fast as the widening kernel, 16 rows 0.8x the tiles'
    earlier three passes; docs/PERFORMANCE.md)."""
    return _tiles_chosen(library, "atb_f32_use_amx", "a float32 model's products of bfloat16 weights",
                         _amx_f32_products_right)


def _tiles_chosen(library, switch: str, products: str, products_right) -> bool:
    """bf16_amx_chosen's and f32_amx_chosen's choice, made once a process for the library's `switch`."""
    forced = _pinned(BF16_AMX_ENV, *BF16_AMX_VALUES)
    use = getattr(library, switch)
    key = _switch_key(library, switch)
    if key in _bf16_amx_decided:
        on = _bf16_amx_decided[key]
        if forced is not None and (forced == "1") != on and (forced == "0" or library.atb_bf16_amx_available()):
            logger.warning("%s=%s is read once a process: %s stay %s AMX tiles, as the first such model of this "
                           "process has them", BF16_AMX_ENV, forced, products, "on" if on else "off")
        use(int(on))
        return on
    on = forced != "0" and bool(library.atb_bf16_amx_available())
    use(int(on))
    if on and not products_right(library):
        use(0)
        on = False
    _bf16_amx_decided[key] = on
    if on:
        logger.info("%s on AMX tiles", products)
    return on


def _switch_key(library, name: str):
    """What identifies a library's function `name` across its loads, for the choices measured or made once a
    process: the C function's address (the library object and `name` where it is not a loaded one)."""
    try:
        return ctypes.cast(getattr(library, name), ctypes.c_void_p).value
    except (ctypes.ArgumentError, TypeError):
        return library, name


def _amx_products_right(library, in_features: int = 96, rows: int = 40) -> bool:
    """A wrong build must not reach the model: the tiles' products on float32 and on bfloat16 rows against F.linear
    (within float32 sums' rounding, and bfloat16 outputs' rounding), and each row's sums the same, bit for bit, in a
    product of 1, 19 (a tile and a part) and 40 rows (two tiles and a part)."""
    x, w, b = _bf16_case(rows, in_features)
    x32, packed = x.float(), panel_layout(w)
    expected = F.linear(x32, w.float(), b)
    outputs = _at_row_counts(library.atb_bf16_dot_linear_f32, x32, packed, b, (1, 19, rows))
    y16, = _at_row_counts(library.atb_bf16_dot_linear_bf16, x, packed, b, (rows,), torch.bfloat16)
    if (torch.allclose(outputs[-1], expected, atol=1e-4) and torch.equal(y16, outputs[-1].bfloat16())
            and _rows_alike(outputs)):
        return True
    logger.warning("the kit's AMX kernel gave wrong products here: bfloat16 products stay on its vector kernels")
    return False


def _amx_f32_products_right(library, in_features: int = 96, rows: int = 40) -> bool:
    """The same for a float32 model's products on the tiles (atb_bf16_linear_f32 with float32 inputs of every
    size of value, split in three parts): within float32 sums' rounding of F.linear's in float64, and each row's sums
    the same, bit for bit, in a product of 1, 5, 19 (a tile and a part) and 40 rows (two tiles and a part)."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(2 * PANEL_GROUP, in_features, generator=generator).bfloat16()
    x = torch.randn(rows, in_features, generator=generator) * torch.logspace(-4, 4, in_features)
    b = torch.randn(2 * PANEL_GROUP, generator=generator)
    packed, expected = panel_layout(w), F.linear(x.double(), w.double(), b.double())
    outputs = _at_row_counts(library.atb_bf16_linear_f32, x, packed, b, (1, 5, 19, rows))
    scale = F.linear(x.double().abs(), w.double().abs(), b.double().abs())  # what float32 rounding is relative to
    if bool(((outputs[-1].double() - expected).abs() <= 1e-5 * scale).all()) and _rows_alike(outputs):
        return True
    logger.warning("the kit's AMX kernel gave wrong float32 products here: they stay on its vector kernels")
    return False


def _at_row_counts(op, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, counts: tuple,
                   dtype: torch.dtype = torch.float32) -> list:
    """A linear op's products of x's first `count` rows (x contiguous, in the op's input dtype) against a packed
    weight of two column groups, for each count, as `dtype` (the op's output dtype)."""
    outputs = []
    for count in counts:
        y = torch.full((count, 2 * PANEL_GROUP), float("nan"), dtype=dtype)
        op(x.data_ptr(), count, x.shape[1], x.shape[1], packed.data_ptr(), 2 * PANEL_GROUP, bias.data_ptr(),
           y.data_ptr())
        outputs.append(y)
    return outputs


def _rows_alike(outputs: list) -> bool:
    """Whether each row's sums are the same, bit for bit, in every one of _at_row_counts' products."""
    return all(torch.equal(y, outputs[-1][:len(y)]) for y in outputs[:-1])


BF16_DOT_ENV = "ATB_MODELS_CPU_BF16_DOT"
BF16_DOT_VALUES = (("0", "1"), "1 (use AVX512-BF16's dot product) or 0 (do not)")
# How much faster the dot product must measure to be chosen: a clear margin, so that timing noise does not make the
# choice differ from run to run where the two kernels are close (it changes the speed only: both give a row the same
# sums, csrc/bf16_linear.h).
BF16_DOT_GAIN = 1.25
_bf16_dot_measured: dict = {}  # the library's dot function (its address) -> (dot seconds, widening seconds)


def bf16_dot_chosen(library) -> bool:
    """Whether a bfloat16 model's batched products (more than 6 rows) take AVX512-BF16's dot product
    (atb_bf16_dot_linear_f32) instead of the widening kernel; the library is told (atb_bf16_use_dot). Where the
    build has it and its products check right: $ATB_MODELS_CPU_BF16_DOT=1 or 0 decides, else a measurement, once a
    process: the dot product must run BF16_DOT_GAIN times as fast. Which is faster is not a CPU flag: AMD Zen 4
    issues one 512-bit FMA a cycle and the dot product doubles its rate, an Intel Xeon issues two and measured the
    dot product slower (docs/PERFORMANCE.md)."""
    forced = _pinned(BF16_DOT_ENV, *BF16_DOT_VALUES)
    if not library.atb_bf16_dot_available() or forced == "0":
        library.atb_bf16_use_dot(0)
        return False
    library.atb_bf16_use_dot(1)
    if not _bf16_products_right(library.atb_bf16_dot_linear_f32, rows=19):
        library.atb_bf16_use_dot(0)
        return False
    if forced != "1":
        key = _switch_key(library, "atb_bf16_dot_linear_f32")
        if key not in _bf16_dot_measured:
            dot, widening = _time_bf16_products(library.atb_bf16_dot_linear_f32, _without_dot(library))
            _bf16_dot_measured[key] = dot, widening
            logger.info("bfloat16 products at 32 rows: AVX512-BF16 dot product %.0f us, widened to float32 %.0f us: "
                        "%s", dot * 1e6, widening * 1e6,
                        "the dot product" if dot * BF16_DOT_GAIN <= widening else "widened")
        dot, widening = _bf16_dot_measured[key]
        if dot * BF16_DOT_GAIN > widening:
            library.atb_bf16_use_dot(0)
            return False
    return True


BF16_DOT_DECODE_ENV = "ATB_MODELS_CPU_BF16_DOT_DECODE"
BF16_DOT_DECODE_VALUES = (tuple(str(rows) for rows in range(MAX_ROWS + 1)),
                          f"0 to {MAX_ROWS} (decode's products of up to that many rows by AVX512-BF16's dot product; "
                          "0: none)")
# How much faster the dot product must measure to be chosen for decode's rows: a margin over the timing's noise on
# weights evicted from the caches (about 5%), so that the choice does not flip from run to run where the two are
# alike (it changes the speed only: the sums are the same).
BF16_DOT_DECODE_GAIN = 1.05
_bf16_dot_decode_measured: dict = {}  # the library's switch (its address) -> (rows, whether prefetching)


def bf16_dot_decode_chosen(library, tiles: bool = False) -> int:
    """Up to how many rows (at most 6: decode's) a bfloat16 model's products run by AVX512-BF16's dot product
    instead of widening the weights, where the AMX tiles do not take them (atb_bf16_dot_linear_f32); the library is
    told (atb_bf16_dot_decode_rows), and whether those single passes prefetch in software
    (atb_bf16_dot_one_pass_prefetch). The sums are the same bit for bit (checked here at 1-6 rows first). Where the
    build has it: $ATB_MODELS_CPU_BF16_DOT_DECODE (0 to 6) decides (prefetching), else a measurement once a process
    (_measure_bf16_decode); not measured (0) where the AMX tiles take decode's products (`tiles`: bf16_amx_chosen),
    unless the variable asks.
    A decode step streams its weights, and the dot product reads a line with one instruction where the widening
    takes four, so a core's out-of-order window reaches farther ahead in the stream; but on an Intel Xeon vdpbf16ps
    issues on one port where FMAs issue on two, so more rows may compute slower. On the kit's Xeon with its tiles
    off, the 24 layers of a decode step took 0.91 of the widening's time at one row, 0.78 at four
    (docs/PERFORMANCE.md)."""
    forced = _pinned(BF16_DOT_DECODE_ENV, *BF16_DOT_DECODE_VALUES)
    rows, prefetch = library.atb_bf16_dot_decode_rows, library.atb_bf16_dot_one_pass_prefetch
    if not library.atb_bf16_dot_available() or forced == "0":
        return rows(0)
    if tiles and not forced:  # (nothing to check: the tiles take decode's products)
        prefetch(1)
        return rows(0)
    if not _dot_decode_alike(library):
        return rows(0)
    if forced:
        prefetch(1)
        return rows(int(forced))
    key = _switch_key(library, "atb_bf16_dot_decode_rows")
    if key not in _bf16_dot_decode_measured:
        _bf16_dot_decode_measured[key] = _measure_bf16_decode(library)
    chosen, prefetching = _bf16_dot_decode_measured[key]
    prefetch(int(prefetching))
    return rows(chosen)


def _measure_bf16_decode(library) -> tuple:
    """(rows, prefetching) for bf16_dot_decode_chosen: one row's product by the dot product with and without software
    prefetches against the widening's (_time_bf16_decode); where the faster of the two runs BF16_DOT_DECODE_GAIN
    times as fast, 6 rows the same way: 6 where it does there too, else 1; else 0."""
    with_prefetch, without, widened = _time_bf16_decode(library, 1, (1, 0))
    prefetching = with_prefetch <= without
    dot = min(with_prefetch, without)
    timings = [f"1 row: dot product {with_prefetch * 1e6:.0f} us with software prefetches, {without * 1e6:.0f} "
               f"without, widened {widened * 1e6:.0f}"]
    rows = 0
    if dot * BF16_DOT_DECODE_GAIN <= widened:
        dot, widened = _time_bf16_decode(library, MAX_ROWS, (int(prefetching),))
        timings.append(f"{MAX_ROWS} rows: dot product {dot * 1e6:.0f} us, widened {widened * 1e6:.0f}")
        rows = MAX_ROWS if dot * BF16_DOT_DECODE_GAIN <= widened else 1
    logger.info("bfloat16 rows against 16 MB of weights from memory, %s: %s", "; ".join(timings),
                f"the dot product up to {rows} row(s), {'' if prefetching else 'not '}prefetching" if rows
                else "widened")
    return rows, prefetching


def _dot_decode_alike(library, in_features: int = 42) -> bool:
    """A wrong build must not reach the model: the dot product's products of 1 to 6 rows (bfloat16 values; float32
    and bfloat16 outputs, atb_bf16_dot_linear_f32 and _bf16) against the widening's, bit for bit, and against
    F.linear. (42 k-steps: never the AMX tiles' product.)"""
    x, w, b = _bf16_case(MAX_ROWS, in_features)
    packed, counts = panel_layout(w), tuple(range(1, MAX_ROWS + 1))
    ways = []
    with _decode_switches_kept(library):
        for rows in (MAX_ROWS, 0):  # the dot product, widened
            library.atb_bf16_dot_decode_rows(rows)
            ways.append(_at_row_counts(library.atb_bf16_dot_linear_f32, x.float(), packed, b, counts)
                        + _at_row_counts(library.atb_bf16_dot_linear_bf16, x, packed, b, counts, torch.bfloat16))
    dot, widened = ways
    if (all(torch.equal(d, v) for d, v in zip(dot, widened)) and torch.equal(dot[-1], dot[MAX_ROWS - 1].bfloat16())
            and torch.allclose(dot[MAX_ROWS - 1], F.linear(x.float(), w.float(), b), atol=1e-4)):
        return True
    logger.warning("the kit's dot product gave decode's rows other sums than the widening here: they stay widened")
    return False


@contextlib.contextmanager
def _decode_switches_kept(library):
    """The library's switches of decode's dot product as they were before, whatever runs inside (a check or a
    measurement that sets them) and however it ends."""
    rows, prefetch = library.atb_bf16_dot_decode_rows(-1), library.atb_bf16_dot_one_pass_prefetch(-1)
    try:
        yield
    finally:
        library.atb_bf16_dot_decode_rows(rows)
        library.atb_bf16_dot_one_pass_prefetch(prefetch)


def _time_bf16_decode(library, rows: int, prefetches: tuple, repeats: int = 7) -> tuple:
    """The best seconds of `rows` rows' product by the dot product, prefetching in software or not as each of
    `prefetches` says, and widened (the last), alternating, each call on 16 MB of bfloat16 weights evicted from the
    caches first (atb_evict_from_caches), as a decode step meets its weights (4 MB measured the same ratio with twice
    the spread). (2000 k-steps, not a multiple of 32: never the AMX tiles' product.)"""
    product = _bf16_product(library.atb_bf16_dot_linear_f32, rows, calls=1, out_features=4096, in_features=2000,
                            evict=library.atb_evict_from_caches)

    def way(prefetch: int | None):
        def run() -> float:
            library.atb_bf16_dot_decode_rows(0 if prefetch is None else rows)
            library.atb_bf16_dot_one_pass_prefetch(1 if prefetch is None else prefetch)
            return product()
        return run
    with _decode_switches_kept(library):
        return _alternating([way(p) for p in prefetches] + [way(None)], repeats, min)


def _without_dot(library):
    """atb_bf16_dot_linear_f32 with the dot product off for the call: the widening a bfloat16 model's rows take in
    its place (in registers or in blocks, as bf16_widening_chosen chose; each pair in the dot product's order), the
    one to time it against."""
    def op(*args):
        library.atb_bf16_use_dot(0)
        try:
            library.atb_bf16_dot_linear_f32(*args)
        finally:
            library.atb_bf16_use_dot(1)
    return op


def _time_bf16_products(dot_op, widening_op, rows: int = 32, repeats: int = 7) -> tuple:
    """The best seconds of each op on `rows` rows against a 512x1008 bfloat16 weight (1 MB: the cache's, not
    memory's speed), alternating. (1008 k-steps, not a multiple of 32: never the AMX tiles' product.)"""
    return _alternating([_bf16_product(op, rows) for op in (dot_op, widening_op)], repeats, min)


def _bf16_product(op, rows: int, calls: int = 10, out_features: int = 512, in_features: int = 1008, evict=None):
    """A function running `calls` of a bfloat16 linear op on `rows` rows against an out_features x in_features
    bfloat16 weight (by default 1 MB: the cache's, not memory's speed), and returning the seconds of one; with
    `evict` (the library's atb_evict_from_caches) the weight is evicted from the caches before each call, untimed."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator).bfloat16().float()
    weight = panel_layout(torch.randn(out_features, in_features, generator=generator).bfloat16())
    y = torch.empty(rows, out_features)

    def run() -> float:
        seconds = 0.0
        for _ in range(calls):
            if evict is not None:
                evict(weight.data_ptr(), weight.numel() * weight.element_size())
            start = time.perf_counter()
            op(x.data_ptr(), rows, in_features, in_features, weight.data_ptr(), out_features, None, y.data_ptr())
            seconds += time.perf_counter() - start
        return seconds / calls
    return run


def _alternating(variants: list, rounds: int, statistic) -> tuple:
    """`statistic` of each variant's seconds (what each call returns) over `rounds`, the variants run in turn, the
    order flipping every round (this memory's speed drifts), after one untimed round."""
    times: list = [[] for _ in variants]
    for round_ in range(rounds + 1):
        for i in (range(len(variants)) if round_ % 2 == 0 else reversed(range(len(variants)))):
            seconds = variants[i]()
            if round_:
                times[i].append(seconds)
    return tuple(statistic(t) for t in times)


BF16_PREFILL_ENV = "ATB_MODELS_CPU_BF16_PREFILL"
BF16_PREFILL_VALUES = (("onednn", "kit"), f"onednn (a bfloat16 model's products of {ONEDNN_PREFILL_ROWS} rows or "
                       "more by oneDNN) or kit (by the kit's kernels)")


def bf16_prefill_chosen(library) -> bool:
    """Whether a bfloat16 model's products of ONEDNN_PREFILL_ROWS rows or more (prefill, the vision tower) go to
    oneDNN's bfloat16 linear on the weight unpacked into a scratch buffer (atb_bf16_unpack_pairs) instead of the
    kit's bfloat16 kernels: only where $ATB_MODELS_CPU_BF16_PREFILL=onednn asks for it (and the unpacking checks
    right). Where the CPU has AMX, oneDNN multiplies bfloat16 tiles at several times the vector rate; but its sums
    are not the kit kernels', rounded differently in the last bit now and then, so a prompt's tokens would depend on
    how many rows its product had: on what it was batched with and how much of it the prefix cache held. The kit's
    kernels give a row the same sums in any batch, so they stay the default. (On the kit's AMD EPYC, AVX512-BF16 and
    no AMX, oneDNN with the unpacking was the slower anyway: docs/PERFORMANCE.md.)"""
    if _pinned(BF16_PREFILL_ENV, *BF16_PREFILL_VALUES) != "onednn" or not _unpacks_right(library.atb_bf16_unpack_pairs):
        return False
    logger.info("a bfloat16 model's products of %d rows or more by oneDNN, as %s asks", ONEDNN_PREFILL_ROWS,
                BF16_PREFILL_ENV)
    return True


def _pinned(name: str, allowed: tuple, expected: str) -> str | None:
    """The value of the environment variable `name` where it is set (one of `allowed`), else None; any other value
    is bad input."""
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    if value not in allowed:
        raise UserError(f"{name}={value!r}: expected {expected}")
    return value


def _unpacks_right(op) -> bool:
    """A wrong build must not reach the model: one small weight unpacked against its transpose first."""
    weight = torch.randn(2 * PANEL_GROUP, 42, generator=torch.Generator().manual_seed(0)).bfloat16()
    packed, transposed = panel_layout(weight), torch.full((42, 2 * PANEL_GROUP), float("nan"), dtype=torch.bfloat16)
    op(packed.data_ptr(), 2 * PANEL_GROUP, 42, transposed.data_ptr())
    if torch.equal(transposed, weight.t()):
        return True
    logger.warning("the kit's bfloat16 unpacking gave wrong weights here: bfloat16 products stay on its kernels")
    return False


BF16_WIDENING_ENV = "ATB_MODELS_CPU_BF16_WIDEN"
_bf16_widening_measured: dict = {}  # the library's switch (its address) -> (seconds in registers, in blocks)


def bf16_widening_chosen(library) -> str:
    """How batched rows (more than 6) against bfloat16 panels widen the weights to float32, a float32 model's and a
    bfloat16 model's where the dot product and the tiles do not take them: "registers" (each pass of 6 rows widens
    again) or "blocks" (each K block once, into L1); the library is told
    (atb_bf16_widen_in_registers). The sums are the same bit for bit. $ATB_MODELS_CPU_BF16_WIDEN decides, else a
    measurement at 16 rows on weights evicted from the caches (_time_bf16_widening), once a process. Which is faster
    is not a CPU flag: on AMD Zen 4 the widening issues beside the FMAs and registers ran 1.2x as fast at 16 rows, on
    an Intel Xeon with AMX blocks 1.26x (docs/PERFORMANCE.md)."""
    forced = _pinned(BF16_WIDENING_ENV, ("registers", "blocks"),
                     "registers or blocks (how batched rows widen bfloat16 weights)")
    if not forced:
        key = _switch_key(library, "atb_bf16_widen_in_registers")
        if key not in _bf16_widening_measured:
            _bf16_widening_measured[key] = _time_bf16_widening(library)
            logger.info("bfloat16 weights widened for 16 rows: in registers %.0f us, in blocks %.0f us",
                        *(seconds * 1e6 for seconds in _bf16_widening_measured[key]))
        registers, blocks = _bf16_widening_measured[key]
        forced = "registers" if registers < blocks else "blocks"
    library.atb_bf16_widen_in_registers(int(forced == "registers"))
    return forced


def _time_bf16_widening(library, rows: int = 16, repeats: int = 7) -> tuple:
    """The best seconds of the widening kernel on `rows` rows widening in registers and in blocks, alternating, each
    call on 4 MB of weights evicted from the caches first (atb_evict_from_caches): a decode step streams its weights
    from memory, and what tells the two ways apart is how each overlaps that stream with its arithmetic. (On an
    Intel Xeon with AMX, 16 rows in registers took 0.91 of the blocks' time on weights in the caches and 1.27 on
    evicted ones, as on the 24 layers of a model: 1.26; docs/PERFORMANCE.md.)"""
    # (1008 k-steps, not a multiple of 32: never the AMX tiles' product, f32_amx_chosen)
    product = _bf16_product(library.atb_bf16_linear_f32, rows, calls=1, out_features=2048, in_features=1008,
                            evict=library.atb_evict_from_caches)

    def way(on: int):
        def run() -> float:
            library.atb_bf16_widen_in_registers(on)
            return product()
        return run
    return _alternating([way(1), way(0)], repeats, min)


STREAM_PREFETCH_ENV = "ATB_MODELS_CPU_PREFETCH"
_stream_prefetch_measured: dict = {}  # the library's setter (its address) -> (seconds with, seconds without)


def stream_prefetch_chosen(library) -> bool:
    """Whether decode's single passes over the weights (up to 6 rows, every native linear) prefetch their stream in
    software or leave it to the hardware prefetchers; the library is told (atb_use_stream_prefetch). The products
    are the same either way. $ATB_MODELS_CPU_PREFETCH=1 or 0 decides, else a measurement, once a process: off
    where one row's product streams faster without. Which is faster is not a CPU flag: the kernels were written
    with the prefetches on an Intel Xeon, and on an AMD EPYC (Zen 4) a decode step at batch 1 is faster without them
    (docs/PERFORMANCE.md)."""
    forced = _pinned(STREAM_PREFETCH_ENV, ("0", "1"),
                     "1 (decode's weight streams prefetch in software) or 0 (the hardware prefetchers alone)")
    if forced:
        return bool(library.atb_use_stream_prefetch(int(forced)))
    key = _switch_key(library, "atb_use_stream_prefetch")
    if key not in _stream_prefetch_measured:
        with_prefetch, without = _time_stream_prefetch(library)
        _stream_prefetch_measured[key] = with_prefetch, without
        logger.info("one row against %d MB of weights: %.2f ms with software prefetches, %.2f ms without: %s",
                    _stream_bytes() >> 20, with_prefetch * 1e3, without * 1e3,
                    "without" if without < with_prefetch else "with")
    with_prefetch, without = _stream_prefetch_measured[key]
    return bool(library.atb_use_stream_prefetch(int(with_prefetch <= without)))


def _stream_bytes() -> int:
    """Weight bytes of the prefetch measurement: twice the last-level cache (so the stream comes from memory), at
    least 64 MB and at most 256 MB."""
    return min(max(2 * last_level_cache_bytes(), 64 << 20), 256 << 20)


def _time_stream_prefetch(library, pairs: int = 7) -> tuple:
    """The median seconds of one row against _stream_bytes() of float32 panels with the stream prefetched and
    without, alternating (the order flipping every pair: this memory's speed drifts)."""
    in_features = 1024
    groups = _stream_bytes() // (in_features * PANEL_GROUP * 4)
    weight = empty_on_huge_pages((groups, in_features, PANEL_GROUP), torch.float32).fill_(0.5)
    x, y = torch.ones(in_features), torch.empty(groups * PANEL_GROUP)

    def way(on: int):
        def run() -> float:
            library.atb_use_stream_prefetch(on)
            start = time.perf_counter()
            library.atb_panel_linear_f32(x.data_ptr(), 1, in_features, in_features, weight.data_ptr(),
                                         groups * PANEL_GROUP, None, y.data_ptr())
            return time.perf_counter() - start
        return run
    return _alternating([way(1), way(0)], pairs, statistics.median)


def _runs(call) -> bool:
    try:
        call()
    except RuntimeError:
        return False
    return True
