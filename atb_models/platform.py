"""Device, distributed backend and dtypes: decided here, once, and passed down as a `Plan`.

This is the only module that asks which hardware it runs on, and the only one that imports torch_npu (and only when
it is installed). Everything else receives a `Plan` and uses `plan.device`, `plan.llm_dtype`, `plan.vision_dtype`.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from atb_models.errors import UserError

logger = logging.getLogger("atb_models.platform")

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")

# The names a checkpoint's config.json may give its torch_dtype.
_CHECKPOINT_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
_LACK_HINTS = {
    ("cpu", torch.bfloat16): "needs AVX512-BF16 or AMX",
    ("cpu", torch.float16): "needs AVX512-FP16 or AMX-FP16",
    ("cuda", torch.bfloat16): "needs compute capability 8.0+",
    ("npu", torch.bfloat16): "910A/310P family",
}

# x86 CPU flags that mean fast matrix products in that dtype (oneDNN uses them).
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_CPU_FP16_FLAGS = ("avx512_fp16", "amx_fp16")

# Ascend SoC versions 100-205 are the 910A and 310P families: no bf16 (MindIE's NPUSocInfo.support_bf16).
_NPU_NO_BF16_SOCS = range(100, 206)
_NPU_NO_BF16_NAMES = ("910A", "310P")


@dataclass(frozen=True)
class Capabilities:
    """What a device can do. Tests build these by hand to simulate hardware."""

    kind: str            # "cpu" | "cuda" | "npu"
    name: str            # e.g. "AMD EPYC (avx512_bf16)", "NVIDIA H100", "Ascend910B"
    native_bf16: bool    # fast bf16 matrix products
    native_fp16: bool    # fast fp16 matrix products
    device_count: int

    def runs_natively(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            return self.native_bf16
        if dtype == torch.float16:
            return self.native_fp16
        return True


# ---------------------------------------------------------------------------------------------------------- probing

def _import_torch_npu() -> ModuleType | None:
    if importlib.util.find_spec("torch_npu") is None:
        return None
    return importlib.import_module("torch_npu")


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo_field(cpuinfo: str, key: str) -> str:
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return ""


def cpu_capabilities(cpuinfo: str) -> Capabilities:
    """Parse /proc/cpuinfo text: the first processor's model name and flags."""
    flags = set(_cpuinfo_field(cpuinfo, "flags").split())
    model = _cpuinfo_field(cpuinfo, "model name") or "unknown CPU"
    matrix_flags = [f for f in _CPU_BF16_FLAGS + _CPU_FP16_FLAGS if f in flags]
    name = f"{model} ({', '.join(matrix_flags)})" if matrix_flags else model
    return Capabilities(
        kind="cpu",
        name=name,
        native_bf16=any(f in flags for f in _CPU_BF16_FLAGS),
        native_fp16=any(f in flags for f in _CPU_FP16_FLAGS),
        device_count=1,
    )


def _cuda_capabilities() -> Capabilities:
    props = torch.cuda.get_device_properties(0)
    # ROCm GPUs all run bf16; on CUDA it is native from Ampere (compute capability 8.0) on. Before that,
    # torch.cuda.is_bf16_supported() also says yes, but only by emulation.
    native_bf16 = bool(torch.version.hip) or props.major >= 8
    return Capabilities(kind="cuda", name=torch.cuda.get_device_name(0), native_bf16=native_bf16,
                        native_fp16=True, device_count=torch.cuda.device_count())


def _npu_capabilities() -> Capabilities:
    torch_npu = _import_torch_npu()
    if torch_npu is None:
        raise UserError("--device npu: torch_npu is not installed")
    name = torch_npu.npu.get_device_name(0)
    soc_version = torch_npu.npu.get_soc_version()
    no_bf16 = soc_version in _NPU_NO_BF16_SOCS or any(n in name for n in _NPU_NO_BF16_NAMES)
    return Capabilities(kind="npu", name=name, native_bf16=not no_bf16, native_fp16=True,
                        device_count=torch_npu.npu.device_count())


def probe(kind: str) -> Capabilities:
    """What the first device of `kind` on this machine can do."""
    if kind == "cpu":
        return cpu_capabilities(read_cpuinfo())
    if kind == "cuda":
        return _cuda_capabilities()
    if kind == "npu":
        return _npu_capabilities()
    raise ValueError(f"unknown device kind {kind!r}")


def _npu_device_count() -> int:
    torch_npu = _import_torch_npu()
    if torch_npu is None or not torch_npu.npu.is_available():
        return 0
    return torch_npu.npu.device_count()


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{flag} {value}: unknown value; choose one of {', '.join(choices)}")


def detect_device_kind(requested: str = "auto") -> str:
    """`--device` to a kind present on this machine: auto prefers npu, then cuda, then cpu."""
    _check_choice("--device", requested, DEVICE_CHOICES)
    if requested in ("auto", "npu") and _npu_device_count() > 0:
        return "npu"
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if requested == "npu":
        why = "torch_npu is not installed" if importlib.util.find_spec("torch_npu") is None \
            else "torch_npu reports no device; check ASCEND_RT_VISIBLE_DEVICES and the driver"
        raise UserError(f"--device npu: no Ascend NPU is visible ({why})")
    if requested == "cuda":
        why = "this torch is a CPU build" if torch.version.cuda is None and torch.version.hip is None \
            else "torch.cuda.is_available() is False; check CUDA_VISIBLE_DEVICES and the driver"
        raise UserError(f"--device cuda: no CUDA device is visible ({why})")
    return "cpu"


# ------------------------------------------------------------------------------------------------------------ plan

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Plan:
    """Where and in which dtypes this rank computes, and why."""

    kind: str                  # "cpu" | "cuda" | "npu"
    index: int | None          # LOCAL_RANK on cuda/npu, None on cpu
    device_name: str           # Capabilities.name, for the log line
    dist_backend: str          # "hccl" | "nccl" | "gloo"
    llm_dtype: torch.dtype     # weights/activations of the language model and the KV cache
    vision_dtype: torch.dtype  # the vision tower
    upcast_attention: bool     # attention softmax in float32 (the language model runs in float16)
    reason: str                # why these dtypes

    @property
    def device(self) -> torch.device:
        if self.kind == "npu":
            _import_torch_npu()  # registers the "npu" device type with torch
        return torch.device(self.kind, self.index)

    def describe(self) -> str:
        """One log line: device, backend, dtypes and why."""
        where = self.kind if self.index is None else f"{self.kind}:{self.index}"
        llm = _dtype_name(self.llm_dtype) + (" (float32 softmax)" if self.upcast_attention else "")
        return (f"device {where} ({self.device_name}), backend {self.dist_backend}, "
                f"language model {llm}, vision {_dtype_name(self.vision_dtype)}: {self.reason}")

    def make_current(self) -> None:
        """Make this rank's device the current one (before creating a process group or allocating)."""
        if self.kind == "cuda":
            torch.cuda.set_device(self.index)
        elif self.kind == "npu":
            _import_torch_npu().npu.set_device(self.index)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing)."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.index)
        elif self.kind == "npu":
            _import_torch_npu().npu.synchronize(self.index)


ONEDNN_MIN_WEIGHT_ELEMENTS = 256 * 1024
ONEDNN_PACK_ROWS = 16  # the row count oneDNN is told to lay packed weights out for (see OneDnnLinear.pack)
PANEL_GROUP = 64       # output columns per group of PanelLinear's layout (four AVX-512 registers of float32)


class LinearKernel:
    """The matrix product behind every linear layer, y = x W^T + b: F.linear, the vendor's GEMM on accelerators."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        import torch.nn.functional as F

        return F.linear(x, weight, bias)

    def pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The loaded weight in the layout this kernel reads fastest, or None to keep it as it is."""
        return None


class OneDnnLinear(LinearKernel):
    """oneDNN's linear on the CPU (the kernel PyTorch's own compiler uses for frozen CPU models). It runs 2-3x
    faster than the MKL GEMM F.linear calls for float32 at the small row counts of decoding (1-64 rows), and
    another 1.3-1.6x faster on weights packed once into its blocked layout (`pack`) instead of re-laid out on
    every call; measured on this kit's shapes, see docs/PERFORMANCE.md.

    oneDNN has no CPU float16 inner product, and its call overhead (~15 us) outweighs its speed on tiny matrices
    (the demo and test models): those stay on F.linear."""

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
    """The kit's own float32 kernel for the CPU (atb_models/csrc/panel_linear.h, AVX-512): weights packed in
    groups of 64 output columns so that each thread reads one sequential stream, and the next weights streamed in
    while the current ones are multiplied. At the 16 rows of a batch-16 decode step it runs about a third faster
    than oneDNN, which multiplies and streams in turn, and at one row a few percent faster. Weights it does not pack
    (not float32, fewer than ONEDNN_MIN_WEIGHT_ELEMENTS, output size not a multiple of 64) go to oneDNN as before."""

    def __init__(self, native_op, linear_op, reorder_op):
        super().__init__(linear_op, reorder_op)
        self._native = native_op

    def __call__(self, x, weight, bias=None):
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

    def pack(self, weight):
        if weight.dtype != torch.float32 or not self._suits(weight) or weight.shape[0] % PANEL_GROUP:
            return super().pack(weight)
        return panel_layout(weight)


def panel_layout(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out / 64, in, 64]: group g, step k holds W[64g:64g+64, k] (out a multiple of PANEL_GROUP)."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // PANEL_GROUP, PANEL_GROUP, in_features).transpose(1, 2).contiguous()


PLAIN_LINEAR = LinearKernel()
CPU_LINEAR_CHOICES = ("auto", "panel", "onednn", "torch")


def linear_kernel(plan: Plan, choice: str | None = None) -> LinearKernel:
    """The linear kernel for a plan's device. On the CPU, by `choice` (default: $ATB_MODELS_CPU_LINEAR, else
    "auto"): "auto" takes the kit's panel kernel where the CPU has AVX-512 and a C++ compiler builds it, else
    oneDNN where this build has a working one, else F.linear; "panel" and "onednn" ask for one (falling back the
    same way when it is missing), "torch" is F.linear. Accelerators always use F.linear (the vendor's GEMM)."""
    choice = choice or _cpu_kernel_choice()
    if plan.kind != "cpu" or choice == "torch" or not torch.backends.mkldnn.is_available():
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
    native = _panel_linear_op() if choice in ("auto", "panel") else None
    if native is not None:
        return PanelLinear(native, onednn, reorder)
    return OneDnnLinear(onednn, reorder)


def _cpu_kernel_choice() -> str:
    """$ATB_MODELS_CPU_LINEAR, checked: which CPU kernels run (linear_kernel says what each value means)."""
    choice = os.environ.get("ATB_MODELS_CPU_LINEAR") or "auto"
    if choice not in CPU_LINEAR_CHOICES:
        raise UserError(f"ATB_MODELS_CPU_LINEAR={choice!r}: expected one of {', '.join(CPU_LINEAR_CHOICES)}")
    return choice


def _native_kernels_on(plan: Plan) -> bool:
    """Whether the kit's native kernels besides the linears (attention, norm, activation, the whole layer) are
    wanted: a CPU plan with ATB_MODELS_CPU_LINEAR=auto or panel (the same switch as the linears)."""
    return plan.kind == "cpu" and _cpu_kernel_choice() in ("auto", "panel")


NATIVE_LIBRARY = "cpu_kernels"  # atb_models/csrc/cpu_kernels.cpp and its headers, one library
_I64, _PTR, _FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float  # the native entry points' arguments


def _native_op(symbol: str, argtypes: list):
    """A function of the kit's native library (atb_models/native.py), or None: it is built with AVX-512
    instructions (torch's own check of the CPU) and needs a C++ compiler."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    from atb_models import native

    library = native.load(NATIVE_LIBRARY)
    if library is None:
        return None
    op = getattr(library, symbol)
    op.argtypes = argtypes
    op.restype = None
    return op


def _native_kernel(plan: Plan, wrapper, symbol: str, argtypes: list):
    """wrapper(the native function `symbol`) where the native kernels are wanted (_native_kernels_on) and the
    library builds on an AVX-512 CPU, else None."""
    if not _native_kernels_on(plan):
        return None
    op = _native_op(symbol, argtypes)
    return None if op is None else wrapper(op)


def _panel_linear_op():
    op = _native_op("atb_panel_linear_f32", [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR])
    if op is None:
        return None
    # A wrong build must not reach the model: one small product against F.linear first.
    kernel = PanelLinear(op, None, None)
    x, w, b = torch.randn(3, 40), torch.randn(2 * PANEL_GROUP, 40), torch.randn(2 * PANEL_GROUP)
    if not torch.allclose(kernel(x, panel_layout(w), b), torch.nn.functional.linear(x, w, b), atol=1e-4):
        logger.warning("the kit's panel linear kernel gave wrong products here: using oneDNN")
        return None
    return op


class PagedDecodeAttention:
    """The kit's own decode attention for the CPU in float32 (atb_models/csrc/paged_decode_attention.h): rotates
    q and k, stores the step's K and V and attends over each sequence's context read in place through its block
    table, one call per layer instead of about fifteen operator calls (the rotation's five, two index_puts, two
    block gathers, mask, softmax, two matmuls)."""

    def __init__(self, op):
        self._op = op

    @staticmethod
    def suits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
                and q.shape[-1] % 16 == 0)

    def __call__(self, q, k, v, k_cache, v_cache, block_tables, context_lens, scale: float, cos=None,
                 sin=None) -> torch.Tensor:
        """q [batch, heads, dim], k and v [batch, kv_heads, dim] (rows may be strided, each row contiguous),
        caches [blocks, kv_heads, block_size, dim], block_tables [batch, max_blocks] and context_lens [batch]
        int64 (each length counts the new token); cos and sin [batch, dim] float32: q and k are rotated here
        (None: they come rotated). Returns [batch, heads, dim]."""
        batch, heads, dim = q.shape
        for t in (q, k, v):
            if t.stride(2) != 1 or t.stride(1) != dim:
                raise ValueError("decode attention needs each row's heads contiguous")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("decode attention needs contiguous KV caches")
        tables = block_tables.contiguous()
        lengths = context_lens.contiguous()
        out = torch.empty(batch, heads, dim, dtype=torch.float32)
        if cos is not None:
            cos, sin = cos.float().contiguous(), sin.float().contiguous()
        self._op(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                 None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
                 k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1], lengths.data_ptr(),
                 batch, heads, k_cache.shape[1], dim, k_cache.shape[2], scale, out.data_ptr())
        return out


def decode_attention_kernel(plan: Plan) -> PagedDecodeAttention | None:
    """The kit's native decode attention where it is wanted (_native_kernels_on) and builds on an AVX-512 CPU,
    else None: SDPA or the grouped matmuls of layers/attention.py."""
    return _native_kernel(plan, PagedDecodeAttention, "atb_paged_decode_attention_f32",
                          [_PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64,
                           _I64, _I64, _I64, _FLOAT, _PTR])


class NativeRMSNorm:
    """Qwen2's RMSNorm in one call (atb_models/csrc/rms_norm.h), after the residual add when given one: float32
    on an AVX-512 CPU, contiguous rows."""

    def __init__(self, op):
        self._op = op

    @staticmethod
    def suits(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its norm); (x, its norm) without delta."""
        hidden = x.shape[-1]
        rows = x.numel() // hidden
        out = torch.empty_like(x)
        total = x
        if delta is not None:
            delta = delta.contiguous()
            total = torch.empty_like(x)
        self._op(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), rows, hidden, eps,
                 None if delta is None else total.data_ptr(), out.data_ptr())
        return total, out


def rms_norm_kernel(plan: Plan) -> NativeRMSNorm | None:
    """The native RMSNorm where it is wanted (_native_kernels_on) and builds on an AVX-512 CPU, else None:
    PyTorch's operators in layers/norm.py."""
    return _native_kernel(plan, NativeRMSNorm, "atb_rms_norm_f32", [_PTR, _PTR, _PTR, _I64, _I64, _FLOAT, _PTR, _PTR])


class NativeSiluAndMul:
    """The MLP's silu(gate) * up in one call (atb_models/csrc/activation.h): float32 on an AVX-512 CPU, where gate
    and up are the two halves of the gate/up projection's output (same shape, rows equally far apart). Below
    MIN_ELEMENTS ctypes' call costs more than PyTorch's two operators (one row of 4864: 5.0 vs 3.7 us; 16 rows: 13
    vs 24 us, 1344 rows: 1.6 vs 2.6 ms)."""

    MIN_ELEMENTS = 16384

    def __init__(self, op):
        self._op = op

    @classmethod
    def suits(cls, gate: torch.Tensor, up: torch.Tensor) -> bool:
        return (gate.device.type == "cpu" and gate.dtype == up.dtype == torch.float32 and gate.dim() == 2
                and gate.shape == up.shape and gate.stride() == up.stride() and gate.stride(1) == 1
                and gate.numel() >= cls.MIN_ELEMENTS)

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out = torch.empty(gate.shape, dtype=torch.float32)
        self._op(gate.data_ptr(), up.data_ptr(), gate.shape[0], gate.shape[1], gate.stride(0), out.data_ptr())
        return out


def silu_and_mul_kernel(plan: Plan) -> NativeSiluAndMul | None:
    """The native silu(gate) * up where it is wanted (_native_kernels_on) and builds on an AVX-512 CPU, else None:
    PyTorch's silu and product in layers/activation.py."""
    return _native_kernel(plan, NativeSiluAndMul, "atb_silu_and_mul_f32", [_PTR, _PTR, _I64, _I64, _I64, _PTR])


class LayerWeights(ctypes.Structure):
    """csrc/cpu_kernels.cpp's LayerWeights, field for field: a decoder layer's packed linears, norms and KV cache."""
    _fields_ = [("input_norm", _PTR), ("qkv", _PTR), ("qkv_bias", _PTR), ("o", _PTR), ("post_norm", _PTR),
                ("gate_up", _PTR), ("down", _PTR), ("k_cache", _PTR), ("v_cache", _PTR), ("hidden", _I64),
                ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("intermediate", _I64),
                ("block_size", _I64), ("eps", _FLOAT), ("scale", _FLOAT)]


class DecodeStep(ctypes.Structure):
    """csrc/cpu_kernels.cpp's DecodeStep, field for field: what all layers of one decode step share."""
    _fields_ = [("rows", _I64), ("block_tables", _PTR), ("max_blocks", _I64), ("context_lens", _PTR),
                ("cos", _PTR), ("sin", _PTR), ("normed", _PTR), ("qkv", _PTR), ("attention", _PTR),
                ("projected", _PTR), ("gate_up", _PTR), ("activated", _PTR)]


class NativeDecoderLayer:
    """A Qwen2 decoder layer's whole decode step in one native call (atb_models/csrc/cpu_kernels.cpp): the same
    kernels as the operator-by-operator path, without its ten-odd Python-level calls a layer, each 10-25 us with
    the caches cold from the weight stream. Float32 on an AVX-512 CPU, for a layer that holds all its heads (one
    rank) and whose four linears are in the panel layout."""

    def __init__(self, op):
        self._op = op

    @staticmethod
    def weights(input_norm, qkv, qkv_bias, o, post_norm, gate_up, down, k_cache, v_cache, heads: int,
                kv_heads: int, eps: float, scale: float) -> LayerWeights | None:
        """The layer as the kernel reads it, or None where the layer is not its case. The result points into the
        tensors: it is right while they are the layer's."""
        tensors = (input_norm, qkv, qkv_bias, o, post_norm, gate_up, down, k_cache, v_cache)
        if any(t is None or t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
               for t in tensors) or any(w.dim() != 3 for w in (qkv, o, gate_up, down)):
            return None
        hidden, head_dim, intermediate = input_norm.shape[0], k_cache.shape[-1], down.shape[1]
        # [out / 64, in, 64] each (platform.panel_layout), out and in as the heads and sizes say.
        expected = ((qkv, (heads + 2 * kv_heads) * head_dim, hidden), (o, hidden, heads * head_dim),
                    (gate_up, 2 * intermediate, hidden), (down, hidden, intermediate))
        if head_dim % 16 or any(tuple(w.shape) != (out // PANEL_GROUP, inp, PANEL_GROUP) or out % PANEL_GROUP
                                for w, out, inp in expected):
            return None
        if qkv_bias.shape != ((heads + 2 * kv_heads) * head_dim,) or post_norm.shape != (hidden,):
            return None
        return LayerWeights(*(t.data_ptr() for t in tensors), hidden, heads, kv_heads, head_dim, intermediate,
                            k_cache.shape[2], eps, scale)

    @staticmethod
    def step(layer: LayerWeights, rows: int, block_tables: torch.Tensor, context_lens: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor) -> DecodeStep:
        """A decode step of `rows` sequences for layers shaped like `layer`, with its scratch. The tensors it
        points to live as long as it does."""
        q_width = layer.heads * layer.head_dim
        widths = (layer.hidden, q_width + 2 * layer.kv_heads * layer.head_dim, q_width, layer.hidden,
                  2 * layer.intermediate, layer.intermediate)
        keep = [block_tables.contiguous(), context_lens.contiguous(), cos.float().contiguous(),
                sin.float().contiguous(), *(torch.empty(rows, width, dtype=torch.float32) for width in widths)]
        step = DecodeStep(rows, keep[0].data_ptr(), keep[0].shape[1], *(t.data_ptr() for t in keep[1:]))
        step.keep = keep
        return step

    def __call__(self, layer: LayerWeights, step: DecodeStep, x: torch.Tensor) -> torch.Tensor:
        """x [rows, hidden] float32 contiguous, the residual stream, goes through the layer in place."""
        self._op(layer, step, x.data_ptr())
        return x


def decoder_layer_kernel(plan: Plan) -> NativeDecoderLayer | None:
    """The native decoder layer where it is wanted (_native_kernels_on) and builds on an AVX-512 CPU, else None:
    the layer runs operator by operator."""
    return _native_kernel(plan, NativeDecoderLayer, "atb_decoder_layer_decode_f32",
                          [ctypes.POINTER(LayerWeights), ctypes.POINTER(DecodeStep), _PTR])


def _runs(call) -> bool:
    try:
        call()
    except RuntimeError:
        return False
    return True


def free_memory_bytes(plan: Plan) -> int:
    """Memory this rank can still allocate on its device: the device's free memory on an accelerator, the
    operating system's available memory on the CPU."""
    if plan.kind == "cuda":
        return torch.cuda.mem_get_info(plan.index)[0]
    if plan.kind == "npu":
        return _import_torch_npu().npu.mem_get_info(plan.index)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def checkpoint_dtype(config_dtype: str | torch.dtype | None) -> torch.dtype:
    """config.json's torch_dtype as a torch dtype; absent means float32 (as transformers loads it)."""
    if config_dtype is None:
        return torch.float32
    if isinstance(config_dtype, torch.dtype):
        name = _dtype_name(config_dtype)
    else:
        name = str(config_dtype).strip().lower().removeprefix("torch.")
    if name not in _CHECKPOINT_DTYPES:
        raise UserError(f"config.json torch_dtype {config_dtype!r}: not a dtype the kit runs; "
                        "expected bfloat16, float16 or float32")
    return _CHECKPOINT_DTYPES[name]


def _lacks(caps: Capabilities, dtype: torch.dtype) -> str:
    """What the device lacks, for error messages: "this CPU has no native bf16 (needs AVX512-BF16 or AMX)"."""
    short = "bf16" if dtype == torch.bfloat16 else "fp16"
    hint = _LACK_HINTS.get((caps.kind, dtype))
    who = "this CPU" if caps.kind == "cpu" else caps.name
    return f"{who} has no native {short}" + (f" ({hint})" if hint else "")


def _explicit_dtypes(caps: Capabilities, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype, str]:
    name = _dtype_name(dtype)
    if not caps.runs_natively(dtype):
        instead = "float16" if caps.kind != "cpu" and caps.native_fp16 and dtype == torch.bfloat16 else "float32"
        raise UserError(f"--dtype {name}: {_lacks(caps, dtype)}; use --dtype {instead} or --dtype auto")
    return dtype, dtype, f"--dtype {name} requested"


def _auto_dtypes(caps: Capabilities, stored: torch.dtype) -> tuple[torch.dtype, torch.dtype, str]:
    name = _dtype_name(stored)
    if caps.runs_natively(stored):
        return stored, stored, f"checkpoint is {name}" + ("" if stored == torch.float32 else " and runs natively")
    short = "bfloat16" if stored == torch.bfloat16 else "float16"
    if caps.kind == "cpu":
        lacks = "AVX512-BF16/AMX" if stored == torch.bfloat16 else "AVX512-FP16/AMX-FP16"
        return torch.float32, torch.float32, (f"this CPU has no {lacks}: {short} matmuls would be far slower, "
                                              "computing in float32")
    if stored == torch.bfloat16 and caps.native_fp16:
        return torch.float16, torch.float32, (
            f"checkpoint is bfloat16 but {caps.name} has no native bfloat16: language model in float16 with float32 "
            "softmax and norms, vision tower in float32")
    return torch.float32, torch.float32, f"checkpoint is {name} but {caps.name} has no native {short}: float32"


def resolve_plan(requested_device: str = "auto", requested_dtype: str = "auto",
                 config_dtype: str | torch.dtype | None = "bfloat16", local_rank: int = 0,
                 caps: Capabilities | None = None) -> Plan:
    """Choose device, backend and dtypes for this rank. `caps` stands in for the probed hardware (tests)."""
    _check_choice("--dtype", requested_dtype, DTYPE_CHOICES)
    _check_choice("--device", requested_device, DEVICE_CHOICES)
    if caps is None:
        caps = probe(detect_device_kind(requested_device))
    elif requested_device not in ("auto", caps.kind):
        raise UserError(f"--device {requested_device}: not this machine's device ({caps.kind}, {caps.name})")

    index = None
    if caps.kind != "cpu":
        if not 0 <= local_rank < caps.device_count:
            raise UserError(f"LOCAL_RANK {local_rank}: only {caps.device_count} {caps.kind} device(s) are visible; "
                            "launch at most that many ranks per node")
        index = local_rank

    if requested_dtype == "auto":
        llm_dtype, vision_dtype, reason = _auto_dtypes(caps, checkpoint_dtype(config_dtype))
    else:
        llm_dtype, vision_dtype, reason = _explicit_dtypes(caps, _CHECKPOINT_DTYPES[requested_dtype])

    return Plan(kind=caps.kind, index=index, device_name=caps.name, dist_backend=_DIST_BACKENDS[caps.kind],
                llm_dtype=llm_dtype, vision_dtype=vision_dtype,
                # float16 overflows in Qwen2's attention scores unless softmax runs in float32
                upcast_attention=llm_dtype == torch.float16, reason=reason)
