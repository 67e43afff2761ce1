"""The matrix product behind every linear layer, y = x W^T + b, and the layout each kernel packs weights into.

F.linear everywhere (the vendor's GEMM on accelerators); on the CPU, oneDNN's linear or the kit's own panel kernels
(atb_models/csrc/panel_linear.h for float32 weights, bf16_linear.h for bfloat16 ones), chosen by
$ATB_MODELS_CPU_LINEAR (`cpu_kernel_choice`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from atb_models.errors import UserError
from atb_models.layers.sharding import ceil_div

logger = logging.getLogger("atb_models.kernels")

ONEDNN_MIN_WEIGHT_ELEMENTS = 256 * 1024
ONEDNN_PACK_ROWS = 16  # the row count oneDNN is told to lay packed weights out for (see OneDnnLinear.pack)
PANEL_GROUP = 64       # output columns per group of PanelLinear's layout (four AVX-512 registers of float32)
CPU_LINEAR_CHOICES = ("auto", "panel", "onednn", "torch")


class LinearKernel:
    """F.linear: the vendor's GEMM on accelerators, and the CPU's fallback."""

    name = "torch"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The loaded weight in the layout this kernel reads fastest, or None to keep it as it is."""
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


@dataclass(frozen=True)
class Bf16Product:
    """The native bfloat16 panel product this CPU runs (`bf16_product` chooses it): `op` is the library's
    atb_bf16_linear_dpbf16 where `dot` (AVX512-BF16's vdpbf16ps), else atb_bf16_linear_f32 (widened to float32)."""

    op: Callable
    dot: bool


class PanelLinear(OneDnnLinear):
    """The kit's own kernels for the CPU (AVX-512): weights packed in groups of 64 output columns so that each
    thread reads one sequential stream, and the next weights streamed in while the current ones are multiplied, where
    oneDNN multiplies and streams in turn (docs/PERFORMANCE.md). Float32 weights go to csrc/panel_linear.h; bfloat16
    ones, where `bf16` (a Bf16Product) is given, to csrc/bf16_linear.h, packed by pairs of input columns
    (`bf16_panel_layout`: half the bytes, products accumulated in float32, bfloat16 activations as PyTorch's
    bfloat16 linear takes them). Weights it does not pack (another dtype, fewer than ONEDNN_MIN_WEIGHT_ELEMENTS,
    output size not a multiple of 64) go to oneDNN as before."""

    name = "panel"

    def __init__(self, native_op, linear_op, reorder_op, bf16: Bf16Product | None = None):
        super().__init__(linear_op, reorder_op)
        self._native = native_op
        self.bf16 = bf16

    def __call__(self, x, weight, bias=None):
        if weight.dim() == 4:
            return self._bf16_product(x, weight, bias)
        if weight.dim() != 3:
            return super().__call__(x, weight, bias)
        groups, in_features, _ = weight.shape
        out_features = groups * PANEL_GROUP
        rows = x.reshape(-1, in_features)
        if rows.stride(-1) != 1 or rows.dtype != torch.float32:
            rows = rows.contiguous().float()
        y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
        if rows.shape[0]:
            self._native(rows.data_ptr(), rows.shape[0], in_features, rows.stride(0), weight.data_ptr(),
                         out_features, None if bias is None else bias.data_ptr(), y.data_ptr())
        return y.view(*x.shape[:-1], out_features)

    def _bf16_product(self, x, weight, bias):
        """x [..., in] against a bf16_panel_layout weight; returned in x's dtype."""
        groups, pairs = weight.shape[:2]
        in_features, out_features = x.shape[-1], groups * PANEL_GROUP
        if ceil_div(in_features, 2) != pairs:
            raise ValueError(f"input of {in_features} features against a weight packed for {2 * pairs}")
        rows = x.reshape(-1, in_features)
        if rows.stride(-1) != 1 or rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16).contiguous()
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
        if rows.shape[0]:
            self.bf16.op(rows.data_ptr(), rows.shape[0], in_features, rows.stride(0), weight.data_ptr(), out_features,
                         None if bias is None else bias.data_ptr(), y.data_ptr())
        return y.view(*x.shape[:-1], out_features).to(x.dtype)

    def pack(self, weight):
        if not self._suits(weight) or weight.shape[0] % PANEL_GROUP:
            return super().pack(weight)
        if weight.dtype == torch.float32:
            return panel_layout(weight)
        if weight.dtype == torch.bfloat16 and self.bf16 is not None:
            return bf16_panel_layout(weight)
        return super().pack(weight)


def panel_layout(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out / 64, in, 64]: group g, step k holds W[64g:64g+64, k] (out a multiple of PANEL_GROUP)."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // PANEL_GROUP, PANEL_GROUP, in_features).transpose(1, 2).contiguous()


def bf16_panel_layout(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] bfloat16 -> [out / 64, ceil(in / 2), 64, 2]: group g, pair-step p holds W[64g:64g+64, 2p:2p+2] (an
    odd in padded with a zero column; out a multiple of PANEL_GROUP)."""
    out_features, in_features = weight.shape
    if in_features % 2:
        weight = F.pad(weight, (0, 1))
    pairs = weight.shape[1] // 2
    return weight.reshape(out_features // PANEL_GROUP, PANEL_GROUP, pairs, 2).transpose(1, 2).contiguous()


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
    from atb_models.kernels.native import NativeLibrary

    return cpu_linear_kernel(choice, NativeLibrary.load() if choice in ("auto", "panel") else None)


def cpu_linear_kernel(choice: str, library) -> LinearKernel:
    """By `choice`: "auto" takes the kit's panel kernel where `library` (a kernels.native.NativeLibrary, or None)
    is there, else oneDNN where this build has a working one, else F.linear; "panel" and "onednn" ask for one
    (falling back the same way when it is missing), "torch" is F.linear."""
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
        return PanelLinear(library.atb_panel_linear_f32, onednn, reorder, bf16_product(library))
    return OneDnnLinear(onednn, reorder)


def bf16_product(library) -> Bf16Product | None:
    """The bfloat16 panel product for this CPU, by its flags (library.cpu_flags): AVX512-BF16's dot products where
    it has them, else weights widened to float32 (any AVX-512F CPU); each checked on a small product before use.
    None where neither multiplies right (bfloat16 weights then stay on oneDNN)."""
    candidates = [Bf16Product(library.atb_bf16_linear_f32, dot=False)]
    if "avx512_bf16" in library.cpu_flags:
        candidates.insert(0, Bf16Product(library.atb_bf16_linear_dpbf16, dot=True))
    for product in candidates:
        if _bf16_products_right(product):
            return product
        logger.warning("the kit's bfloat16 panel kernel (%s) gave wrong products here",
                       "AVX512-BF16 dot products" if product.dot else "widened to float32")
    return None


def _panel_products_right(op) -> bool:
    """A wrong build must not reach the model: one small product against F.linear first."""
    kernel = PanelLinear(op, None, None)
    x, w, b = torch.randn(3, 40), torch.randn(2 * PANEL_GROUP, 40), torch.randn(2 * PANEL_GROUP)
    if torch.allclose(kernel(x, panel_layout(w), b), F.linear(x, w, b), atol=1e-4):
        return True
    logger.warning("the kit's panel linear kernel gave wrong products here: using oneDNN")
    return False


def _bf16_products_right(product: Bf16Product) -> bool:
    """One small product (an odd input size: the padded pair) against F.linear in float32 on the same values."""
    kernel = PanelLinear(None, None, None, product)
    generator = torch.Generator().manual_seed(0)
    x, w = (torch.randn(shape, generator=generator).bfloat16() for shape in ((3, 41), (2 * PANEL_GROUP, 41)))
    b = torch.randn(2 * PANEL_GROUP, generator=generator)
    got = kernel(x.float(), bf16_panel_layout(w), b)
    return torch.allclose(got, F.linear(x.float(), w.float(), b), atol=1e-4)


def _runs(call) -> bool:
    try:
        call()
    except RuntimeError:
        return False
    return True
