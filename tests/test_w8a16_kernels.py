"""Weight-only int8 (W8A16) kernels: the kit's native CPU kernel against the dequantized weight's F.linear, its
place in a fused decoder layer, and which kernel each plan gets (the NPU's by a stand-in torch_npu)."""

import ctypes
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from atb_models import platform
from atb_models.kernels import Kernels
from atb_models.kernels.decoder_layer import NativeDecoderLayer
from atb_models.kernels.linear import amx_tiles_allowed
from atb_models.kernels.native import INT8_TILES_FORMAT
from atb_models.kernels.w8a16 import NativeW8A16, NpuW8A16, TorchW8A16, dequantize, quantize, w8a16_kernel
from atb_models.platform import Capabilities, resolve_plan
from atb_models.kernels.native import NativeLibrary
from atb_models.layers.linear import pack_weights
from tests.test_kernels import (AVX512, CPU_BF16, CPU_FP32, HAS_AVX2, _decode_layer_both_ways, _random_decoder_layer,
                                native_kernels)

NPU = Capabilities(kind="npu", name="Ascend910B3", native_bf16=True, native_fp16=True, device_count=1)


def native_w8a16() -> NativeW8A16:
    kernel = native_kernels().w8a16
    assert isinstance(kernel, NativeW8A16), "the native library runs the int8 linears on an AVX-512 CPU"
    return kernel


def native_w8a16_both_ways() -> list[NativeW8A16]:
    """The plan's native kernel and, where it runs on AMX-INT8 tiles, the same library's kernel without them."""
    kernel = native_w8a16()
    library = NativeLibrary.load()
    tiles = amx_tiles_allowed() and bool(library.atb_w8a16_tiles_available())  # ($ATB_MODELS_CPU_BF16_AMX=0: off)
    assert (kernel.name == "native, AMX-INT8 tiles") == tiles
    return [kernel, NativeW8A16(library.atb_w8a16_linear_f32, TorchW8A16())] if tiles else [kernel]


def packed_as(kernel: NativeW8A16, out_features: int, in_features: int, group: int) -> tuple:
    """The shape `kernel.pack` gives: the tiles' layout where the kernel has tiles and the input size and scale
    groups are multiples of 64, else pairs."""
    if kernel.name.endswith("tiles") and in_features % 64 == 0 and group % 64 == 0:
        return (out_features // 64, 2, in_features // 4, 32, 4)
    return (out_features // 64, in_features // 2, 64, 2)


def int16_activations(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the native kernel multiplies with (csrc/w8a16_linear.h), computed as it does in float32: each row cut
    into blocks of at most 512 columns inside each of `groups` scale groups, each block rounded (half to even) to
    int16 steps of its largest magnitude / 32767. Returns (the rows as the kernel sees them, in float64; the size
    of each column's step)."""
    rows, in_features = x.shape
    group = in_features // groups
    seen = torch.empty(rows, in_features, dtype=torch.float64)
    step = torch.empty(rows, in_features, dtype=torch.float64)
    for g in range(groups):
        for k0 in range(g * group, (g + 1) * group, 512):
            k1 = min(k0 + 512, (g + 1) * group)
            block = x[:, k0:k1].float()
            amax = block.abs().amax(dim=1, keepdim=True)
            inverse = torch.where(amax > 0, torch.full_like(amax, 32767.0) / amax, 0.0)  # not reciprocal * 32767
            q = torch.round(block * inverse).clamp(-32767, 32767)
            s = (amax / 32767.0).double()
            seen[:, k0:k1], step[:, k0:k1] = q.double() * s, s.expand(-1, k1 - k0)
    return seen, step


@pytest.mark.parametrize("group_size", [None, 64, 128])
def test_native_w8a16_multiplies_its_int16_activations_exactly_within_their_step(group_size):
    for kernel in native_w8a16_both_ways():
        _multiplies_int16_activations_exactly(kernel, group_size)


def _multiplies_int16_activations_exactly(kernel, group_size):
    generator = torch.Generator().manual_seed(group_size or 0)
    # One column group; uneven thread shares (3 groups); K over several 512-column blocks per channel.
    for out_features, in_features in [(64, 256), (192, 384), (640, 1280)]:
        q, s = quantize(torch.randn(out_features, in_features, generator=generator), group_size)
        packed, bias = kernel.pack(q, s), torch.randn(out_features, generator=generator)
        assert packed.shape == packed_as(kernel, out_features, in_features, group_size or in_features)
        assert packed.dtype == torch.int8
        weight = dequantize(q, s).double()
        # One register block up to 6 rows; several passes beyond; 2 chunks (the tiles: register blocks up to 5
        # rows, a block of tiles up to 16, several beyond)
        for rows in (1, 3, 6, 7, 16, 300):
            x = torch.randn(rows, in_features, generator=generator)
            x[0, 5] = 40.0  # an outlier: only its own block's steps grow
            seen, step = int16_activations(x, s.shape[1])
            for b in (None, bias):
                got = kernel(x, packed, b, s).double()
                bias64 = None if b is None else b.double()
                # The products of the 16-bit activations, to float32's rounding of the sums...
                assert torch.allclose(got, F.linear(seen, weight, bias64), atol=1e-4, rtol=1e-5), (in_features, rows)
                # ...which are the float activations' to within half a step a column.
                bound = F.linear(step / 2, weight.abs()) + 1e-4
                assert ((got - F.linear(x.double(), weight, bias64)).abs() <= bound).all()


@pytest.mark.parametrize("group_size", [None, 64, 128])
def test_native_w8a16_on_amx_tiles_gives_the_vector_kernels_outputs_bit_for_bit(group_size):
    """Each activation's two bytes multiply apart on the tiles, exactly in int32: the same block sums, so the same
    outputs, whatever the rows (register blocks on the tiles' layout up to 5 rows, tiles beyond, chunks of 256)."""
    kernels = native_w8a16_both_ways()
    if len(kernels) == 1:
        pytest.skip("this CPU, this build or this process has no AMX-INT8 tiles")
    tiles, vectors = kernels
    generator = torch.Generator().manual_seed(7)
    # K over several scale groups and 512-column blocks (4864: a block of 256 at the end); 1, 3 and 14 halves
    for out_features, in_features in [(64, 128), (192, 1536), (896, 4864)]:
        q, s = quantize(torch.randn(out_features, in_features, generator=generator), group_size)
        packed_tiles, packed_pairs = tiles.pack(q, s), vectors.pack(q, s)
        assert packed_tiles.shape == (out_features // 64, 2, in_features // 4, 32, 4)
        bias = torch.randn(out_features, generator=generator)
        for rows in (1, 5, 6, 16, 17, 40, 257):
            # rows of magnitudes 1e-20 to 1e20, a zero and an outlier
            x = torch.randn(rows, in_features, generator=generator) * torch.logspace(-20, 20, rows).unsqueeze(1)
            x[0, 1], x[-1, 2] = 0.0, -3e4
            for b in (None, bias):
                assert torch.equal(tiles(x, packed_tiles, b, s), vectors(x, packed_pairs, b, s)), (in_features, rows)


def test_a_nan_or_an_infinite_activation_makes_its_blocks_outputs_nan_as_in_float():
    generator = torch.Generator().manual_seed(5)
    q, s = quantize(torch.randn(64, 1024, generator=generator))
    for rows in (4, 8):  # (on AMX-INT8 tiles: 4 rows by the register blocks, 8 by the tiles)
        x = torch.randn(rows, 1024, generator=generator)
        x[0, 5], x[1, 700], x[2, 9] = float("nan"), float("inf"), -float("inf")
        for kernel in native_w8a16_both_ways():
            y = kernel(x, kernel.pack(q, s), None, s)
            assert y[:3].isnan().all() and not y[3:].isnan().any()
            assert torch.allclose(y[3:], F.linear(x[3:], dequantize(q, s)), atol=1e-2)  # (16-bit activations)


def test_a_block_of_activations_too_small_for_float32s_inverse_is_quantized_right():
    """Under 32767 / FLT_MAX (about 1e-34) 32767 / amax overflows: such a block is scaled up first, and its zeros
    stay zeros."""
    generator = torch.Generator().manual_seed(6)
    q, s = quantize(torch.randn(64, 512, generator=generator))
    x = torch.randn(7, 512, generator=generator) * 1e-36
    x[:, ::2] = 0.0
    expected = F.linear(x.double(), dequantize(q, s).double())
    for kernel in native_w8a16_both_ways():
        y = kernel(x, kernel.pack(q, s), None, s).double()
        assert ((y - expected).abs() <= 1e-2 * expected.abs().max()).all()


def test_native_w8a16_packs_for_the_tiles_only_weights_whose_input_and_scale_groups_are_multiples_of_64():
    kernel = NativeW8A16(None, TorchW8A16(), tiles_op=lambda *args: None)  # (packing only: no product is run)
    assert kernel.name == "native, AMX-INT8 tiles"
    q = torch.randint(-127, 128, (128, 192), dtype=torch.int8)
    assert kernel.pack(q, torch.ones(128, 1)).shape == (2, 2, 48, 32, 4)      # per channel
    assert kernel.pack(q, torch.ones(128, 3)).shape == (2, 2, 48, 32, 4)      # groups of 64
    assert kernel.pack(q, torch.ones(128, 6)).shape == (2, 96, 64, 2)         # groups of 32: pairs
    assert kernel.pack(q[:, :160], torch.ones(128, 1)).shape == (2, 80, 64, 2)  # K = 160
    assert NativeW8A16(None, TorchW8A16()).pack(q, torch.ones(128, 1)).shape == (2, 96, 64, 2)


def test_the_tiles_layout_holds_each_columns_four_weights_of_a_quad_in_a_lane():
    from atb_models.kernels.w8a16 import tile_layout

    q = torch.randint(-127, 128, (128, 256), dtype=torch.int8)
    packed = tile_layout(q)
    for g, h, u, c in [(0, 0, 0, 0), (0, 1, 5, 31), (1, 0, 63, 7), (1, 1, 17, 20)]:
        assert torch.equal(packed[g, h, u, c], q[64 * g + 32 * h + c, 4 * u:4 * u + 4])


def test_the_tiles_are_not_used_for_int8_where_switched_off_or_wrong(monkeypatch, caplog):
    library = NativeLibrary.load() if AVX512 else None
    if library is None or not library.atb_w8a16_tiles_available():
        pytest.skip("this CPU, this build or this process has no AMX-INT8 tiles")
    monkeypatch.setenv("ATB_MODELS_CPU_BF16_AMX", "0")
    assert w8a16_kernel(CPU_FP32, library).name == "native"
    monkeypatch.delenv("ATB_MODELS_CPU_BF16_AMX")
    assert w8a16_kernel(CPU_FP32, library).name == "native, AMX-INT8 tiles"

    def wrong(x, rows, in_features, ldx, weight, out_features, scale, groups, bias, y):
        library.atb_w8a16_tiles_linear_f32(x, rows, in_features, ldx, weight, out_features, scale, groups, bias, y)
        ctypes.memset(y, 0, 4)  # one output off

    wrapped = SimpleNamespace(atb_w8a16_linear_f32=library.atb_w8a16_linear_f32, atb_w8a16_tiles_linear_f32=wrong,
                              atb_w8a16_tiles_available=library.atb_w8a16_tiles_available)
    assert w8a16_kernel(CPU_FP32, wrapped).name == "native"
    assert "on AMX tiles gave other products" in caplog.text


def test_native_w8a16_takes_views_and_bfloat16_and_leaves_unpackable_weights_to_pytorch():
    kernel = native_w8a16()
    generator = torch.Generator().manual_seed(1)
    q, s = quantize(torch.randn(128, 96, generator=generator), 32)
    packed = kernel.pack(q, s)
    x = torch.randn(2, 5, 2 * 96, generator=generator)[:, :, ::2]  # strided rows of a 3-D activation
    assert torch.allclose(kernel(x, packed, None, s), F.linear(x, dequantize(q, s)), atol=1e-3)
    y = kernel(x.bfloat16(), packed, None, s)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 128)
    assert torch.allclose(y.float(), F.linear(x.bfloat16().float(), dequantize(q, s)), atol=0.1, rtol=0.02)
    assert kernel(torch.randn(0, 96), packed, None, s).shape == (0, 128)
    # Not packed: an output size off the 64-column groups, an odd input size or an odd scale group, a float
    # weight. PyTorch's operators run on the [out, in] weight.
    odd_q, odd_s = quantize(torch.randn(100, 96, generator=generator))
    assert kernel.pack(odd_q) is None and kernel.pack(torch.randn(128, 96)) is None
    assert kernel.pack(quantize(torch.randn(64, 131))[0]) is None
    odd_group_q, odd_group_s = quantize(torch.randn(64, 90, generator=generator), 15)
    assert kernel.pack(odd_group_q, odd_group_s) is None and kernel.pack(odd_group_q) is not None
    assert torch.allclose(kernel(x, odd_q, None, odd_s), F.linear(x, dequantize(odd_q, odd_s)), atol=1e-4)


def test_w8a16_kernel_follows_the_cpu_and_the_native_library():
    if AVX512:
        assert isinstance(Kernels.for_plan(CPU_FP32).w8a16, NativeW8A16)
        # a bfloat16 model's plan (the library runs its int8 linears whether or not the CPU has native bf16)
        assert isinstance(Kernels.for_plan(CPU_BF16).w8a16, NativeW8A16)
    for choice in ("torch", "onednn"):  # no native library loaded
        assert type(Kernels.for_plan(CPU_FP32, choice).w8a16) is TorchW8A16
    assert type(w8a16_kernel(CPU_FP32, None)) is TorchW8A16  # the library absent (no AVX-512, no compiler)


def test_a_native_w8a16_kernel_that_multiplies_wrong_is_not_used(monkeypatch, caplog):

    def wrong(x, rows, in_features, ldx, weight, out_features, scale, groups, bias, y):
        ctypes.memset(y, 0xFF, rows * out_features * 4)  # NaNs: torch.empty's memory may hold the right product

    library = SimpleNamespace(atb_w8a16_linear_f32=wrong)
    assert type(w8a16_kernel(CPU_FP32, library)) is TorchW8A16
    assert "W8A16 kernel gave wrong products" in caplog.text


def _fake_torch_npu(monkeypatch, with_op: bool):
    calls = []

    def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_group_size=0):
        calls.append((x, weight, antiquant_scale, antiquant_group_size))
        group = antiquant_group_size or weight.shape[0]
        scale = antiquant_scale.reshape(-1, weight.shape[1]).repeat_interleave(group, dim=0)
        return x @ (weight.to(x.dtype) * scale)

    fake = SimpleNamespace(npu=SimpleNamespace())
    if with_op:
        fake.npu_weight_quant_batchmatmul = npu_weight_quant_batchmatmul
    monkeypatch.setattr(platform, "_import_torch_npu", lambda: fake)
    return calls


def test_on_an_npu_the_fused_op_gets_the_weight_as_k_by_n_and_scales_in_the_activation_dtype(monkeypatch):
    calls = _fake_torch_npu(monkeypatch, with_op=True)
    kernel = Kernels.for_plan(resolve_plan("auto", "auto", "bfloat16", caps=NPU)).w8a16
    assert isinstance(kernel, NpuW8A16) and kernel.pack(torch.zeros(64, 8, dtype=torch.int8)) is None
    generator = torch.Generator().manual_seed(0)
    x, bias = torch.randn(2, 3, 256, generator=generator), torch.randn(64, generator=generator)
    for group_size, scale_shape, op_group in ((None, (64,), 0), (128, (2, 64), 128)):
        q, s = quantize(torch.randn(64, 256, generator=generator), group_size)
        y = kernel(x, q, bias, s)
        rows, weight, antiquant_scale, antiquant_group_size = calls[-1]
        assert rows.shape == (6, 256) and weight.shape == (256, 64) and torch.equal(weight, q.t())
        assert antiquant_scale.shape == scale_shape and antiquant_scale.dtype == x.dtype
        assert antiquant_group_size == op_group
        assert y.shape == (2, 3, 64)
        assert torch.allclose(y, F.linear(x, dequantize(q, s), bias), atol=1e-4)
        assert kernel(x, q, bias, s) is not None and calls[-1][2] is antiquant_scale  # converted once


def test_on_an_npu_whose_torch_npu_lacks_the_op_int8_weights_are_dequantized(monkeypatch):
    _fake_torch_npu(monkeypatch, with_op=False)
    kernel = w8a16_kernel(resolve_plan("auto", "auto", "bfloat16", caps=NPU))
    assert type(kernel) is TorchW8A16
    q, s = quantize(torch.randn(64, 32))
    x = torch.randn(3, 32)
    assert torch.allclose(kernel(x, q, None, s), F.linear(x, dequantize(q, s)))


def _quantize_linears(layer, kernel, group_size):
    """The layer's four linears as the int8 checkpoint loads them: weight int8 (packed), weight_scale [out, groups]."""
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        q, s = quantize(linear.weight.detach(), group_size)
        linear.weight = torch.nn.Parameter(kernel.pack(q, s), requires_grad=False)
        linear.weight_scale = s
        linear.forward = lambda x, linear=linear: kernel(x, linear.weight, linear.bias, linear.weight_scale)


@pytest.mark.parametrize("group_size", [None, 64])
def test_native_decoder_layer_with_int8_linears_decodes_as_the_layer_does_operator_by_operator(group_size):
    for kernel in native_w8a16_both_ways():  # (int8 in pairs, and where the CPU has AMX-INT8 in the tiles' layout)
        _decodes_as_operator_by_operator(kernel, group_size)


def _decodes_as_operator_by_operator(kernel, group_size):
    kernels = native_kernels()
    fused = kernels.decoder_layer
    assert isinstance(fused, NativeDecoderLayer)
    layer, _ = _random_decoder_layer(kernels)
    _quantize_linears(layer, kernel, group_size)
    # 4 rows, and 9 (on AMX-INT8 tiles: the register blocks, then the tiles)
    for lengths in ((1, 17, 40, 5), (1, 17, 40, 5, 3, 9, 2, 30, 6)):
        caches, results = _decode_layer_both_ways(layer, fused, lengths)
        (expected, k_expected, v_expected), (got, k_got, v_got) = results
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.allclose(k_got, k_expected, atol=1e-5) and torch.allclose(v_got, v_expected, atol=1e-5)
    tiles = layer.mlp.down_proj.weight.dim() == 5
    assert tiles == kernel.name.endswith("tiles")
    assert (fused.weights_of(layer).down_format == INT8_TILES_FORMAT) == tiles
    # Scales of another shape, or an int8 linear left unpacked ([out, in]), are not its case.
    layer.k_cache = caches[0].clone()
    down = layer.mlp.down_proj
    down.weight_scale = down.weight_scale[:-1]
    assert fused.weights_of(layer) is None
    q, down.weight_scale = quantize(torch.randn(512, 1024), group_size)
    down.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.k_cache = caches[0].clone()
    assert fused.weights_of(layer) is None


def test_the_avx2_librarys_decoder_layer_leaves_a_layer_with_int8_linears_to_its_own_forward(monkeypatch):
    """The AVX2 library has no int8 linear: its decoder layer declines such a layer rather than read int8 weights
    as another format; the float32 layer it does run (tests/test_kernels.py)."""
    if not HAS_AVX2:
        pytest.skip("the AVX2 library needs a CPU with AVX2 and FMA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # (so the plain layer packs)
    kernels = Kernels.for_plan(CPU_FP32)
    plain, int8 = _random_decoder_layer(kernels)[0], _random_decoder_layer(kernels)[0]
    pack_weights(plain)
    _quantize_linears(int8, NativeW8A16(None, TorchW8A16()), 64)  # packed as the AVX-512 library's kernel takes
    fused = NativeDecoderLayer(NativeLibrary.load_avx2())
    assert fused.name == "native (AVX2)"
    for layer in (plain, int8):
        layer.k_cache, layer.v_cache = (torch.zeros(4, 2, 16, 64) for _ in range(2))
    assert fused.weights_of(plain) is not None and fused.weights_of(int8) is None
    # The int8 layer is packed as a layer the AVX-512 library takes: declined for the library, not its layout.
    fused._int8 = True
    int8.k_cache = int8.k_cache.clone()
    assert fused.weights_of(int8) is not None


def test_the_native_library_is_built_with_vnni_avx512_bf16_and_amx_only_where_the_cpu_reports_them():
    from atb_models.kernels.native import CXX_FLAGS, compile_flags

    both = "processor\t: 0\nflags\t\t: fpu avx512f avx512bw avx512_vnni avx512_bf16\n"
    vnni = "processor\t: 0\nflags\t\t: fpu avx512f avx512bw avx512_vnni\n"
    bf16 = "processor\t: 0\nflags\t\t: fpu avx512f avx512bw avx512_bf16\n"
    assert compile_flags(both) == (*CXX_FLAGS, "-mavx512vnni", "-mavx512bf16")
    assert compile_flags(vnni) == (*CXX_FLAGS, "-mavx512vnni")
    assert compile_flags(bf16) == (*CXX_FLAGS, "-mavx512bf16")
    assert compile_flags("flags\t\t: fpu avx512f avx512bw\n") == CXX_FLAGS and "-mavx512bw" in CXX_FLAGS
    amx = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8\n"
    assert compile_flags(amx) == (*CXX_FLAGS, "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8")


@pytest.mark.slow
def test_without_vnni_the_library_multiplies_int8_weights_with_avx512bw_alone(monkeypatch, tmp_path):
    """An AVX-512 CPU without VNNI (Skylake-X): the library built for it takes the multiply-add path."""
    if not AVX512:
        pytest.skip("needs an AVX-512 CPU to run the library")
    from atb_models import host
    from atb_models.kernels import native

    cpuinfo = host.read_cpuinfo().replace(" avx512_vnni", "")
    monkeypatch.setattr(host, "read_cpuinfo", lambda: cpuinfo)
    monkeypatch.setenv("ATB_MODELS_HOME", str(tmp_path))
    library = native.NativeLibrary.load()
    assert library is not None and [p.name for p in (tmp_path / "native").glob("*.so")]
    kernel = w8a16_kernel(CPU_FP32, library)
    assert isinstance(kernel, NativeW8A16)  # its products checked right before use
    generator = torch.Generator().manual_seed(3)
    q, s = quantize(torch.randn(128, 1100, generator=generator))
    x = torch.randn(9, 1100, generator=generator)
    seen, _ = int16_activations(x, 1)
    assert torch.allclose(kernel(x, kernel.pack(q, s), None, s).double(), F.linear(seen, dequantize(q, s).double()),
                          atol=1e-4, rtol=1e-5)
