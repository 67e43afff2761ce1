"""The kit's own CPU kernels (atb_models/csrc): one library for an AVX-512 CPU (cpu_kernels.cpp), and a second for
a CPU with AVX2 but not AVX-512 (cpu_kernels_avx2.cpp: the same but the int8 linear and AVX512-BF16's dot products);
each compiled with the machine's C++ compiler on first use, cached, loaded with ctypes and checked against its
declaration here.

The library needs no PyTorch headers: the kernels work on raw float pointers, and link OpenMP against the libgomp
PyTorch has already loaded. Its interface is declared once, in FUNCTIONS and STRUCTS below: the ctypes signatures
and struct layouts are generated from them, and at load the library's own account of itself (`atb_native_abi`:
its ABI version, the size of each struct as the compiler laid it out, the instruction set it was built for) must
agree, else the library is not used.

Nothing here raises: no AVX-512 (or AVX2), no compiler, a failed build or a library that disagrees with its
declaration gives None with the reason logged, and the caller keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from atb_models.config import kit_home
from atb_models.host import cpu_flags

logger = logging.getLogger("atb_models.native")

SOURCE_DIR = Path(__file__).resolve().parents[1] / "csrc"
LIBRARY = "cpu_kernels"  # csrc/cpu_kernels.cpp and its headers
# AVX-512 F, BW, VL and DQ: what torch's "AVX512" capability, checked before building, guarantees.
CXX_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp", "-shared", "-fPIC",
             "-std=c++17")
# A CPU without AVX-512 but with AVX2 and FMA (torch's "AVX2" capability) gets a library of its own
# (csrc/cpu_kernels_avx2.cpp) for float32 models: the functions below, declared in FUNCTIONS like the rest, and the
# same STRUCTS.
AVX2_LIBRARY = "cpu_kernels_avx2"
AVX2_CXX_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
AVX2_FUNCTIONS = ("atb_native_abi", "atb_panel_linear_f32", "atb_bf16_linear_f32", "atb_rms_norm_f32",
                  "atb_silu_and_mul_f32", "atb_paged_decode_attention_f32", "atb_decoder_layer_decode_f32",
                  "atb_decoder_layers_decode_f32", "atb_vision_rotary_f32", "atb_vision_rotary_bf16",
                  "atb_quick_gelu_f32", "atb_quick_gelu_bf16")
# Instructions used where the CPU has them (csrc picks its path by the compiler's macros): /proc/cpuinfo flag ->
# compiler flag.
OPTIONAL_ISA = (("avx512_vnni", "-mavx512vnni"), ("avx512_bf16", "-mavx512bf16"), ("amx_tile", "-mamx-tile"),
                ("amx_bf16", "-mamx-bf16"), ("amx_int8", "-mamx-int8"))
# Set to 1, the AVX-512 library is built with its AMX kernels on tiles emulated in plain C++ (csrc/amx_emulated.h)
# in place of the CPU's: the kernels' logic tested on a CPU without AMX (.ci/run), slowly. Never for serving.
AMX_EMULATED_ENV = "ATB_MODELS_AMX_EMULATED"

# --------------------------------------------------------------------------------------------- the declaration

ABI_VERSION = 14  # csrc/abi.h's ATB_ABI_VERSION (both libraries'): raise both when a signature or a struct changes

I64, F32, PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p

# How a tensor the library reads is stored (csrc/decoder_layer.h's enum Format).
FORMATS = {torch.float32: 0, torch.int8: 1, torch.bfloat16: 2}
INT8_TILES_FORMAT = 3  # int8 weights packed for AMX-INT8 tiles (kernels/w8a16.py's tile_layout)

# struct name -> its fields in order, (name, ctypes type), as csrc/decoder_layer.h declares them.
STRUCTS = {
    "LayerWeights": (  # one Qwen2 decoder layer as loaded: packed linears (and int8 ones' scales), norms, KV cache
        ("input_norm", PTR), ("qkv", PTR), ("qkv_bias", PTR), ("o", PTR), ("post_norm", PTR), ("gate_up", PTR),
        ("down", PTR), ("k_cache", PTR), ("v_cache", PTR), ("qkv_scale", PTR), ("o_scale", PTR),
        ("gate_up_scale", PTR), ("down_scale", PTR), ("qkv_groups", I64), ("o_groups", I64), ("gate_up_groups", I64),
        ("down_groups", I64), ("qkv_format", I64), ("o_format", I64), ("gate_up_format", I64), ("down_format", I64),
        ("kv_format", I64), ("hidden", I64), ("heads", I64), ("kv_heads", I64), ("head_dim", I64),
        ("intermediate", I64), ("block_size", I64), ("eps", F32), ("scale", F32)),
    "DecodeStep": (  # what all layers of one decode step share, scratch included
        ("rows", I64), ("x_format", I64), ("block_tables", PTR), ("max_blocks", I64), ("context_lens", PTR),
        ("cos", PTR), ("sin", PTR), ("normed", PTR), ("qkv", PTR), ("attention", PTR), ("projected", PTR),
        ("gate_up", PTR), ("activated", PTR), ("residual", PTR)),
}

# function name -> (return type, ((argument name, type), ...)), names as in csrc. A struct argument is the string
# "<struct name>*": a pointer to that generated struct.
FUNCTIONS = {
    "atb_native_abi": (ctypes.c_char_p, ()),
    "atb_panel_linear_f32": (None, (
        ("x", PTR), ("M", I64), ("K", I64), ("ldx", I64), ("wp", PTR), ("N", I64), ("bias", PTR), ("y", PTR))),
    "atb_bf16_linear_f32": (None, (
        ("x", PTR), ("M", I64), ("K", I64), ("ldx", I64), ("wp", PTR), ("N", I64), ("bias", PTR), ("y", PTR))),
    "atb_bf16_dot_linear_f32": (None, (
        ("x", PTR), ("M", I64), ("K", I64), ("ldx", I64), ("wp", PTR), ("N", I64), ("bias", PTR), ("y", PTR))),
    "atb_bf16_unpack_pairs": (None, (("wp", PTR), ("N", I64), ("K", I64), ("wt", PTR))),
    "atb_bf16_dot_linear_bf16": (None, (
        ("x", PTR), ("M", I64), ("K", I64), ("ldx", I64), ("wp", PTR), ("N", I64), ("bias", PTR), ("y", PTR))),
    "atb_bf16_dot_available": (I64, ()),
    "atb_bf16_attention": (I64, (
        ("q", PTR), ("q_stride", I64), ("k", PTR), ("k_stride", I64), ("v", PTR), ("v_stride", I64), ("count", I64),
        ("n_q", I64), ("n_k", I64), ("heads", I64), ("kv_heads", I64), ("head_dim", I64), ("causal", I64),
        ("scale", F32), ("out", PTR), ("out_stride", I64))),
    "atb_bf16_use_dot": (I64, (("on", I64),)),
    "atb_bf16_dot_decode_rows": (I64, (("rows", I64),)),
    "atb_bf16_dot_one_pass_prefetch": (I64, (("on", I64),)),
    "atb_bf16_amx_available": (I64, ()),
    "atb_bf16_use_amx": (I64, (("on", I64),)),
    "atb_f32_use_amx": (I64, (("on", I64),)),
    "atb_use_stream_prefetch": (I64, (("on", I64),)),
    "atb_evict_from_caches": (None, (("p", PTR), ("bytes", I64))),
    "atb_bf16_widen_in_registers": (I64, (("on", I64),)),
    "atb_w8a16_linear_f32": (None, (
        ("x", PTR), ("M", I64), ("K", I64), ("ldx", I64), ("wp", PTR), ("N", I64), ("scales", PTR), ("groups", I64),
        ("bias", PTR), ("y", PTR))),
    "atb_w8a16_tiles_linear_f32": (None, (
        ("x", PTR), ("M", I64), ("K", I64), ("ldx", I64), ("wq", PTR), ("N", I64), ("scales", PTR), ("groups", I64),
        ("bias", PTR), ("y", PTR))),
    "atb_w8a16_tiles_available": (I64, ()),
    "atb_paged_decode_attention_f32": (None, (
        ("q", PTR), ("q_stride", I64), ("k", PTR), ("k_stride", I64), ("v", PTR), ("v_stride", I64),
        ("cos", PTR), ("sin", PTR), ("k_cache", PTR), ("v_cache", PTR), ("block_tables", PTR),
        ("max_blocks", I64), ("context_lens", PTR), ("batch", I64), ("heads", I64), ("kv_heads", I64),
        ("head_dim", I64), ("block_size", I64), ("scale", F32), ("out", PTR))),
    "atb_rms_norm_f32": (None, (
        ("x", PTR), ("delta", PTR), ("weight", PTR), ("rows", I64), ("hidden", I64), ("eps", F32), ("sum", PTR),
        ("out", PTR))),
    "atb_silu_and_mul_f32": (None, (
        ("gate", PTR), ("up", PTR), ("rows", I64), ("width", I64), ("ld", I64), ("out", PTR))),
    "atb_silu_and_mul_bf16": (None, (
        ("gate", PTR), ("up", PTR), ("rows", I64), ("width", I64), ("ld", I64), ("out", PTR))),
    "atb_vision_rotary_f32": (None, (
        ("q", PTR), ("k", PTR), ("rows", I64), ("heads", I64), ("dim", I64), ("row_stride", I64), ("cos", PTR),
        ("sin", PTR))),
    "atb_vision_rotary_bf16": (None, (
        ("q", PTR), ("k", PTR), ("rows", I64), ("heads", I64), ("dim", I64), ("row_stride", I64), ("cos", PTR),
        ("sin", PTR))),
    "atb_quick_gelu_f32": (None, (("x", PTR), ("n", I64))),
    "atb_quick_gelu_bf16": (None, (("x", PTR), ("n", I64))),
    "atb_decoder_layer_decode_f32": (None, (("w", "LayerWeights*"), ("s", "DecodeStep*"), ("x_io", PTR))),
    "atb_decoder_layers_decode_f32": (None, (("layers", PTR), ("n", I64), ("s", "DecodeStep*"), ("x_io", PTR))),
}


class AbiMismatch(RuntimeError):
    """The built library disagrees with FUNCTIONS / STRUCTS: calling it would corrupt memory."""


class NativeLibrary:
    """The loaded library: one attribute per function of FUNCTIONS, typed from it, and `structs`, the ctypes
    Structure of each STRUCTS entry. Checked against the library's own ABI report when made. `isa` says which:
    "avx512", the whole library, or "avx2", the functions of AVX2_FUNCTIONS."""

    def __init__(self, library: ctypes.CDLL, isa: str = "avx512"):
        self.isa = isa
        self.structs = {name: type(name, (ctypes.Structure,), {"_fields_": list(fields)})
                        for name, fields in STRUCTS.items()}
        for name, (restype, arguments) in FUNCTIONS.items():
            if isa == "avx2" and name not in AVX2_FUNCTIONS:
                continue
            try:
                function = getattr(library, name)
            except AttributeError:
                raise AbiMismatch(f"the library has no function {name}") from None
            function.restype = restype
            function.argtypes = [self._ctype(kind) for _, kind in arguments]
            setattr(self, name, function)
        self._check_abi()

    def _ctype(self, kind):
        if isinstance(kind, str):
            return ctypes.POINTER(self.structs[kind.removesuffix("*")])
        return kind

    def _check_abi(self) -> None:
        report = dict(item.split("=", 1) for item in self.atb_native_abi().decode().split())
        if int(report.get("version", -1)) != ABI_VERSION:
            raise AbiMismatch(f"ABI version {report.get('version')} in the library, {ABI_VERSION} declared")
        if report.get("isa") != self.isa:
            raise AbiMismatch(f"the library is built for {report.get('isa')}, loaded as {self.isa}")
        for name, struct in self.structs.items():
            built, declared = int(report.get(name, -1)), ctypes.sizeof(struct)
            if built != declared:
                raise AbiMismatch(f"struct {name} is {built} bytes in the library, {declared} declared")

    @classmethod
    def load(cls) -> NativeLibrary | None:
        """The library, built if need be, or None (the reason logged) where it cannot be used here: it is built
        with AVX-512 instructions (torch's own check of the CPU decides) and needs a C++ compiler."""
        capability = torch.backends.cpu.get_cpu_capability()
        if capability != "AVX512":
            forced = os.environ.get("ATEN_CPU_CAPABILITY")
            logger.info("the kit's %s kernels need AVX-512; torch reports %s for this CPU%s: PyTorch's operators "
                        "run instead (and the kit's AVX2 kernels where they apply)", LIBRARY, capability,
                        f" (ATEN_CPU_CAPABILITY={forced})" if forced else "")
            return None
        flags = compile_flags()
        if os.environ.get(AMX_EMULATED_ENV) == "1":
            flags = tuple(f for f in flags if not f.startswith("-mamx")) + ("-DATB_AMX_EMULATED",)
            logger.info("%s=1: the kit's %s kernels run their AMX paths on tiles emulated in software (a test "
                        "build: slow)", AMX_EMULATED_ENV, LIBRARY)
        library = cls._built(LIBRARY, flags, "avx512")
        tiles = tuple(option for flag, option in OPTIONAL_ISA if flag.startswith("amx_") and option in flags)
        if library is None and tiles:
            # A compiler too old for AMX (GCC before 11) must not cost the CPU every other native kernel.
            logger.info("building the kit's %s kernels without AMX (%s)", LIBRARY, " ".join(tiles))
            library = cls._built(LIBRARY, tuple(f for f in flags if f not in tiles), "avx512")
        return library

    @classmethod
    def load_avx2(cls) -> NativeLibrary | None:
        """The kernels for a CPU with AVX2 and FMA but not AVX-512 (torch's capability "AVX2"), built if need be;
        None for another capability, or where the build or the load fails (the reason logged)."""
        if torch.backends.cpu.get_cpu_capability() != "AVX2":
            return None
        library = cls._built(AVX2_LIBRARY, AVX2_CXX_FLAGS, "avx2")
        if library is not None:
            logger.info("the kit's AVX2 kernels (%s) run a float32 model's linears, norms, activation and decode "
                        "steps", AVX2_LIBRARY)
        return library

    @classmethod
    def _built(cls, name: str, flags: tuple[str, ...], isa: str) -> NativeLibrary | None:
        path = build(name, flags)
        if path is None:
            return None
        try:
            return cls(ctypes.CDLL(str(path)), isa)
        except OSError as e:
            logger.info("loading the kit's %s kernels failed: %s", name, e)
        except AbiMismatch as e:
            logger.warning("the kit's %s kernels (%s) do not match their declaration in %s: %s; using PyTorch's "
                           "operators instead", name, path, __name__, e)
        return None


def kernel_name(name: str, library: NativeLibrary) -> str:
    """A native kernel's name as Kernels.describe shows it: `name`, with " (AVX2)" for the AVX2 library's."""
    return f"{name} (AVX2)" if library.isa == "avx2" else name


# --------------------------------------------------------------------------------------------------- the build

def cache_dir() -> Path:
    """native/ under the kit's home (config.kit_home)."""
    return kit_home() / "native"


def compile_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """CXX_FLAGS plus the OPTIONAL_ISA this CPU (its /proc/cpuinfo text, default read here) reports."""
    flags = cpu_flags(cpuinfo)
    return CXX_FLAGS + tuple(option for flag, option in OPTIONAL_ISA if flag in flags)


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(name: str, flags: tuple[str, ...] | None = None) -> Path | None:
    """csrc/<name>.cpp compiled with `flags` (default compile_flags()) into the cache (named by a hash of the
    sources, csrc's headers included, flags and compiler, so an edit or another compiler builds anew), or None where
    no compiler is found or the build fails."""
    cxx = compiler()
    if cxx is None:
        logger.info("no C++ compiler found (set CXX): the kit's %s kernels are not built", name)
        return None
    flags = compile_flags() if flags is None else flags
    source = SOURCE_DIR / f"{name}.cpp"
    sources = [source, *sorted(SOURCE_DIR.glob("*.h"))]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)
                            + " ".join((cxx, *flags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: ranks building at once never load a half-written library.
        fd, staging = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run([cxx, *flags, str(source), "-o", staging], capture_output=True, text=True,
                                    timeout=300)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no message"])[-1]
                logger.info("building the kit's %s kernels failed (%s): %s", name, cxx, last)
                return None
            os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("building the kit's %s kernels failed: %s", name, e)
        return None
    return target
