"""The compute kernels (atb_models.kernels): each native kernel against PyTorch's operators, the choice made once
per model from its plan, the native library's declaration checked at load, and two models in one process."""

import ast
import ctypes
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from atb_models.errors import UserError
from atb_models.host import cpu_flags
from atb_models.kernels import Kernels, native
from atb_models.kernels.activation import NativeSiluAndMul, SiluAndMul
from atb_models.kernels.attention import CpuDecodeAttention, NativeDecodeAttention, SdpaDecodeAttention
from atb_models.kernels.decoder_layer import LayerByLayer, NativeDecoderLayer
from atb_models.kernels.linear import (F32_TILES_NAME, ONEDNN_MIN_WEIGHT_ELEMENTS, PLAIN_LINEAR, OneDnnLinear,
                                       PanelLinear, is_panel_packed, linear_kernel, panel_layout)
from atb_models.kernels.norm import NativeRMSNorm, RMSNormKernel
from atb_models.kernels.vision import NativeQuickGelu, NativeVisionRotary, QuickGelu
from atb_models.kernels.w8a16 import NativeW8A16, TorchW8A16, dequantize, quantize
from atb_models.layers.rotary import apply_rotary
from atb_models.layers.sharding import ceil_div
from atb_models.platform import Capabilities, probe, resolve_plan

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
AVX2 = torch.backends.cpu.get_cpu_capability() == "AVX2"
# AVX2 and FMA, what the AVX2 library is built for: every AVX-512 CPU has them too, so its tests run there as well
HAS_AVX2 = {"avx2", "fma"} <= cpu_flags()
# Whether this CPU runs a bfloat16 model (AVX512-BF16 or AMX, PyTorch at AVX-512); elsewhere --dtype bfloat16 is
# refused (platform), and the tests of bfloat16 engines check that refusal instead.
NATIVE_BF16 = probe("cpu").native_bf16
NO_NATIVE_BF16 = "a bfloat16 engine needs a CPU with AVX512-BF16 or AMX and PyTorch at AVX-512"
CPU_FP32 = resolve_plan("cpu", "float32", "float32")
CPU_BF16 = replace(CPU_FP32, llm_dtype=torch.bfloat16, vision_dtype=torch.bfloat16)  # (by hand: any CPU)
GPU = Capabilities(kind="cuda", name="sim", native_bf16=True, native_fp16=True, device_count=1)


def float32_library_expected(plan) -> bool:
    """Whether a CPU plan's model gets a native library: the AVX-512 one on an AVX-512 CPU, the AVX2 one for a float32
    model (both towers) on a CPU with AVX2 and FMA but not AVX-512."""
    return AVX512 or (AVX2 and HAS_AVX2 and torch.bfloat16 not in (plan.llm_dtype, plan.vision_dtype))


def refuses_bf16(make) -> bool:
    """On a CPU without native bf16: checks that `make()` (an engine asked for bfloat16) is refused with the reason,
    and returns True (the caller skips the rest); elsewhere False."""
    if NATIVE_BF16:
        return False
    with pytest.raises(UserError, match="--dtype bfloat16: this CPU has no native bf16"):
        make()
    return True


def native_kernels() -> Kernels:
    """The float32 CPU plan's kernels, checked: the native ones on an AVX-512 CPU (g++ builds them there); on any
    other (built with AVX-512 instructions, they would die of SIGILL there) the test is skipped once the plan is
    seen to get PyTorch's kernels or the AVX2 library's."""
    kernels = Kernels.for_plan(CPU_FP32)
    if not AVX512:
        # PyTorch's kernels, or on a CPU with AVX2 and FMA the AVX2 library's (any_native_kernels tests those)
        assert isinstance(kernels.decode_attention, CpuDecodeAttention)
        assert isinstance(kernels.decode_attention, NativeDecodeAttention) == float32_library_expected(CPU_FP32)
        assert ("(AVX2)" in kernels.describe()) == float32_library_expected(CPU_FP32)
        pytest.skip("the native kernels need an AVX-512 CPU")
    assert isinstance(kernels.linear, PanelLinear), "g++ builds the kit's native kernels on an AVX-512 CPU"
    return kernels


@pytest.fixture(params=["avx512", "avx2"])
def any_native_kernels(request, monkeypatch) -> Kernels:
    """The float32 CPU plan's native kernels from each library: the AVX-512 one (native_kernels), and the AVX2 one of
    a CPU without AVX-512, tested on any CPU with AVX2 and FMA by reporting torch's capability as AVX2."""
    if request.param == "avx512":
        return native_kernels()
    if not (AVX2 or (AVX512 and HAS_AVX2)):
        pytest.skip("the AVX2 library needs a CPU with AVX2 and FMA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    kernels = Kernels.for_plan(CPU_FP32)
    assert kernels.describe().startswith("linear panel (AVX2), RMSNorm native (AVX2), silu-and-mul native (AVX2), "
                                         "decode attention native (AVX2), prompt attention sdpa, vision attention "
                                         "sdpa, decoder layers native (AVX2)")
    return kernels


# ------------------------------------------------------------------------------------------- choice per plan

def test_kernels_are_chosen_from_the_plan_device_and_dtype():
    gpu = Kernels.for_plan(resolve_plan("auto", "auto", "bfloat16", caps=GPU))
    assert gpu.linear is PLAIN_LINEAR and type(gpu.decode_attention) is SdpaDecodeAttention
    assert type(gpu.rms_norm) is RMSNormKernel and type(gpu.decoder_layer) is LayerByLayer
    # A bfloat16 language model on the CPU: bf16 panel linears and the native decoder layer for decode steps (on an
    # AVX-512 CPU); the operator-by-operator path (prefill) keeps PyTorch's bfloat16 operators.
    bf16 = Kernels.for_plan(replace(CPU_FP32, llm_dtype=torch.bfloat16, vision_dtype=torch.bfloat16))
    assert type(bf16.decode_attention) is CpuDecodeAttention and type(bf16.rms_norm) is RMSNormKernel
    assert type(bf16.silu_and_mul) is (NativeSiluAndMul if AVX512 else SiluAndMul)
    assert isinstance(bf16.decoder_layer, NativeDecoderLayer) == AVX512
    assert isinstance(bf16.linear, PanelLinear) == AVX512 and (not AVX512 or bf16.linear.bf16_op is not None)
    torch_only = Kernels.for_plan(CPU_FP32, "torch")
    assert torch_only.linear is PLAIN_LINEAR and type(torch_only.decode_attention) is CpuDecodeAttention
    assert "decode attention" in torch_only.describe()


def test_two_kernels_objects_share_nothing():
    a, b = Kernels.for_plan(CPU_FP32), Kernels.for_plan(CPU_FP32)
    assert a.decode_attention is not b.decode_attention and a.decoder_layer is not b.decoder_layer
    cache = torch.randn(4, 2, 4, 8)
    tables = torch.tensor([[1, 2]])
    first = a.decode_attention.gather(cache, tables, "k")
    kept = first.clone()
    b.decode_attention.gather(cache, torch.tensor([[3, 0]]), "k")
    assert torch.equal(first, kept), "another model's gather does not write into this one's buffer"


def test_no_module_of_the_kit_keeps_kernels_buffers_or_a_step_context_in_module_state():
    """No `global` statement, no set_*_kernel, no module-level _context or _buffers: two engines in one process
    never touch each other's kernels. distributed.py (the process group) and shm.py (signal handlers) are
    process-wide by nature."""
    package = Path(__file__).resolve().parents[1] / "atb_models"
    offenders = []
    for path in package.rglob("*.py"):
        if path.name in ("distributed.py", "shm.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                offenders.append(f"{path.name}:{node.lineno} global {', '.join(node.names)}")
            if isinstance(node, ast.FunctionDef) and re.fullmatch(r"set_\w+_kernel|set_context", node.name):
                offenders.append(f"{path.name}:{node.lineno} {node.name}")
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Name) and re.fullmatch(r"_(context|buffers|kernel|native\w*|loaded)",
                                                                 target.id):
                    offenders.append(f"{path.name}:{node.lineno} {target.id}")
    assert not offenders


# ---------------------------------------------------------------------------------------------------- linear

def test_linear_kernel_matches_f_linear_on_the_cpu_and_is_f_linear_elsewhere():
    kernel = linear_kernel(CPU_FP32)
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    assert torch.allclose(kernel(x, w, b), F.linear(x, w, b), atol=1e-5)
    assert torch.allclose(kernel(x, w), F.linear(x, w), atol=1e-5)
    assert kernel.pack(w) is None  # tiny: stays on F.linear
    half = kernel(x.half(), w.half())  # float16 falls back to F.linear on the CPU
    assert half.dtype == torch.float16
    large = torch.randn(ONEDNN_MIN_WEIGHT_ELEMENTS // 256, 256)
    assert kernel.pack(large.half()) is None
    packed = kernel.pack(large)
    if packed is not None:  # this build packs for oneDNN: same products on any row count
        for rows in (1, 5, 40):
            x = torch.randn(rows, 256)
            assert torch.allclose(kernel(x, packed, None), F.linear(x, large), atol=1e-4)
    assert linear_kernel(resolve_plan("auto", "auto", "bfloat16", caps=GPU)) is PLAIN_LINEAR
    assert PLAIN_LINEAR.pack(large) is None


def test_pack_weights_packs_large_linears_but_not_a_tied_lm_head():
    from atb_models.layers import linear as linear_module

    doubling = OneDnnLinear(None, lambda w, rows: w.clone().mul_(2))
    model = torch.nn.ModuleList([linear_module.Linear(512, 512, False, torch.float32, doubling),
                                 linear_module.Linear(8, 8, False, torch.float32, doubling),
                                 linear_module.VocabParallelLMHead(512, 600, torch.float32, doubling)])
    for module in model:
        torch.nn.init.ones_(module.weight)
    table = linear_module.Embedding(600, 512, torch.float32)
    torch.nn.init.ones_(table.weight)
    model[2].tie_to(table)
    assert linear_module.pack_weights(model) == 1  # (oneDNN's layout has no rows for the embedding to read)
    assert model[0].weight.eq(2).all() and model[1].weight.eq(1).all() and model[2].weight.eq(1).all()
    assert table.packed_head is None and table.weight.eq(1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tied_lm_head_holding_the_whole_table_is_packed_for_the_panel_kernel_and_the_embedding_reads_its_rows(
        dtype):
    from atb_models.layers import linear as linear_module

    kernel = native_kernels().linear
    generator = torch.Generator().manual_seed(0)
    # float32 weights of bfloat16 values, as a bfloat16 checkpoint's: packed as bfloat16 (narrowed exactly)
    values = torch.randn(640, 512, generator=generator).bfloat16().to(dtype)
    table = linear_module.Embedding(640, 512, dtype)
    head = linear_module.VocabParallelLMHead(512, 640, dtype, kernel)
    table.weight.data.copy_(values)
    head.tie_to(table)
    assert head.weight.data_ptr() == table.weight.data_ptr()  # shared until packed
    assert linear_module.pack_weights(torch.nn.ModuleList([table, head])) == 1
    assert is_panel_packed(head.weight) and head.weight.dtype == torch.bfloat16 and table.weight is None
    ids = torch.tensor([[0, 63, 64], [639, 5, 0]])
    rows = table(ids)
    assert rows.dtype == dtype and rows.shape == (2, 3, 512) and torch.equal(rows, values[ids])
    x = torch.randn(3, 512, generator=generator).to(dtype)
    expected = F.linear(x.float(), values.float())
    assert torch.allclose(head(x).float(), expected, atol=1e-3 if dtype == torch.float32 else 0.1, rtol=1e-2)
    # Not the whole table (another rank's share of the vocabulary), or a vocabulary off the 64-row groups: as before.
    for vocab, first in ((640, 64), (600, 0)):
        table = linear_module.Embedding(vocab, 512, dtype)
        table.weight.data.copy_(torch.randn(vocab, 512, generator=generator).to(dtype))
        head = linear_module.VocabParallelLMHead(512, vocab, dtype, kernel)
        head.tie_to(table)
        head.first = first
        assert linear_module.pack_weights(torch.nn.ModuleList([table, head])) == 0
        assert table.packed_head is None and head.weight.data_ptr() == table.weight.data_ptr()


def _panel_packed(weight: torch.Tensor) -> torch.Tensor:
    """The panel kernel's layout written out by hand: group g, step k holds the 64 outputs W[64g:64g+64, k]."""
    out_features, in_features = weight.shape
    packed = torch.empty(out_features // 64, in_features, 64)
    for g in range(out_features // 64):
        for k in range(in_features):
            packed[g, k] = weight[64 * g:64 * g + 64, k]
    return packed


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_the_cpu_linear_is_the_kits_panel_kernel_where_the_cpu_has_avx512_or_avx2_and_it_matches_f_linear(
        isa, monkeypatch):
    """The AVX-512 library's panel kernel, and the AVX2 library's for a CPU without AVX-512 (tested here on any
    CPU with AVX2 and FMA by reporting torch's capability as AVX2)."""
    if isa == "avx2" and AVX512:
        if not HAS_AVX2:
            pytest.skip("this CPU has no AVX2 and FMA")
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    elif isa == "avx512" and not AVX512:
        pytest.skip("the AVX-512 library needs an AVX-512 CPU" + (" (the avx2 case tests this one)" if AVX2 else ""))
    kernel = linear_kernel(CPU_FP32, "auto")
    if isa == "avx2" and not (AVX512 or AVX2):
        # Built with AVX2 instructions: a CPU without them must not get it (it would die of SIGILL).
        assert not isinstance(kernel, PanelLinear) and isinstance(kernel, OneDnnLinear)
        return
    assert isinstance(kernel, PanelLinear), "g++ builds the panel kernel"
    # (where this process put a float32 model's bfloat16-valued weights on AMX tiles: kernels.linear.f32_amx_chosen)
    amx = isa == "avx512" and native.NativeLibrary.load().atb_f32_use_amx(-1)
    assert kernel.name == {"avx512": F32_TILES_NAME if amx else "panel", "avx2": "panel (AVX2)"}[isa]
    generator = torch.Generator().manual_seed(0)
    # One group, uneven thread shares (3 and 37 groups); K off the 128-step blocks and over several of them.
    for out_features, in_features in ((64, 40), (64 * 3, 200), (64 * 37, 130), (1024, 300)):
        weight = torch.randn(out_features, in_features, generator=generator)
        bias = torch.randn(out_features, generator=generator)
        packed = _panel_packed(weight)
        for rows in (1, 2, 3, 5, 6, 7, 12, 16, 17, 40, 300):  # partial register blocks; 300: two row chunks
            x = torch.randn(rows, in_features, generator=generator)
            for b in (None, bias):
                expected = F.linear(x.double(), weight.double(), None if b is None else b.double()).float()
                assert torch.allclose(kernel(x, packed, b), expected, atol=1e-4, rtol=1e-4), (out_features, rows)
    # Rows of a strided 3-D activation (a view, as the model hands over), and no rows at all.
    x = torch.randn(2, 5, 2 * 300, generator=generator)[:, :, ::2]
    assert torch.allclose(kernel(x, packed, bias), F.linear(x, weight, bias), atol=1e-4)
    assert kernel(torch.randn(0, 300), packed, bias).shape == (0, 1024)
    # What it packs: large float32 weights with whole groups; the rest goes to oneDNN's layout or stays.
    large = torch.randn(ONEDNN_MIN_WEIGHT_ELEMENTS // 256 + 64, 256, generator=generator)
    assert torch.equal(kernel.pack(large), _panel_packed(large))
    assert kernel.pack(large[:-16]).dim() == 2  # an output size off the groups: oneDNN's layout
    assert kernel.pack(large.half()) is None
    assert kernel.pack(large[:64]) is None  # small: F.linear
    x = torch.randn(3, 256, generator=generator)
    odd = large[:-16].contiguous()
    assert torch.allclose(kernel(x, kernel.pack(odd)), F.linear(x, odd), atol=1e-4)
    # bfloat16 panels (a bfloat16 checkpoint's values, packed at half the bytes): the same products
    for out_features, in_features in ((64, 40), (64 * 37, 130), (1024, 300)):
        weight = torch.randn(out_features, in_features, generator=generator).bfloat16().float()
        bias = torch.randn(out_features, generator=generator)
        packed = kernel.pack(weight) if weight.numel() >= ONEDNN_MIN_WEIGHT_ELEMENTS else panel_layout(
            weight.bfloat16())
        assert packed.dtype == torch.bfloat16
        for rows in (1, 2, 3, 5, 7, 16, 17):
            x = torch.randn(rows, in_features, generator=generator)
            expected = F.linear(x.double(), weight.double(), bias.double()).float()
            assert torch.allclose(kernel(x, packed, bias), expected, atol=1e-4, rtol=1e-4), (out_features, rows)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_every_linear_gives_the_same_sums_whatever_number_of_threads_claims_its_groups(isa, monkeypatch):
    """A linear's threads claim its column groups as they go (csrc/group_claims.h): with 1, 2 or 3 threads (more
    than this machine's cores, so that one runs late and the others take its groups), at one row, a few and two
    chunks of rows, every group is computed once and every output is the same, bit for bit."""
    if isa == "avx512" and not AVX512:
        pytest.skip("the AVX-512 library needs an AVX-512 CPU")
    if isa == "avx2":
        if not HAS_AVX2:
            pytest.skip("the AVX2 library needs a CPU with AVX2 and FMA")
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    library = native.NativeLibrary.load() if isa == "avx512" else native.NativeLibrary.load_avx2()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64 * 37, 202, generator=generator).bfloat16().float()  # (bfloat16 values)
    bias = torch.randn(64 * 37, generator=generator)
    pairs = panel_layout(weight.bfloat16())
    exact = lambda x, w=weight: F.linear(x.double(), w.double(), bias.double())  # noqa: E731
    # name: (the linear of float32 rows, the exact products it approximates, their tolerance)
    linears = {"float32": (lambda x, k=PanelLinear(library.atb_panel_linear_f32, None, None),
                           w=_panel_packed(weight): k(x, w, bias), exact, 1e-4),
               "bfloat16 panels": (lambda x, k=PanelLinear(None, None, None, library.atb_bf16_linear_f32):
                                   k(x, pairs, bias), exact, 1e-4)}
    if isa == "avx512":
        dot = PanelLinear(None, None, None, library.atb_bf16_dot_linear_f32)
        linears["bfloat16 dot product"] = (lambda x: dot(x.bfloat16().float(), pairs, bias),
                                           lambda x: exact(x.bfloat16()), 1e-4)
        int8, (q, scale) = NativeW8A16(library.atb_w8a16_linear_f32, TorchW8A16()), quantize(weight, None)
        linears["int8"] = (lambda x, w=int8.pack(q, scale): int8(x, w, bias, scale),
                           lambda x: exact(x, dequantize(q, scale)), 1e-2)  # (its activations in int16 steps)
    if isa == "avx512":  # (the dot product at every row count, whatever this CPU's measurements chose)
        dot_rows, dot_on = library.atb_bf16_dot_decode_rows(-1), library.atb_bf16_use_dot(-1)
        library.atb_bf16_dot_decode_rows(6)
        library.atb_bf16_use_dot(1)
    try:
        _same_sums_with_1_2_and_3_threads(linears, 202, generator)
    finally:
        if isa == "avx512":
            library.atb_bf16_dot_decode_rows(dot_rows)
            library.atb_bf16_use_dot(dot_on)


def test_every_linear_on_amx_tiles_gives_the_same_sums_whatever_number_of_threads_claims_its_groups():
    """As above, for the products on AMX tiles (a bfloat16 model's, a float32 model's in three parts, int8's): on an
    AMX CPU, or on tiles emulated in software (ATB_MODELS_AMX_EMULATED=1, as .ci/run runs these tests elsewhere)."""
    library = native.NativeLibrary.load() if AVX512 else None
    if library is None or not library.atb_bf16_amx_available() or not library.atb_w8a16_tiles_available():
        pytest.skip("this CPU, this build or this process has no AMX tiles (ATB_MODELS_AMX_EMULATED=1 emulates them)")
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64 * 37, 256, generator=generator).bfloat16().float()  # (K: a multiple of 64, for int8's)
    bias = torch.randn(64 * 37, generator=generator)
    pairs = panel_layout(weight.bfloat16())
    exact = lambda x, w=weight: F.linear(x.double(), w.double(), bias.double())  # noqa: E731
    panels = PanelLinear(None, None, None, library.atb_bf16_linear_f32)  # (the float32 model's, in three parts)
    dot = PanelLinear(None, None, None, library.atb_bf16_dot_linear_f32)  # (the bfloat16 model's)
    int8, (q, scale) = NativeW8A16(None, TorchW8A16(), library.atb_w8a16_tiles_linear_f32), quantize(weight, None)
    linears = {"float32 in three parts": (lambda x: panels(x, pairs, bias), exact, 1e-4),
               "bfloat16": (lambda x: dot(x.bfloat16().float(), pairs, bias), lambda x: exact(x.bfloat16()), 1e-4),
               # (1 row: the register blocks on the tiles' layout; 7 and 300: the tiles)
               "int8": (lambda x, w=int8.pack(q, scale): int8(x, w, bias, scale),
                        lambda x: exact(x, dequantize(q, scale)), 1e-2)}
    was = library.atb_bf16_use_amx(1), library.atb_f32_use_amx(1)
    try:
        _same_sums_with_1_2_and_3_threads(linears, 256, generator)
    finally:
        library.atb_bf16_use_amx(was[0])
        library.atb_f32_use_amx(was[1])


def _same_sums_with_1_2_and_3_threads(linears: dict, in_features: int, generator: torch.Generator) -> None:
    """Each of `linears` (name: (the linear of float32 rows, the exact products it approximates, their tolerance))
    on 1, 7 and 300 rows gives the same outputs with 1, 2 and 3 threads, close to the exact ones."""
    threads = torch.get_num_threads()
    try:
        for name, (linear, expected_of, tolerance) in linears.items():
            for rows in (1, 7, 300):
                x = torch.randn(rows, in_features, generator=generator)
                outputs = []
                for count in (1, 2, 3):
                    torch.set_num_threads(count)
                    outputs.append(linear(x))
                assert torch.allclose(outputs[0].double(), expected_of(x), atol=tolerance, rtol=tolerance), (name, rows)
                assert all(torch.equal(y, outputs[0]) for y in outputs[1:]), (name, rows)
    finally:
        torch.set_num_threads(threads)


def test_the_cpu_linear_follows_its_environment_variable(monkeypatch):
    monkeypatch.setenv("ATB_MODELS_CPU_LINEAR", "onednn")
    kernel = linear_kernel(CPU_FP32)
    assert isinstance(kernel, OneDnnLinear) and not isinstance(kernel, PanelLinear)
    assert type(Kernels.for_plan(CPU_FP32).decode_attention) is CpuDecodeAttention  # no native kernels either
    monkeypatch.setenv("ATB_MODELS_CPU_LINEAR", "torch")
    assert linear_kernel(CPU_FP32) is PLAIN_LINEAR
    monkeypatch.setenv("ATB_MODELS_CPU_LINEAR", "fastest")
    with pytest.raises(UserError, match="ATB_MODELS_CPU_LINEAR='fastest'"):
        linear_kernel(CPU_FP32)


def test_decode_streams_prefetch_as_chosen_and_multiply_the_same_either_way(monkeypatch, caplog):
    from atb_models.kernels import linear
    from atb_models.kernels.w8a16 import quantize

    kernels = native_kernels()
    library = native.NativeLibrary.load()
    monkeypatch.setattr(native.NativeLibrary, "load", classmethod(lambda cls: library))
    chosen, measure = library.atb_use_stream_prefetch(-1), linear._time_stream_prefetch
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64 * 5, 300, generator=generator)
    q, scales = quantize(weight, None)
    cases = [(kernels.linear, panel_layout(weight), None),  # float32 panels
             (kernels.linear, panel_layout(weight.bfloat16()), None),  # bfloat16 pairs, widened
             (kernels.w8a16, kernels.w8a16.pack(q, scales), scales)]  # int8 pairs
    assert kernels.linear.bf16_op is not None
    try:
        for kernel, packed, scale in cases:
            for rows in (1, 5, 16):  # one pass (the switch's) and several (not switched)
                x = torch.randn(rows, 300, generator=generator)
                outputs = []
                for on in (1, 0):
                    library.atb_use_stream_prefetch(on)
                    outputs.append(kernel(x, packed, None) if scale is None else kernel(x, packed, None, scale))
                assert torch.equal(*outputs), (type(kernel).__name__, rows)
        # The environment decides where set; a value it does not know is refused in one line.
        for value in ("0", "1"):
            monkeypatch.setenv(linear.STREAM_PREFETCH_ENV, value)
            monkeypatch.setattr(linear, "_time_stream_prefetch", lambda *a: pytest.fail("measured though set"))
            assert linear.stream_prefetch_chosen(library) is (value == "1")
            assert library.atb_use_stream_prefetch(-1) == int(value)
        monkeypatch.setenv(linear.STREAM_PREFETCH_ENV, "fast")
        with pytest.raises(UserError, match="ATB_MODELS_CPU_PREFETCH='fast'"):
            Kernels.for_plan(CPU_FP32)
        monkeypatch.delenv(linear.STREAM_PREFETCH_ENV)
        # Else measured once a process (the timing stubbed): off only where the stream is faster without.
        for timings, on in (((2.0, 1.0), False), ((1.0, 2.0), True), ((1.0, 1.0), True)):
            monkeypatch.setattr(linear, "_stream_prefetch_measured", {})
            monkeypatch.setattr(linear, "_time_stream_prefetch", lambda *a, t=timings: t)
            with caplog.at_level("INFO", logger="atb_models.kernels"):
                Kernels.for_plan(CPU_FP32)
                Kernels.for_plan(CPU_FP32)
            assert library.atb_use_stream_prefetch(-1) == int(on)
            assert caplog.text.count("software prefetches") == 1, caplog.text
            caplog.clear()
        # The real measurement: two positive medians.
        assert all(seconds > 0 for seconds in measure(library, pairs=1))
    finally:
        monkeypatch.undo()
        library.atb_use_stream_prefetch(chosen)  # this process's measured choice, for the tests after


def test_the_last_level_cache_is_read_from_sysfs(tmp_path):
    from atb_models.host import last_level_cache_bytes

    for index, (level, size) in enumerate([(1, "32K"), (2, "1024K"), (3, "32768K"), (3, "junk")]):
        folder = tmp_path / "cpu0" / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        (folder / "level").write_text(f"{level}\n")
        (folder / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path / "cpu0" / "cache") == 32 << 20
    assert last_level_cache_bytes(tmp_path / "none") == 0


@pytest.mark.parametrize("compiler", [None, "/bin/false"])
def test_without_a_working_compiler_the_cpu_kernels_fall_back_to_onednn_and_pytorch(monkeypatch, tmp_path, caplog,
                                                                                   compiler):
    monkeypatch.setenv("ATB_MODELS_HOME", str(tmp_path))
    monkeypatch.setattr(native, "compiler", lambda: compiler)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with caplog.at_level("INFO", logger="atb_models.native"):
        kernels = Kernels.for_plan(CPU_FP32, "panel")
    assert isinstance(kernels.linear, OneDnnLinear) and not isinstance(kernels.linear, PanelLinear)
    assert type(kernels.decode_attention) is CpuDecodeAttention and type(kernels.decoder_layer) is LayerByLayer
    assert "no C++ compiler" in caplog.text if compiler is None else "failed" in caplog.text
    assert not list(tmp_path.rglob("*.so")), "no library and no half-built file is left behind"


# ------------------------------------------------------------------------------------ the native declaration

def test_the_avx2_library_holds_its_functions_and_structs_and_is_refused_as_the_whole_library(monkeypatch):
    if not HAS_AVX2:
        pytest.skip("this CPU has no AVX2 and FMA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    library = native.NativeLibrary.load_avx2()
    assert library is not None and library.isa == "avx2"
    report = dict(item.split("=") for item in library.atb_native_abi().decode().split())
    assert report == {"version": str(native.ABI_VERSION), "isa": "avx2",
                      **{name: str(ctypes.sizeof(struct)) for name, struct in library.structs.items()}}
    assert set(library.structs) == set(native.STRUCTS)
    assert all(hasattr(library, name) for name in native.AVX2_FUNCTIONS)
    assert not hasattr(library, "atb_w8a16_linear_f32") and not hasattr(library, "atb_bf16_dot_linear_f32")
    path = native.build(native.AVX2_LIBRARY, native.AVX2_CXX_FLAGS)
    with pytest.raises(native.AbiMismatch, match="has no function"):
        native.NativeLibrary(ctypes.CDLL(str(path)))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # no AVX2: none
    assert native.NativeLibrary.load_avx2() is None


def test_the_native_library_reports_the_struct_sizes_its_declaration_generates():
    if not AVX512:
        pytest.skip("the native library needs an AVX-512 CPU")
    library = native.NativeLibrary.load()
    assert library is not None
    report = dict(item.split("=") for item in library.atb_native_abi().decode().split())
    assert report == {"version": str(native.ABI_VERSION), "isa": "avx512",
                      **{name: str(ctypes.sizeof(struct)) for name, struct in library.structs.items()}}


def test_a_struct_declared_unlike_the_library_is_refused_and_pytorch_runs(monkeypatch, caplog):
    if not AVX512:
        pytest.skip("the native library needs an AVX-512 CPU")
    right = native.STRUCTS["LayerWeights"]
    monkeypatch.setitem(native.STRUCTS, "LayerWeights", tuple(f for f in right if f[0] != "qkv_bias"))
    with caplog.at_level("WARNING", logger="atb_models.native"):
        assert native.NativeLibrary.load() is None
        kernels = Kernels.for_plan(CPU_FP32)
    message = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "struct LayerWeights is 232 bytes in the library, 224 declared" in message
    assert "using PyTorch's operators instead" in message
    assert isinstance(kernels.linear, OneDnnLinear) and not isinstance(kernels.linear, PanelLinear)
    assert type(kernels.decode_attention) is CpuDecodeAttention and type(kernels.rms_norm) is RMSNormKernel
    assert type(kernels.silu_and_mul) is SiluAndMul and type(kernels.decoder_layer) is LayerByLayer


def test_a_function_or_an_abi_version_the_library_lacks_is_refused(monkeypatch, caplog):
    if not AVX512:
        pytest.skip("the native library needs an AVX-512 CPU")
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
    with caplog.at_level("WARNING", logger="atb_models.native"):
        assert native.NativeLibrary.load() is None
    assert f"ABI version {native.ABI_VERSION - 1} in the library, {native.ABI_VERSION} declared" in caplog.text
    monkeypatch.undo()
    monkeypatch.setitem(native.FUNCTIONS, "atb_fused_everything_f32", (None, ()))
    with caplog.at_level("WARNING", logger="atb_models.native"):
        assert native.NativeLibrary.load() is None
    assert "no function atb_fused_everything_f32" in caplog.text


_C_TYPES = {"int64_t": native.I64, "float": native.F32}


def test_the_function_table_names_every_argument_as_the_c_sources_declare_it():
    """The declaration and csrc's extern "C" definitions: same functions, same argument names in the same order,
    types that agree (pointers as void* or a declared struct, int64_t, float)."""
    sources = "".join(path.read_text() for path in sorted(native.SOURCE_DIR.glob("*.[ch]*")))
    definitions = dict(re.findall(r"^(?:const )?\w+\*? (atb_\w+)\(([^)]*)\) \{", sources, re.MULTILINE))
    assert set(definitions) == set(native.FUNCTIONS)
    for name, (_, arguments) in native.FUNCTIONS.items():
        declared = [" ".join(a.split()) for a in definitions[name].split(",") if a.strip()]
        assert [a.split()[-1].lstrip("*") for a in declared] == [n for n, _ in arguments], name
        for text, (_, kind) in zip(declared, arguments):
            c_type = text.rsplit(" ", 1)[0].removeprefix("const ")
            pointer = "*" in text
            if isinstance(kind, str):
                assert c_type == kind, (name, text)
            elif pointer:
                assert kind is native.PTR, (name, text)
            else:
                assert _C_TYPES[c_type] is kind, (name, text)


# ------------------------------------------------------------------------- native kernels against PyTorch

def _decode_step(lengths: list, block_size: int, num_blocks: int, head_dim: int, generator):
    """A decode step's context as the model runner makes it, for sequences of `lengths` (each counting its new
    token), each in its own blocks in no order; and each new position's rotary, as the model computes it."""
    from atb_models.layers.attention import StepContext
    from atb_models.layers.rotary import MRotaryEmbedding

    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(lengths), 10, dtype=torch.long)  # unused entries padded with 0 as the runner does
    used = 0
    for row, length in enumerate(lengths):
        count = ceil_div(length, block_size)
        tables[row, :count] = order[used:used + count]
        used += count
    last = [n - 1 for n in lengths]
    slots = torch.tensor([[tables[b, t // block_size].item() for b, t in enumerate(last)],
                          [t % block_size for t in last]])
    context = torch.tensor(lengths)
    step = StepContext(False, slots, block_tables=tables, context_lens=context)  # the mask made where asked for
    positions = torch.tensor(last).expand(3, -1)
    cos, sin = MRotaryEmbedding(head_dim, 10000.0, [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
                                torch.device("cpu")).cos_sin(positions, torch.float32)
    return step, cos, sin


def test_a_decode_steps_mask_is_made_once_from_its_context_lengths():
    from atb_models.layers.attention import StepContext

    step = StepContext(False, torch.zeros(2, 3, dtype=torch.long), block_tables=torch.zeros(3, 2, dtype=torch.long),
                       context_lens=torch.tensor([1, 5, 8]))
    mask = step.decode_mask(8)
    assert mask.shape == (3, 1, 1, 8)
    assert mask[:, 0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [1] * 8]
    assert step.decode_mask(8) is mask  # once a step, for every layer
    given = torch.ones(3, 1, 1, 8, dtype=torch.bool)
    assert StepContext(False, step.slot_mapping, context_mask=given, context_lens=step.context_lens).decode_mask(8) \
        is given


@pytest.mark.parametrize("head_dim", [64, 128, 48])
def test_native_decode_attention_stores_and_attends_as_the_pytorch_path_does(head_dim, any_native_kernels):
    kernel = any_native_kernels.decode_attention
    assert isinstance(kernel, NativeDecodeAttention)
    generator = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, block_size, num_blocks = 14, 2, 4, 40
    # One token, exactly a block, a block and one, 16 (whole vectors of scores), 37 (vectors and a tail).
    lengths = [1, 4, 5, 16, 37]
    step, cos, sin = _decode_step(lengths, block_size, num_blocks, head_dim, generator)
    cache = [torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=generator) for _ in range(2)]
    # q, k, v as the model hands them over: strided views into one projection output.
    qkv = 3 * torch.randn(len(lengths), heads + 2 * kv_heads, head_dim, generator=generator)  # scores over ~[-30, 30]
    results = []
    for attend in (CpuDecodeAttention(), kernel):
        k_cache, v_cache = cache[0].clone(), cache[1].clone()
        out = attend(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, step, head_dim ** -0.5, upcast=False)
        results.append((out, k_cache, v_cache))
    (expected, k_expected, v_expected), (got, k_got, v_got) = results
    # Whole 16-float vectors per head row run natively; otherwise the kernel declines and PyTorch runs.
    assert kernel.suits(qkv[:, :heads], k_got) == (head_dim % 16 == 0)
    assert torch.equal(v_got, v_expected)
    assert torch.allclose(k_got, k_expected, atol=1e-5, rtol=1e-5)  # rotated: rounding may differ in the last bit
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(k_expected, cache[0])  # the step did store its K


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_decode_attention_gives_a_sequence_the_same_output_alone_as_in_a_batch(dtype):
    """A bfloat16 model whose layers the native decoder layer does not take (at two ranks or more) decodes through
    CpuDecodeAttention: a sequence's output alone and beside two others is the same, bit for bit (SDPA, which ran
    batch 1, differed from the batched matmuls by a unit of bfloat16's last place, enough to change a token)."""
    from atb_models.layers.attention import StepContext

    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, block_size, num_blocks = 14, 2, 64, 4, 40
    step, cos, sin = _decode_step([37, 5, 16], block_size, num_blocks, head_dim, generator)
    cos, sin = cos.to(dtype), sin.to(dtype)  # the rotary in the model's dtype, as the model computes it
    alone = StepContext(False, step.slot_mapping[:, :1], block_tables=step.block_tables[:1],
                        context_lens=step.context_lens[:1])
    cache = [torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=generator).to(dtype) for _ in range(2)]
    qkv = torch.randn(3, heads + 2 * kv_heads, head_dim, generator=generator).to(dtype)
    outputs = []
    for context, rows in ((alone, 1), (step, 3)):
        k_cache, v_cache = cache[0].clone(), cache[1].clone()
        outputs.append(CpuDecodeAttention()(qkv[:rows], heads, kv_heads, cos[:rows], sin[:rows], k_cache, v_cache,
                                            context, head_dim ** -0.5, upcast=False))
    assert torch.equal(outputs[0][0], outputs[1][0])


def test_native_rms_norm_matches_the_pytorch_operators_with_and_without_the_residual_add(any_native_kernels):
    from atb_models.layers.norm import RMSNorm

    kernel = any_native_kernels.rms_norm
    assert isinstance(kernel, NativeRMSNorm)
    generator = torch.Generator().manual_seed(0)
    for rows, hidden in ((1, 896), (16, 40), (100, 1536)):  # 40: a partial vector; 100 rows: threaded
        plain, fast = RMSNorm(hidden, 1e-6, torch.float32, RMSNormKernel()), RMSNorm(hidden, 1e-6, torch.float32,
                                                                                      kernel)
        weight = torch.randn(hidden, generator=generator)
        plain.weight.copy_(weight)
        fast.weight.copy_(weight)
        x = torch.randn(rows, hidden, generator=generator)
        delta = torch.randn(rows, hidden, generator=generator)
        expected_sum = x + delta
        expected = plain(expected_sum)
        total, got = fast.add_and_norm(x, delta)
        assert torch.equal(total, expected_sum)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.allclose(fast(x), plain(x), atol=1e-5, rtol=1e-5)
        assert torch.allclose(fast(x.t().contiguous().t()), plain(x), atol=1e-5)  # not its case: PyTorch's


def test_native_silu_and_mul_matches_pytorchs_silu_times_up_on_the_halves_of_a_projection(any_native_kernels):
    kernel = any_native_kernels.silu_and_mul
    assert isinstance(kernel, NativeSiluAndMul)
    generator = torch.Generator().manual_seed(0)
    for rows, width in ((4, 4864), (500, 40), (300, 200)):  # 40, 200: partial vectors; 300 x 200: threaded
        projection = 8 * torch.randn(rows, 2 * width, generator=generator)
        projection[0, :4] = torch.tensor([0.0, -200.0, 200.0, -1e-30])  # zero, far on either side, tiny
        gate, up = projection.split(width, dim=-1)
        expected = F.silu(gate.double()) * up.double()
        got = kernel(gate, up)
        assert got.shape == (rows, width) and got.is_contiguous()
        assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5), (rows, width)
    # Halves of different shapes or layouts, or too few values to repay the call, are not its case: PyTorch runs.
    assert not kernel.suits(gate, up[:, :-1]) and not kernel.suits(gate.t(), up.t())
    assert not kernel.suits(gate[:1], up[:1])
    assert not kernel.suits(gate.double(), up.double())
    assert torch.allclose(kernel(gate[:1], up[:1]), F.silu(gate[:1]) * up[:1])
    # PyTorch's formula, x / (1 + e^-x): -0 where e^-x overflows; and in bfloat16 every value's silu PyTorch's.
    assert str(kernel(torch.full((64, 512), -100.0), torch.ones(64, 512))[0, 0].item()) == "-0.0"
    if torch.bfloat16 in kernel._ops:
        every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).view(64, 1024)
        halves = torch.cat((every, torch.ones_like(every)), -1).split(1024, dim=-1)
        got, expected = kernel(*halves), F.silu(halves[0]) * halves[1]
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got[~got.isnan()], expected[~got.isnan()])


def test_native_vision_rotary_rotates_q_and_k_in_place_as_pytorchs_operators_do_bit_for_bit(any_native_kernels):
    """Each product and the sum rounded to float32 (no fused multiply-add), then to the tower's dtype: PyTorch's
    float32 rotation of the same values exactly."""
    kernel = any_native_kernels.vision_rotary
    assert isinstance(kernel, NativeVisionRotary)
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, heads, dim in ((700, 4, 80), (300, 3, 36), (2000, 2, 64)):  # 80, 36: partial vectors of a half
            qkv = (4 * torch.randn(rows, 3, heads, dim, generator=generator)).to(dtype)
            qkv[0, 0, 0, :3] = torch.tensor([0.0, -1e30, 1e-30])
            angles = torch.rand(rows, dim // 2, generator=generator) * 100
            cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
            q, k, v = qkv.unbind(1)
            v_before = v.clone()
            expected = [apply_rotary(t.float(), cos, sin).to(dtype) for t in (q, k)]
            got = kernel(q, k, cos, sin)
            assert all(g.data_ptr() == t.data_ptr() for g, t in zip(got, (q, k))), "rotated where they lie"
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (dtype, rows, heads, dim)
            assert torch.equal(v, v_before)
    # Other layouts or cos of another dtype: PyTorch's rotation, out of place.
    q, k = torch.randn(2, 64, 4, 80).unbind(0)
    cos, sin = torch.randn(2, 64, 80).unbind(0)
    assert kernel.suits(q, k, cos, sin)
    assert not kernel.suits(q, k[:, :, :-1], cos, sin) and not kernel.suits(q, k, cos[:, :-1], sin[:, :-1])
    assert not kernel.suits(q, k, cos.double(), sin.double()) and not kernel.suits(q, k, cos.t(), sin.t())
    # q and k overlapping (the same heads, or rows that run into each other): threads would race.
    assert not kernel.suits(q, q, cos, sin)
    overlapping = torch.randn(64 * 4 * 80 + 40)
    assert not kernel.suits(overlapping[:-40].view(64, 4, 80), overlapping[40:].view(64, 4, 80), cos, sin)
    k_strided = torch.randn(64, 4, 160)[:, :, :80]
    assert not kernel.suits(q, k_strided, cos, sin)
    q_before = q.clone()
    got, _ = kernel(q, k_strided, cos, sin)
    assert torch.equal(got, apply_rotary(q_before, cos, sin)) and torch.equal(q, q_before)


def test_native_quick_gelu_matches_pytorchs_three_operators_in_place(any_native_kernels):
    """float32 within float32's rounding of the exact value (as PyTorch's, from 1.702 x in float32); bfloat16
    rounded after each operator as PyTorch's: its bits, but where the two exponentials could round either side of
    a bfloat16 boundary one bfloat16 step apart (none of 2 M random values was)."""
    kernel = any_native_kernels.quick_gelu
    assert isinstance(kernel, NativeQuickGelu)
    generator = torch.Generator().manual_seed(0)
    extremes = torch.tensor([0.0, -200.0, 200.0, -1e-30, -60.0, 60.0, float("inf"), float("-inf"), float("nan")])
    for n in (5 * 4096 + 5, 40000, 200_003):  # a partial vector and a partial task; threaded
        x = 6 * torch.randn(n, generator=generator)
        x[:len(extremes)] = extremes
        exact = x.double() * torch.sigmoid((1.702 * x).double())  # of 1.702 x in float32, as PyTorch's
        assert torch.allclose((x * torch.sigmoid(1.702 * x)).double(), exact, rtol=2e-6, atol=1e-30, equal_nan=True)
        got = kernel(x.clone())
        assert torch.allclose(got.double(), exact, rtol=2e-6, atol=1e-30, equal_nan=True), n
        assert torch.equal(got.isnan(), exact.isnan())
        xb = x.bfloat16()
        reference = QuickGelu()(xb)
        buffer = xb.clone()
        got = kernel(buffer)
        assert got.data_ptr() == buffer.data_ptr(), "in place"
        same = (got == reference) | (got.isnan() & reference.isnan())
        assert same.float().mean() > 0.999, (n, same.float().mean())
        assert torch.allclose(got.float(), reference.float(), rtol=2 ** -7, atol=0, equal_nan=True), n
    # A strided tensor: PyTorch's operators, out of place; a small one native too.
    x = torch.randn(64, 512)
    view = x[:, :256]
    before = view.clone()
    assert torch.equal(kernel(view), QuickGelu()(before)) and torch.equal(view, before)
    assert torch.allclose(kernel(x[:1].clone()), QuickGelu()(x[:1]), rtol=2e-6, atol=1e-30)


def _random_decoder_layer(kernels):
    """A Qwen2 decoder layer large enough for every linear to be packed for the panel kernels (output sizes
    multiples of 64), random weights; and its config."""
    from atb_models.layers.sharding import HeadLayout
    from atb_models.models.qwen2_vl import DecoderLayer

    generator = torch.Generator().manual_seed(0)
    config = SimpleNamespace(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                             intermediate_size=1024)
    layer = DecoderLayer(config, HeadLayout(8, 2, 1, 0), torch.float32, False, kernels)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
    return layer, config


def _decode_layer_both_ways(layer, fused, lengths=(1, 17, 40, 5)):
    """One decode step of sequences of `lengths` (four by default) through `layer`, operator by operator and by
    `fused`, each from the same KV cache: the caches it started from, and (output, k_cache, v_cache) of each way."""
    generator = torch.Generator().manual_seed(1)
    block_size = 16
    num_blocks = max(12, sum(ceil_div(n, block_size) for n in lengths) + 2)
    step, cos, sin = _decode_step(lengths, block_size, num_blocks, 64, generator)
    caches = [torch.randn(num_blocks, 2, block_size, 64, generator=generator) for _ in range(2)]
    x = torch.randn(len(lengths), 512, generator=generator)
    results = []
    for run in (LayerByLayer(), fused):
        layer.k_cache, layer.v_cache = caches[0].clone(), caches[1].clone()
        step.kernel_state.clear()
        results.append((run(layer, x.clone(), cos, sin, step), layer.k_cache, layer.v_cache))
    assert "decoder_layer" in step.kernel_state, "the layer was the native kernel's case"
    return caches, results


def test_native_decoder_layer_decodes_as_the_layer_does_operator_by_operator(any_native_kernels):
    from atb_models.layers.linear import pack_weights
    from atb_models.layers.sharding import HeadLayout
    from atb_models.models.qwen2_vl import DecoderLayer

    kernels = any_native_kernels
    fused = kernels.decoder_layer
    assert isinstance(fused, NativeDecoderLayer)
    layer, config = _random_decoder_layer(kernels)
    assert pack_weights(layer) == 4
    caches, results = _decode_layer_both_ways(layer, fused)
    (expected, k_expected, v_expected), (got, k_got, v_got) = results
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(k_got, k_expected, atol=1e-6) and torch.equal(v_got, v_expected)
    assert not torch.equal(k_expected, caches[0])  # the step did store its K
    # Not its case: the attention upcast (the layer's own forward runs), weights not in the panel layout.
    layer.upcast_attention, layer.k_cache = True, caches[0].clone()
    assert fused.weights_of(layer) is None
    unpacked = DecoderLayer(config, HeadLayout(8, 2, 1, 0), torch.float32, False, kernels)
    unpacked.k_cache, unpacked.v_cache = caches
    assert fused.weights_of(unpacked) is None


def test_native_decoder_layers_run_a_stack_in_one_call_as_layer_by_layer_and_fall_back_where_one_is_not_its_case(
        any_native_kernels):
    from atb_models.layers.linear import pack_weights

    kernels = any_native_kernels
    fused = kernels.decoder_layer
    layers = [_random_decoder_layer(kernels)[0] for _ in range(3)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for parameter in layer.parameters():
                parameter.mul_(1 + 0.25 * i)  # three different layers
            assert pack_weights(layer) == 4
    generator = torch.Generator().manual_seed(2)
    lengths, block_size, num_blocks = [3, 20, 9], 16, 8
    step, cos, sin = _decode_step(lengths, block_size, num_blocks, 64, generator)
    caches = [[torch.randn(num_blocks, 2, block_size, 64, generator=generator) for _ in range(2)] for _ in layers]
    x = torch.randn(len(lengths), 512, generator=generator)
    calls = {"one": 0, "each": 0}
    one, each = fused._layers_op, fused._op
    fused._layers_op = lambda *args: (calls.__setitem__("one", calls["one"] + 1), one(*args))
    fused._op = lambda *args: (calls.__setitem__("each", calls["each"] + 1), each(*args))

    def run(way):
        for layer, (k, v) in zip(layers, caches):
            layer.k_cache, layer.v_cache = k.clone(), v.clone()
        step.kernel_state.clear()
        return way.run_layers(layers, x.clone(), cos, sin, step), [(l.k_cache, l.v_cache) for l in layers]

    expected, expected_caches = run(LayerByLayer())
    got, got_caches = run(fused)
    assert calls == {"one": 1, "each": 0}
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # (The later layers' inputs differ in the last bits, and so do their caches.)
    for (k_got, v_got), (k_expected, v_expected) in zip(got_caches, expected_caches):
        assert torch.allclose(k_got, k_expected, atol=1e-5) and torch.allclose(v_got, v_expected, atol=1e-5)
    # New KV caches: new weights for the layers, and a stack of them (the outputs as before).
    again, _ = run(fused)
    assert calls == {"one": 2, "each": 0} and torch.equal(again, got)
    assert all(a is b for a, b in zip(fused._stack[0], (fused.weights_of(layer) for layer in layers)))
    # One layer not the kernel's case (the attention upcast): each layer runs alone, that one by its own forward.
    layers[1].upcast_attention = True
    alone, _ = run(fused)
    assert calls == {"one": 2, "each": 2}
    layers[1].upcast_attention = False
    assert torch.allclose(alone, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- two models in one process

def test_two_llms_of_different_dtypes_in_one_process_each_keep_their_own_kernels(tiny_checkpoint, sample_image_path):
    """A float32 and a bfloat16 engine generating in turn (A, B, A, B): each gives the tokens it gives alone, the
    float32 one transformers' greedy tokens; neither's kernels are the other's."""
    from atb_models import LLM, SamplingParams
    from tests.parity_utils import reference_generate

    path = tiny_checkpoint(shape=_packed_mlp_shape())
    requests = [[{"text": "Hello, what colour is the sky?"}],
                [{"image": str(sample_image_path)}, {"text": "What is in the picture?"}]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def make(dtype):
        return LLM(str(path), dtype=dtype, device="cpu", max_batch_size=2, max_input_length=1024,
                   max_output_length=8, block_size=16)

    def tokens(llm):
        outputs = llm.generate(requests, params)
        assert all(o.error is None for o in outputs)
        return [o.token_ids for o in outputs]

    if refuses_bf16(lambda: make("bfloat16")):
        pytest.skip(NO_NATIVE_BF16)
    alone_b = tokens(make("bfloat16"))  # each reference made while no other engine exists
    a = make("float32")
    alone_a = tokens(a)
    for request, got in zip(requests, alone_a):
        assert got == reference_generate(path, a.preprocessor(request), 6)[0]
    b = make("bfloat16")
    assert a.runner.kernels is not b.runner.kernels
    for _ in range(2):
        assert tokens(a) == alone_a
        assert tokens(b) == alone_b
    # Each keeps the kernels chosen for its own dtype: the native float32 ones (on an AVX-512 CPU) are A's alone.
    assert type(b.runner.kernels.decode_attention) is CpuDecodeAttention
    assert isinstance(a.runner.kernels.decode_attention, NativeDecodeAttention) == AVX512
    assert all(layer.decode_attention is a.runner.kernels.decode_attention for layer in a.runner.model.model.layers)


def _packed_mlp_shape():
    """test_parity's "packed_mlp" shape: MLP weights large enough for the CPU's packed linears."""
    from atb_models.demo.checkpoint import TinyShape

    return TinyShape(hidden_size=256, intermediate_size=1024, num_hidden_layers=1, vision_depth=1)



def _mapping_of(address: int) -> dict:
    """The /proc/self/smaps entry (its address range and fields) of the mapping holding `address`, or {}."""
    for entry in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        start, end = (int(part, 16) for part in entry.split(None, 1)[0].split("-"))
        if start <= address < end:
            return {"range": (start, end), **dict(re.findall(r"^(\w+):\s+(.*)$", entry, re.M))}
    return {}


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_packed_weights_of_whole_huge_pages_are_laid_out_as_before_on_memory_advised_for_them(monkeypatch):
    from atb_models.host import HUGE_PAGE
    from atb_models.kernels.linear import pair_layout

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = re.search(r"\[(\w+)\]", thp.read_text()).group(1) if thp.exists() else "never"
    weight = torch.randn(1024, 768)  # 3 MB: one whole huge page and a tail
    packed = panel_layout(weight)
    assert torch.equal(packed, weight.reshape(16, 64, 768).transpose(1, 2))
    assert packed.is_contiguous() and packed.data_ptr() % HUGE_PAGE == 0
    mapping = _mapping_of(packed.data_ptr())
    if mode != "never":
        assert mapping["THPeligible"] == "1"
    del packed  # the mapping goes with the tensor
    assert _mapping_of(mapping["range"][0]).get("range") != mapping["range"]

    int8 = torch.randint(-128, 128, (256, 8192), dtype=torch.int8)  # 2 MB
    paired = pair_layout(int8)
    assert torch.equal(paired, int8.reshape(4, 64, 4096, 2).transpose(1, 2))
    assert paired.data_ptr() % HUGE_PAGE == 0

    monkeypatch.setenv("ATB_MODELS_HUGE_PAGES", "0")  # torch's allocator: the kit maps and advises nothing
    # (Whether torch's memory is eligible for huge pages is not the kit's to say: a range numpy advised earlier in
    # the process may be reused for it.)
    import mmap

    def no_mapping(*args, **kwargs):
        raise AssertionError("with ATB_MODELS_HUGE_PAGES=0 the kit must leave the weight to torch's allocator")

    monkeypatch.setattr(mmap, "mmap", no_mapping)
    plain = panel_layout(weight)
    assert torch.equal(plain, weight.reshape(16, 64, 768).transpose(1, 2))
    monkeypatch.undo()
    monkeypatch.setenv("ATB_MODELS_HUGE_PAGES", "yes")
    with pytest.raises(UserError, match="ATB_MODELS_HUGE_PAGES"):
        panel_layout(weight)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_a_kernels_packed_weights_lie_one_after_another_on_one_mapping_advised_for_huge_pages(monkeypatch):
    """PanelLinear.pack lays each weight after the one before in its host.HugePages: a weight under one huge page
    (o_proj's in a small model) and every tail are on memory advised for huge pages too, and the mapping goes
    with the last of its tensors and the kernel."""
    from atb_models.host import HUGE_PAGE, HugePages

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = re.search(r"\[(\w+)\]", thp.read_text()).group(1) if thp.exists() else "never"
    kernel = PanelLinear(None, None, None)
    weights = [torch.randn(out_features, 896) for out_features in (1152, 896, 64 * 7)]  # 4.1, 3.2 and 1.6 MB
    packed = [kernel.pack_panels(w) for w in weights]
    assert all(torch.equal(p, _panel_packed(w)) and p.is_contiguous() for w, p in zip(weights, packed))
    starts = [p.data_ptr() for p in packed]
    assert starts[0] % HUGE_PAGE == 0 and all(start % 64 == 0 for start in starts)  # the mapping's first
    # each right after the one before
    assert starts[1:] == [start + p.numel() * p.element_size() for start, p in zip(starts, packed)][:-1]
    mapping = _mapping_of(starts[-1])
    assert mapping["range"] == _mapping_of(starts[0])["range"]
    if mode != "never":
        assert mapping["THPeligible"] == "1"
    del packed, kernel
    assert _mapping_of(mapping["range"][0]).get("range") != mapping["range"]
    # A weight larger than what the mapping has left starts a new one; huge pages off: torch's allocator.
    pages = HugePages()
    monkeypatch.setattr(HugePages, "RESERVE", 4 * HUGE_PAGE)
    first, second = pages.empty((3 * HUGE_PAGE,), torch.uint8), pages.empty((2 * HUGE_PAGE,), torch.uint8)
    assert _mapping_of(first.data_ptr())["range"] != _mapping_of(second.data_ptr())["range"]
    assert second.data_ptr() % HUGE_PAGE == 0
    monkeypatch.setenv("ATB_MODELS_HUGE_PAGES", "0")
    import mmap

    def no_mapping(*args, **kwargs):
        raise AssertionError("with ATB_MODELS_HUGE_PAGES=0 the kit must leave the weight to torch's allocator")

    monkeypatch.setattr(mmap, "mmap", no_mapping)
    assert pages.empty((16, 64), torch.float32).shape == (16, 64)


def test_huge_pages_refused_once_leave_a_kernels_later_weights_to_torchs_allocator_without_asking_again(
        monkeypatch, caplog):
    import mmap

    from atb_models.host import HugePages

    asked = []

    def refused(*args, **kwargs):
        asked.append(args)
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(mmap, "mmap", refused)
    pages = HugePages()
    with caplog.at_level("INFO", logger="atb_models.host"):
        tensors = [pages.empty((64, 64), torch.float32) for _ in range(3)]
    assert all(t.shape == (64, 64) and t.is_contiguous() for t in tensors) and len(asked) == 1
    assert caplog.text.count("no huge-page mapping") == 1


def test_native_decode_attention_gives_nan_for_the_heads_that_see_a_nan_key_as_pytorch_does():
    attention = native_kernels().decode_attention
    assert isinstance(attention, NativeDecodeAttention)
    k_cache, v_cache = torch.randn(4, 2, 16, 64), torch.randn(4, 2, 16, 64)
    k_cache[1, 0, 3, 7] = float("nan")  # sequence 0's context, KV head 0 (query heads 0 and 1)
    qkv = torch.randn(2, 8, 64)
    out = attention.attend_paged(qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], k_cache, v_cache, torch.tensor([[1], [2]]),
                                 torch.tensor([10, 10]), 0.125)
    assert out[0, :2].isnan().all() and out[0, 2:].isfinite().all() and out[1].isfinite().all()
