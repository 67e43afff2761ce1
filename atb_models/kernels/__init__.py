"""The compute kernels a model runs with, chosen once from its `Plan` and handed to the model, which hands each
layer its own: linear (kernels.linear), RMSNorm (kernels.norm), silu-and-multiply (kernels.activation), decode
attention and attention within segments (a prompt's, an image's: kernels.attention), how a decoder layer runs
(kernels.decoder_layer) and the vision tower's rotary and quick-GELU (kernels.vision). The kit's native CPU
library (kernels.native) backs the CPU ones for float32 and bfloat16 language models.

Everything a kernel keeps (a loaded library, gather buffers, a layer's packed view) belongs to its `Kernels`
object: two models in one process never share or overwrite each other's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atb_models.host import cpu_flags
from atb_models.kernels.activation import NativeSiluAndMul, SiluAndMul
from atb_models.kernels.attention import (CpuDecodeAttention, NativeDecodeAttention, SdpaDecodeAttention,
                                          SegmentAttention, segment_attention)
from atb_models.kernels.decoder_layer import LayerByLayer, NativeDecoderLayer
from atb_models.kernels.linear import (PLAIN_LINEAR, LinearKernel, cpu_kernel_choice, cpu_linear_kernel,
                                       has_bf16_inputs, linear_kernel, linear_library)
from atb_models.kernels.native import NativeLibrary
from atb_models.kernels.norm import NativeRMSNorm, RMSNormKernel
from atb_models.kernels.vision import NativeQuickGelu, NativeVisionRotary, QuickGelu, VisionRotary
from atb_models.kernels.w8a16 import TorchW8A16, w8a16_kernel


@dataclass(frozen=True)
class Kernels:
    """One model's kernels. The defaults are PyTorch's operators, right on every device."""

    linear: LinearKernel = PLAIN_LINEAR
    rms_norm: RMSNormKernel = field(default_factory=RMSNormKernel)
    silu_and_mul: SiluAndMul = field(default_factory=SiluAndMul)
    decode_attention: SdpaDecodeAttention = field(default_factory=SdpaDecodeAttention)
    attention: SegmentAttention = field(default_factory=SegmentAttention)  # within segments: the prompt's
    vision_attention: SegmentAttention = field(default_factory=SegmentAttention)  # within images and frames
    decoder_layer: LayerByLayer = field(default_factory=LayerByLayer)
    w8a16: TorchW8A16 = field(default_factory=TorchW8A16)  # weight-only int8 linears (kernels.w8a16)
    vision_rotary: VisionRotary = field(default_factory=VisionRotary)  # the vision tower's (kernels.vision)
    quick_gelu: QuickGelu = field(default_factory=QuickGelu)

    @classmethod
    def for_plan(cls, plan, choice: str | None = None) -> Kernels:
        """The fastest kernels for a plan's device and dtype. On the CPU `choice` (default $ATB_MODELS_CPU_LINEAR,
        see kernels.linear.cpu_kernel_choice) picks the linear; with "auto" or "panel" the kit's native library is
        loaded (built on first use) and runs the int8 (W8A16) linears whatever the dtype; for a float32 language
        model attention, norms, activation and whole decoder layers too; for a bfloat16 one its linears (bfloat16
        panels, kernels.linear.PanelLinear) and whole decoder layers' decode steps, while the operator-by-operator
        path (prefill) keeps PyTorch's bfloat16 operators but SiLU-and-multiply and attention: the kit's attention
        where the CPU has AVX512-BF16, the vision tower's too where it has no AMX (kernels.attention.segment_attention),
        and on a CPU with AMX-BF16 every bfloat16 product on AMX tiles (kernels.linear.bf16_amx_chosen).
        The vision tower's rotary and quick-GELU are native in either dtype wherever a library loaded.
        Where the library cannot be used (no AVX-512, no compiler, a failed build, a library that disagrees with its
        declaration) PyTorch's operators run, the reason logged; on a CPU with AVX2 but not AVX-512 a float32 model
        (both towers: kernels.linear.linear_library) gets the same kernels from the kit's AVX2 library
        (NativeLibrary.load_avx2), its int8 linears PyTorch's."""
        choice = cpu_kernel_choice(choice)
        if plan.kind != "cpu":
            return cls(linear=linear_kernel(plan, choice), w8a16=w8a16_kernel(plan))
        library = NativeLibrary.load() if choice in ("auto", "panel") else None
        linears = linear_library(choice, plan, library)
        linear = cpu_linear_kernel(choice, linears, bf16_inputs=has_bf16_inputs(plan))
        w8a16 = w8a16_kernel(plan, library)
        flags = cpu_flags()
        attention = {"attention": segment_attention(plan, library, flags),
                     "vision_attention": segment_attention(plan, library, flags, vision=True)}
        # float32: the AVX-512 library, or on a CPU without AVX-512 the AVX2 one (linear_library's choice)
        native = library if library is not None else linears
        # The vision tower's rotary and quick-GELU, in whichever dtype it runs, wherever a library loaded.
        vision = ({"vision_rotary": NativeVisionRotary(native), "quick_gelu": NativeQuickGelu(native)}
                  if native is not None else {})
        if native is not None and plan.llm_dtype == torch.float32:
            return cls(linear=linear, rms_norm=NativeRMSNorm(native), silu_and_mul=NativeSiluAndMul(native),
                       decode_attention=NativeDecodeAttention(native), decoder_layer=NativeDecoderLayer(native),
                       w8a16=w8a16, **attention, **vision)
        # bfloat16: the native decoder layer where the linear packs bfloat16 weights (its check passed)
        if plan.llm_dtype == torch.bfloat16 and library is not None and getattr(linear, "bf16_op", None) is not None:
            return cls(linear=linear, silu_and_mul=NativeSiluAndMul(library), decode_attention=CpuDecodeAttention(),
                       decoder_layer=NativeDecoderLayer(library), w8a16=w8a16, **attention, **vision)
        return cls(linear=linear, decode_attention=CpuDecodeAttention(), w8a16=w8a16, **attention, **vision)

    def describe(self) -> str:
        """One log line: which implementation each kernel is."""
        return (f"linear {self.linear.name}, RMSNorm {self.rms_norm.name}, silu-and-mul {self.silu_and_mul.name}, "
                f"decode attention {self.decode_attention.name}, prompt attention {self.attention.name}, vision "
                f"attention {self.vision_attention.name}, "
                f"decoder layers {self.decoder_layer.name}, int8 weights {self.w8a16.name}, vision rotary "
                f"{self.vision_rotary.name}, quick-GELU {self.quick_gelu.name}")
