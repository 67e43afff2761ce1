"""Device, distributed backend and dtypes: decided here, once, and passed down as a `Plan`.

This is the only module that decides which device and dtypes a rank computes in, and the only one that imports
torch_npu (and only when it is installed). Everything else receives a `Plan` and uses `plan.device`,
`plan.llm_dtype`, `plan.vision_dtype`; which kernels run on that device is `atb_models.kernels.Kernels.for_plan`'s
choice, made from the plan.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

import torch

from atb_models import host
from atb_models.cli.choices import DEVICE_CHOICES, DTYPE_CHOICES
from atb_models.errors import UserError
from atb_models.host import available_memory_bytes, cpu_flags, cpuinfo_field

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
    # Where the flags are there but cannot be used: why (the CPU's, where PyTorch's kernels run below AVX-512)
    unusable: str = ""

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


def cpu_capabilities(cpuinfo: str | None = None, vector_isa: str = "AVX512") -> Capabilities:
    """Parse /proc/cpuinfo text (default: this machine's, its flags as host.cpu_flags gives them): the first
    processor's model name and flags. `vector_isa` is PyTorch's CPU capability
    (torch.backends.cpu.get_cpu_capability()): below AVX512 (ATEN_CPU_CAPABILITY=avx2 on such a CPU, say) PyTorch
    runs no bfloat16 or float16 product natively, whatever the flags (oneDNN's packing of a bfloat16 weight refuses),
    and the kit's AVX-512 kernels do not load: the CPU computes as one without the flags would."""
    flags = cpu_flags(cpuinfo)
    model = cpuinfo_field(host.read_cpuinfo() if cpuinfo is None else cpuinfo, "model name") or "unknown CPU"
    matrix_flags = [f for f in _CPU_BF16_FLAGS + _CPU_FP16_FLAGS if f in flags]
    name = f"{model} ({', '.join(matrix_flags)})" if matrix_flags else model
    usable = vector_isa == "AVX512"
    return Capabilities(
        kind="cpu",
        name=name,
        native_bf16=usable and any(f in flags for f in _CPU_BF16_FLAGS),
        native_fp16=usable and any(f in flags for f in _CPU_FP16_FLAGS),
        device_count=1,
        unusable="" if usable or not matrix_flags else f"PyTorch's CPU capability is {vector_isa}, not AVX512",
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
        return cpu_capabilities(None, torch.backends.cpu.get_cpu_capability())
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


def free_memory_bytes(plan: Plan) -> int:
    """Memory this rank can still allocate on its device: the device's free memory on an accelerator, the
    operating system's available memory on the CPU."""
    if plan.kind == "cuda":
        return torch.cuda.mem_get_info(plan.index)[0]
    if plan.kind == "npu":
        return _import_torch_npu().npu.mem_get_info(plan.index)[0]
    return available_memory_bytes()


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
    why = caps.unusable or hint
    return f"{who} has no native {short}" + (f" ({why})" if why else "")


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
        has = f"no usable {lacks} ({caps.unusable})" if caps.unusable else f"no {lacks}"
        return torch.float32, torch.float32, (f"this CPU has {has}: {short} matmuls would be far slower, "
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
