"""bfloat16 on the CPU's native path: the bf16 panel kernel against a float reference, the fused decoder layer on
bf16 weights, residual stream and KV cache against PyTorch's bf16 operators, and which kernels a bf16 model gets
on CPUs of other flags (simulated)."""

import dataclasses
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from atb_models.errors import UserError
from atb_models.host import cpu_flags
from atb_models.kernels import Kernels, native
from atb_models.kernels.attention import NativeBf16Attention, SegmentAttention
from atb_models.kernels.decoder_layer import LayerByLayer, NativeDecoderLayer
from atb_models.kernels.linear import OneDnnLinear, PanelLinear, is_panel_packed
from atb_models.platform import cpu_capabilities, resolve_plan
from tests.test_kernels import AVX512, CPU_BF16, CPU_FP32, _decode_step, float32_library_expected


def native_bf16_kernels() -> Kernels:
    if not AVX512:
        pytest.skip("the native kernels need an AVX-512 CPU")
    kernels = Kernels.for_plan(CPU_BF16)
    assert isinstance(kernels.linear, PanelLinear) and kernels.linear.bf16_op is not None
    return kernels


def native_bf16_attention_kernels() -> Kernels:
    """native_bf16_kernels whose attention within segments is the kit's (skips where it is not)."""
    kernels = native_bf16_kernels()
    if not isinstance(kernels.attention, NativeBf16Attention):
        pytest.skip("the kit's bfloat16 attention needs AVX512-BF16")
    return kernels


def _pair_packed(weight: torch.Tensor) -> torch.Tensor:
    """The bfloat16 panel layout written out by hand: group g, pair p, column c holds W[64g + c, 2p : 2p + 2]."""
    out_features, in_features = weight.shape
    packed = torch.empty(out_features // 64, in_features // 2, 64, 2, dtype=weight.dtype)
    for g in range(out_features // 64):
        for p in range(in_features // 2):
            packed[g, p] = weight[64 * g:64 * g + 64, 2 * p:2 * p + 2]
    return packed


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_bf16_panel_kernel_matches_a_float_reference_on_the_same_bf16_values(isa, monkeypatch):
    if isa == "avx2":  # the AVX2 library's widening kernel (tested on any CPU with AVX2 and FMA)
        if not {"avx2", "fma"} <= cpu_flags():
            pytest.skip("the AVX2 library needs a CPU with AVX2 and FMA")
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        kernel = PanelLinear(None, None, None, native.NativeLibrary.load_avx2().atb_bf16_linear_f32)
    else:
        kernel = native_bf16_kernels().linear
    generator = torch.Generator().manual_seed(0)
    # One group; uneven thread shares (3, 37 groups); K off 16 (an odd number of pairs), off the 64- and 128-step
    # blocks, over several.
    for out_features, in_features in ((64, 40), (128, 6), (64 * 3, 202), (64 * 37, 130), (1024, 300)):
        weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
        bias = torch.randn(out_features, generator=generator)
        packed = _pair_packed(weight)
        # partial register blocks, widened K blocks beyond 6, 2 chunks; AVX2: 3 and 17 uneven passes, 40 past the
        # passes that prefetch the next block
        for rows in (1, 2, 3, 5, 6, 7, 16, 17, 40, 300):
            x = torch.randn(rows, in_features, generator=generator).bfloat16()
            for b in (None, bias):
                expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
                # Exact products summed in float32; returned in the activation's dtype (bf16: rounded once).
                assert torch.allclose(kernel(x.float(), packed, b).double(), expected, atol=1e-4, rtol=1e-4), \
                    (out_features, in_features, rows)
                got = kernel(x, packed, b)
                assert got.dtype == torch.bfloat16
                assert torch.allclose(got.double(), expected, atol=1e-2, rtol=8e-3)
    if isa == "avx2":
        return
    # The dot-product kernel a bfloat16 model's inputs may take (AVX512-BF16 where the library has it, past 6
    # rows; turned on here whatever this CPU's measurement chose): the same exact products summed in float32, by
    # pairs of k-steps.
    library = native.NativeLibrary.load()
    chosen = library.atb_bf16_use_dot(-1)
    library.atb_bf16_use_dot(1)
    try:
        dot = PanelLinear(None, None, None, library.atb_bf16_dot_linear_f32)
        for out_features, in_features in ((64, 42), (64 * 3, 202), (64 * 5, 300)):
            w = torch.randn(out_features, in_features, generator=generator).bfloat16()
            b = torch.randn(out_features, generator=generator)
            for rows in (2, 7, 16, 300):
                x = torch.randn(rows, in_features, generator=generator).bfloat16()
                expected = F.linear(x.double(), w.double(), b.double())
                assert torch.allclose(dot(x.float(), _pair_packed(w), b).double(), expected, atol=1e-4,
                                      rtol=1e-4), (out_features, in_features, rows)
    finally:
        library.atb_bf16_use_dot(chosen)
    # Float32 activations are taken as they are (a float32 model whose weights are bf16 values): float32 products.
    x = torch.randn(3, 300, generator=generator)
    exact = F.linear(x.double(), weight.double(), bias.double())
    assert torch.allclose(kernel(x, packed, bias).double(), exact, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(kernel(x.bfloat16().float(), packed, bias).double(), exact, atol=1e-4, rtol=1e-4)
    # Rows of a strided activation (a view), and no rows.
    x = torch.randn(2, 5, 2 * 300, generator=generator).bfloat16()[:, :, ::2]
    assert torch.allclose(kernel(x.float(), packed, bias), F.linear(x.float(), weight.float(), bias), atol=1e-4)
    assert kernel(torch.randn(0, 300).bfloat16(), packed, bias).shape == (0, 1024)


def test_the_avx2_library_gives_a_row_the_same_sums_at_every_row_count(monkeypatch):
    """On bfloat16 panels the AVX2 library widens in its register blocks up to 31 rows and, from 32, each K block once
    into float32 for the float32 blocks: every row's sums the same, bit for bit, either way (k order from the bias
    on), with and without a bias, rows read with a stride."""
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("the AVX2 library needs a CPU with AVX2 and FMA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    op = native.NativeLibrary.load_avx2().atb_bf16_linear_f32
    generator = torch.Generator().manual_seed(5)
    for out_features, in_features in ((64, 42), (192, 300), (128, 130)):  # one K block, three, two
        weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
        packed, bias = _pair_packed(weight), torch.randn(out_features, generator=generator)
        x = torch.randn(300, in_features + 6, generator=generator)  # rows in_features + 6 apart
        for b in (bias, None):
            outputs = []
            for rows in (1, 2, 7, 31, 32, 33, 64, 257, 300):  # a row alone, passes of 2, widened once, 2 chunks
                y = torch.full((rows, out_features), float("nan"))
                op(x.data_ptr(), rows, in_features, x.stride(0), packed.data_ptr(), out_features,
                   None if b is None else b.data_ptr(), y.data_ptr())
                outputs.append(y)
            assert all(torch.equal(y, outputs[-1][:len(y)]) for y in outputs), (in_features, b is None)
            expected = F.linear(x[:, :in_features].double(), weight.double(), None if b is None else b.double())
            assert torch.allclose(outputs[-1].double(), expected, atol=1e-4, rtol=1e-4)


def test_batched_rows_widen_in_registers_or_in_blocks_to_the_same_sums_as_chosen(monkeypatch, caplog):
    from atb_models.kernels import linear

    kernel = native_bf16_kernels().linear
    library = native.NativeLibrary.load()
    monkeypatch.setattr(native.NativeLibrary, "load", classmethod(lambda cls: library))
    chosen = library.atb_bf16_widen_in_registers(-1)
    generator = torch.Generator().manual_seed(1)
    try:
        for out_features, in_features in ((64, 40), (64 * 3, 202), (64 * 37, 130)):
            weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
            bias = torch.randn(out_features, generator=generator)
            packed = _pair_packed(weight)
            # One pass; blocks whose first pass (up to 5 rows, widening) has 2, 5 and 6 more; many (the longer K
            # blocks); two chunks.
            for rows in (3, 7, 10, 11, 16, 17, 40, 300):
                x = torch.randn(rows, in_features, generator=generator)
                for b in (None, bias):
                    ways = []
                    for on in (1, 0):
                        library.atb_bf16_widen_in_registers(on)
                        ways.append(kernel(x, packed, b))
                    assert torch.equal(*ways), (out_features, in_features, rows)
                    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
                    assert torch.allclose(ways[0].double(), expected, atol=1e-4, rtol=1e-4)
        # The environment decides where set; a value it does not know is refused in one line.
        for value, on in (("registers", 1), ("blocks", 0)):
            monkeypatch.setenv(linear.BF16_WIDENING_ENV, value)
            monkeypatch.setattr(linear, "_time_bf16_widening", lambda *a: pytest.fail("measured though set"))
            assert linear.bf16_widening_chosen(library) == value and library.atb_bf16_widen_in_registers(-1) == on
        monkeypatch.setenv(linear.BF16_WIDENING_ENV, "fastest")
        with pytest.raises(UserError, match="ATB_MODELS_CPU_BF16_WIDEN='fastest'"):
            Kernels.for_plan(CPU_FP32)
        monkeypatch.delenv(linear.BF16_WIDENING_ENV)
        # Else measured once a process (stubbed): the faster way.
        for timings, on in (((1.0, 2.0), 1), ((2.0, 1.0), 0)):
            monkeypatch.setattr(linear, "_bf16_widening_measured", {})
            monkeypatch.setattr(linear, "_time_bf16_widening", lambda *a, t=timings: t)
            with caplog.at_level("INFO", logger="atb_models.kernels"):
                Kernels.for_plan(CPU_FP32)
                Kernels.for_plan(CPU_FP32)
            assert library.atb_bf16_widen_in_registers(-1) == on
            assert caplog.text.count("bfloat16 weights widened for 16 rows") == 1, caplog.text
            caplog.clear()
    finally:
        monkeypatch.undo()
        library.atb_bf16_widen_in_registers(chosen)  # this process's measured choice, for the tests after


def test_the_widening_is_timed_on_weights_evicted_from_the_caches_as_a_decode_step_meets_them(monkeypatch):
    from atb_models.kernels import linear

    native_bf16_kernels()  # (skips where the native kernels cannot run)
    library = native.NativeLibrary.load()
    evicted, evict = [], library.atb_evict_from_caches
    monkeypatch.setattr(library, "atb_evict_from_caches", lambda p, n: (evicted.append(n), evict(p, n)))
    was = library.atb_bf16_widen_in_registers(-1)
    try:
        registers, blocks = linear._time_bf16_widening(library, repeats=2)
    finally:
        library.atb_bf16_widen_in_registers(was)
    assert registers > 0 and blocks > 0
    assert evicted == [2048 * 1008 * 2] * 6  # before every call, the untimed round's too: 4 MB of bfloat16


def test_the_panel_kernel_packs_large_bf16_weights_at_their_width_and_leaves_the_rest_to_onednn():
    kernel = native_bf16_kernels().linear
    large = torch.randn(1024, 512).bfloat16()
    packed = kernel.pack(large)
    assert packed.dtype == torch.bfloat16 and torch.equal(packed, _pair_packed(large))
    assert not is_panel_packed(kernel.pack(large[:-16]))  # an output size off the groups: oneDNN's layout or none
    assert not is_panel_packed(kernel.pack(large[:, :-1]))  # an odd input size: no pairs
    assert kernel.pack(large[:64]) is None  # small: F.linear
    assert kernel.pack(large.half()) is None
    without_bf16 = PanelLinear(kernel._native, kernel._linear, kernel._reorder, bf16_op=None)
    assert not is_panel_packed(without_bf16.pack(large))



# 3 rows: the widening kernel on float32 copies; 19 and 300 (past a chunk of 256): the dot product where the build
# has it (turned on here whatever this CPU measured), and the widening kernel on float32 copies with it off.
@pytest.mark.parametrize("dot", [True, False])
@pytest.mark.parametrize("rows", [3, 19, 300])
def test_bf16_rows_in_and_out_give_the_float32_path_s_sums_rounded_once(rows, dot, monkeypatch, caplog):
    loaded = native_bf16_kernels().linear
    library = native.NativeLibrary.load()
    if dot and not library.atb_bf16_dot_available():
        pytest.skip("this library has no AVX512-BF16 dot product")
    kernel = PanelLinear(None, None, None, loaded.bf16_op, bf16_dot_op=library.atb_bf16_dot_linear_f32,
                         bf16_rows_op=library.atb_bf16_dot_linear_bf16)
    generator = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(1024, 512, generator=generator).bfloat16(), torch.randn(1024, generator=generator)
    packed = loaded.pack(weight)
    wide = torch.randn(rows, 520, generator=generator).bfloat16()
    x = wide[:, 6:518]  # rows 520 apart: the kernel reads them where they lie
    float_path = PanelLinear(None, None, None, loaded.bf16_op, bf16_dot_op=library.atb_bf16_dot_linear_f32)
    was = library.atb_bf16_use_dot(-1)
    try:
        library.atb_bf16_use_dot(int(dot))
        y = kernel(x, packed, bias.bfloat16())
        assert y.dtype == torch.bfloat16 and torch.equal(y, float_path(x, packed, bias.bfloat16()))
        assert torch.equal(kernel(wide[:, 1:513], packed), float_path(wide[:, 1:513], packed))  # rows off 4 bytes
    finally:
        library.atb_bf16_use_dot(was)
    torch.testing.assert_close(y.float(), F.linear(x.float(), weight.float(), bias.bfloat16().float()), rtol=1e-2,
                               atol=2e-2)
    with pytest.raises(ValueError, match="inputs of 510 features against a weight of 512"):
        kernel(x[:, :510], packed)
    # A kernel that multiplies wrong is not used: bfloat16 rows go to the float32 path.
    from atb_models.kernels import linear

    monkeypatch.setattr(native.NativeLibrary, "load", classmethod(lambda cls: library))
    monkeypatch.setattr(library, "atb_bf16_dot_linear_bf16", lambda *args: None)  # writes nothing
    with caplog.at_level("WARNING", logger="atb_models.kernels"):
        assert linear.linear_kernel(CPU_BF16).bf16_rows_op is None
    assert "on bfloat16 rows gave wrong products" in caplog.text


@pytest.mark.parametrize("shape", [(128, 42), (192, 34), (64, 2), (1024, 64)])
def test_bf16_panels_unpack_to_the_weights_transpose(shape):
    native_bf16_kernels()  # (skips where there is no AVX-512 library)
    library = native.NativeLibrary.load()
    weight = torch.randn(shape).bfloat16()
    packed, transposed = _pair_packed(weight), torch.full(shape[::-1], float("nan"), dtype=torch.bfloat16)
    library.atb_bf16_unpack_pairs(packed.data_ptr(), *shape, transposed.data_ptr())
    assert torch.equal(transposed, weight.t())


# The whole weight in one slice, and in slices of 3 column groups (the last one shorter).
@pytest.mark.parametrize("slice_elements", [1 << 22, 3 * 64 * 512])
def test_bf16_inputs_of_many_rows_go_to_onednn_on_unpacked_weights_where_it_was_chosen(slice_elements, monkeypatch):
    from atb_models.kernels import linear

    loaded = native_bf16_kernels().linear
    library = native.NativeLibrary.load()
    monkeypatch.setattr(linear, "UNPACK_SLICE_ELEMENTS", slice_elements)
    unpacked = []

    def unpack(*args):
        unpacked.append(args[1:3])
        library.atb_bf16_unpack_pairs(*args)
    kit = PanelLinear(None, None, None, loaded.bf16_op, bf16_dot_op=loaded.bf16_dot_op,
                      bf16_rows_op=loaded.bf16_rows_op)
    onednn = PanelLinear(None, None, None, loaded.bf16_op, bf16_dot_op=loaded.bf16_dot_op, unpack_op=unpack,
                         bf16_rows_op=loaded.bf16_rows_op)
    assert "by oneDNN" in onednn.name and "oneDNN" not in kit.name
    slices = [(1024, 512)] if slice_elements >= 1024 * 512 else [(192, 512)] * 5 + [(64, 512)]
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 512, generator=generator).bfloat16()
    bias = torch.randn(1024, generator=generator).bfloat16()
    packed = loaded.pack(weight)
    for rows in (linear.ONEDNN_PREFILL_ROWS, 3 * linear.ONEDNN_PREFILL_ROWS):
        x = torch.randn(rows, 512, generator=generator).bfloat16()
        y = onednn(x.view(rows // 2, 2, 512), packed, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (rows // 2, 2, 1024) and unpacked == slices
        unpacked.clear()
        # oneDNN's own sums: PyTorch's bfloat16 linear on the weight as loaded, within its rounding of the outputs
        torch.testing.assert_close(y.view(rows, 1024).float(), F.linear(x, weight, bias).float(), rtol=2e-2,
                                   atol=2e-2)
    # Fewer rows (a decode step's) and float32 inputs (a float32 model's) stay on the kit's kernels.
    x = torch.randn(linear.ONEDNN_PREFILL_ROWS - 1, 512, generator=generator).bfloat16()
    assert torch.equal(onednn(x, packed), kit(x, packed))
    x = torch.randn(2 * linear.ONEDNN_PREFILL_ROWS, 512, generator=generator)
    assert onednn(x, packed).dtype == torch.float32
    assert unpacked == []


def test_onednn_for_bf16_prefill_runs_only_where_asked(monkeypatch, caplog):
    from atb_models.kernels import linear

    if not AVX512:
        pytest.skip("the native kernels need an AVX-512 CPU")
    try:
        # Not measured, not chosen by default: its sums would make a prompt's tokens depend on its batch.
        monkeypatch.delenv(linear.BF16_PREFILL_ENV, raising=False)
        assert Kernels.for_plan(CPU_BF16).linear.unpack_op is None
        monkeypatch.setenv(linear.BF16_PREFILL_ENV, "onednn")
        assert Kernels.for_plan(CPU_BF16).linear.unpack_op is not None
        assert "by oneDNN" in Kernels.for_plan(CPU_BF16).describe()
        monkeypatch.setenv(linear.BF16_PREFILL_ENV, "kit")
        assert Kernels.for_plan(CPU_BF16).linear.unpack_op is None
        # A float32 model never gives its linears bfloat16 inputs, but a bad value is refused for it too.
        for name, value in ((linear.BF16_PREFILL_ENV, "amx"), (linear.BF16_DOT_ENV, "2")):
            monkeypatch.setenv(name, value)
            for plan in (CPU_BF16, CPU_FP32):
                with pytest.raises(UserError, match=f"{name}='{value}': expected"):
                    Kernels.for_plan(plan)
            monkeypatch.delenv(name)
        monkeypatch.setenv(linear.BF16_PREFILL_ENV, "onednn")
        assert Kernels.for_plan(CPU_FP32).linear.unpack_op is None
        # An unpacking that gives wrong weights is not used, whatever is asked.
        library = native.NativeLibrary.load()
        monkeypatch.setattr(native.NativeLibrary, "load", classmethod(lambda cls: library))
        monkeypatch.setattr(library, "atb_bf16_unpack_pairs", lambda *args: None)  # writes nothing
        with caplog.at_level("WARNING", logger="atb_models.kernels"):
            assert Kernels.for_plan(CPU_BF16).linear.unpack_op is None
        assert "unpacking gave wrong weights" in caplog.text
    finally:
        monkeypatch.undo()


# ---------------------------------------------------------------------------------- the fused decoder layer

def _layer(dtype: torch.dtype, kernels: Kernels):
    """A decoder layer of 512 hidden, 8/2 heads, 1024 intermediate."""
    from types import SimpleNamespace

    from atb_models.layers.sharding import HeadLayout
    from atb_models.models.qwen2_vl import DecoderLayer

    config = SimpleNamespace(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                             intermediate_size=1024)
    return DecoderLayer(config, HeadLayout(8, 2, 1, 0), dtype, False, kernels)


def _bf16_layers(kernels):
    """The same random bf16 decoder layer twice: with PyTorch's operators (weights as loaded) and with `kernels`
    (weights packed), plus a float32 copy of it as the truth both approximate."""
    from atb_models.layers.linear import pack_weights

    generator = torch.Generator().manual_seed(0)
    torch_ops = _layer(torch.bfloat16, Kernels())
    with torch.no_grad():
        for parameter in torch_ops.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
    native_layer = _layer(torch.bfloat16, kernels)
    native_layer.load_state_dict(torch_ops.state_dict())
    assert pack_weights(native_layer) == 4
    truth = _layer(torch.float32, Kernels())
    truth.load_state_dict({name: t.float() for name, t in torch_ops.state_dict().items()})
    return torch_ops, native_layer, truth


# 4 sequences: the linears' direct path; 9: past the register block's 6 rows, the batched path (AVX512-BF16's dot
# product where the library has it). "avx2": the AVX2 library's decoder layer on the same packed layer (its bfloat16
# conversions at 8 lanes; the kit gives it float32 models only, on a CPU without AVX-512).
@pytest.mark.parametrize("library", ["avx512", "avx2"])
@pytest.mark.parametrize("lengths", ([1, 17, 40, 5], [1, 17, 40, 5, 3, 9, 2, 30, 11]))
def test_native_decoder_layer_on_bf16_weights_stream_and_cache_decodes_as_pytorchs_bf16_operators(lengths, library,
                                                                                                  monkeypatch):
    kernels = native_bf16_kernels()
    fused = kernels.decoder_layer
    if library == "avx2":
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        fused = NativeDecoderLayer(native.NativeLibrary.load_avx2())  # every AVX-512 CPU has AVX2 and FMA
    assert isinstance(fused, NativeDecoderLayer)
    torch_ops, native_layer, truth = _bf16_layers(kernels)
    generator = torch.Generator().manual_seed(1)
    block_size, num_blocks = 16, 16
    step, cos, sin = _decode_step(lengths, block_size, num_blocks, 64, generator)
    caches = [torch.randn(num_blocks, 2, block_size, 64, generator=generator).bfloat16() for _ in range(2)]
    x = torch.randn(len(lengths), 512, generator=generator).bfloat16()
    results = {}
    for name, layer, run, dtype in (("torch", torch_ops, LayerByLayer(), torch.bfloat16),
                                    ("native", native_layer, fused, torch.bfloat16),
                                    ("truth", truth, LayerByLayer(), torch.float32)):
        layer.k_cache, layer.v_cache = (cache.to(dtype, copy=True) for cache in caches)
        step.kernel_state.clear()
        stream = x.to(dtype, copy=True)
        out = run(layer, stream, cos.to(dtype), sin.to(dtype), step)
        results[name] = (out, layer.k_cache, layer.v_cache)
        if name == "native":
            assert "decoder_layer" in step.kernel_state, "the bf16 layer was the native kernel's case"
            assert out is stream and out.dtype == torch.bfloat16, "the bf16 residual stream is updated in place"
    (out, k, v), (expected, k_expected, v_expected), (true, k_true, v_true) = (
        results["native"], results["torch"], results["truth"])
    # Both bf16 paths round at their own points: each within bf16's resolution (2^-8 relative) of the float32
    # truth, and of each other.
    for got in (out, expected):
        assert torch.allclose(got.float(), true, atol=2e-2, rtol=1e-2)
    assert torch.allclose(out.float(), expected.float(), atol=3e-2, rtol=1e-2)
    assert k.dtype == v.dtype == torch.bfloat16
    assert torch.allclose(k.float(), k_true, atol=1e-2, rtol=8e-3) and torch.allclose(v.float(), v_true, atol=1e-2,
                                                                                     rtol=8e-3)
    stored = ~torch.isclose(k_expected.float(), caches[0].float())
    assert stored.any() and torch.equal(stored, ~torch.isclose(k.float(), caches[0].float())), \
        "the step stores its K in the same slots, and nothing else changes"
    # The stored rows are rounded to nearest, not truncated: on average no further from the truth than PyTorch's.
    assert (v.float() - v_true).abs().mean() <= 1.2 * (v_expected.float() - v_true).abs().mean()


def test_a_bf16_layer_the_kernel_cannot_take_runs_its_own_forward():
    kernels = native_bf16_kernels()
    fused = kernels.decoder_layer
    torch_ops, native_layer, _ = _bf16_layers(kernels)
    native_layer.k_cache = native_layer.v_cache = torch.zeros(4, 2, 16, 64, dtype=torch.bfloat16)
    assert fused.weights_of(native_layer) is not None
    # Weights as loaded (not packed), a float16 cache, caches of two dtypes: not its case.
    torch_ops.k_cache = torch_ops.v_cache = native_layer.k_cache
    assert fused.weights_of(torch_ops) is None
    native_layer.k_cache = native_layer.v_cache = torch.zeros(4, 2, 16, 64, dtype=torch.float16)
    assert fused.weights_of(native_layer) is None
    native_layer.k_cache = torch.zeros(4, 2, 16, 64, dtype=torch.bfloat16)
    native_layer.v_cache = torch.zeros(4, 2, 16, 64)
    assert fused.weights_of(native_layer) is None


# ---------------------------------------------------- a float32 model of a bf16 checkpoint: bf16 panels, exact

def native_fp32_kernels(choice: str = "auto") -> Kernels:
    if not AVX512:
        pytest.skip("the native kernels need an AVX-512 CPU")
    return Kernels.for_plan(CPU_FP32, choice)


def test_a_float32_weight_of_bf16_values_is_packed_as_bf16_and_multiplies_as_float32():
    from atb_models.kernels.linear import holds_bf16_values

    kernel = native_fp32_kernels().linear
    exact = torch.randn(1024, 512).bfloat16().float()
    inexact = exact.clone()
    inexact[3, 7] += 1e-6
    assert holds_bf16_values(exact) and not holds_bf16_values(inexact)
    packed = kernel.pack(exact)
    assert packed.dtype == torch.bfloat16 and torch.equal(packed.float(), _pair_packed(exact))
    assert kernel.pack(inexact).dtype == torch.float32  # a value off bf16 keeps the whole weight float32
    x, bias = torch.randn(7, 512), torch.randn(1024)
    products = kernel(x, packed, bias)
    assert products.dtype == torch.float32
    assert torch.allclose(products, kernel(x, kernel.pack(inexact), bias), atol=1e-4, rtol=1e-5)
    assert torch.allclose(products.double(), F.linear(x.double(), exact.double(), bias.double()), atol=1e-4)
    # ATB_MODELS_CPU_LINEAR=panel (the benchmark's float32-weights reference) keeps float32 weights float32.
    assert native_fp32_kernels("panel").linear.pack(exact).dtype == torch.float32


def test_the_fused_float32_layer_on_bf16_panels_decodes_as_on_float32_ones():
    from atb_models.layers.linear import pack_weights

    state = {name: t.float() for name, t in _bf16_layers(native_bf16_kernels())[0].state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    block_size, num_blocks = 16, 12
    step, cos, sin = _decode_step([1, 17, 40, 5], block_size, num_blocks, 64, generator)
    caches = [torch.randn(num_blocks, 2, block_size, 64, generator=generator) for _ in range(2)]
    x = torch.randn(4, 512, generator=generator)
    results = {}
    for choice, width in (("auto", torch.bfloat16), ("panel", torch.float32)):
        kernels = native_fp32_kernels(choice)
        layer = _layer(torch.float32, kernels)
        layer.load_state_dict(state)
        assert pack_weights(layer) == 4 and layer.mlp.down_proj.weight.dtype == width
        layer.k_cache, layer.v_cache = (cache.clone() for cache in caches)
        step.kernel_state.clear()
        results[choice] = (kernels.decoder_layer(layer, x.clone(), cos, sin, step), layer.k_cache, layer.v_cache)
        assert "decoder_layer" in step.kernel_state, "the layer was the native kernel's case"
    # The same float32 arithmetic on the same values: no bf16 rounding of the activations anywhere.
    for got, expected in zip(results["auto"], results["panel"]):
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)

def _simulated_cpu(flags: str):
    return cpu_capabilities(f"processor\t: 0\nmodel name\t: Simulated CPU\nflags\t\t: {flags}\n")


def test_a_cpu_with_avx512_bf16_runs_a_bf16_checkpoint_natively_and_one_without_in_float32():
    """The flags decide the plan (platform), the plan and this CPU's AVX-512 the kernels: on a CPU with native bf16
    a bf16 checkpoint stays bf16 and gets the native bf16 decode path; without, it computes in float32 and gets
    the float32 one."""
    with_bf16 = resolve_plan("cpu", "auto", "bfloat16", caps=_simulated_cpu("fpu avx2 avx512f avx512bw avx512_bf16"))
    without = resolve_plan("cpu", "auto", "bfloat16", caps=_simulated_cpu("fpu avx2 avx512f avx512bw"))
    assert with_bf16.llm_dtype == torch.bfloat16 and without.llm_dtype == torch.float32
    for plan in (with_bf16, without):
        kernels = Kernels.for_plan(plan)
        # a CPU with AVX2 but not AVX-512: the AVX2 library's linears and decoder layers for the float32 model
        assert isinstance(kernels.decoder_layer, NativeDecoderLayer) == float32_library_expected(plan)
        assert isinstance(kernels.linear, PanelLinear) == float32_library_expected(plan)


def test_a_cpu_without_avx512_runs_a_bf16_model_on_pytorchs_operators(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    kernels = Kernels.for_plan(CPU_BF16)
    assert not isinstance(kernels.linear, PanelLinear) and type(kernels.decoder_layer) is LayerByLayer
    assert isinstance(kernels.linear, OneDnnLinear) or kernels.linear.name == "torch"


def test_a_bf16_panel_kernel_that_multiplies_wrong_is_not_used(monkeypatch, caplog):
    if not AVX512:
        pytest.skip("the native kernels need an AVX-512 CPU")
    library = native.NativeLibrary.load()
    monkeypatch.setattr(native.NativeLibrary, "load", classmethod(lambda cls: library))
    monkeypatch.setattr(library, "atb_bf16_linear_f32", lambda *args: None)  # writes nothing: wrong products
    with caplog.at_level("WARNING", logger="atb_models.kernels"):
        kernels = Kernels.for_plan(CPU_BF16)
    assert "bfloat16 kernel <lambda> gave wrong products" in caplog.text
    assert isinstance(kernels.linear, PanelLinear) and kernels.linear.bf16_op is None
    assert kernels.linear.bf16_dot_op is None
    assert type(kernels.decoder_layer) is LayerByLayer
    assert not is_panel_packed(kernels.linear.pack(torch.randn(1024, 512).bfloat16()))
    # A float32 model keeps its native kernels.
    assert isinstance(Kernels.for_plan(CPU_FP32).decoder_layer, NativeDecoderLayer)


def test_the_dot_product_kernel_is_built_with_avx512_bf16_and_chosen_where_it_is_checked_and_faster(monkeypatch,
                                                                                                   caplog):
    from atb_models.kernels import linear

    if not AVX512:
        pytest.skip("the native kernels need an AVX-512 CPU")
    library = native.NativeLibrary.load()
    has_bf16 = "avx512_bf16" in cpu_flags()
    assert library.atb_bf16_dot_available() == int(has_bf16)
    monkeypatch.setattr(native.NativeLibrary, "load", classmethod(lambda cls: library))
    dot, widening = library.atb_bf16_dot_linear_f32, library.atb_bf16_linear_f32
    # (with AMX tiles every product takes atb_bf16_dot_linear_f32: off here, as if this process had started so)
    monkeypatch.setenv(linear.BF16_AMX_ENV, "0")
    monkeypatch.setattr(linear, "_bf16_amx_decided", {})
    monkeypatch.setenv(linear.BF16_DOT_DECODE_ENV, "0")  # (decode's rows: the next test's)
    try:
        # Forced off, the library is told too; forced on, it runs the dot product where the build has it. Either
        # way a bfloat16 model's kernel takes the dot product's entry, which widens in its order where it is off.
        monkeypatch.setenv(linear.BF16_DOT_ENV, "0")
        assert Kernels.for_plan(CPU_BF16).linear.bf16_dot_op is dot and library.atb_bf16_use_dot(-1) == 0
        monkeypatch.setenv(linear.BF16_DOT_ENV, "1")
        assert Kernels.for_plan(CPU_BF16).linear.bf16_dot_op is dot
        assert library.atb_bf16_use_dot(-1) == int(has_bf16)
        monkeypatch.setenv(linear.BF16_DOT_ENV, "yes")
        with pytest.raises(UserError, match="ATB_MODELS_CPU_BF16_DOT='yes'"):
            Kernels.for_plan(CPU_BF16)
        monkeypatch.delenv(linear.BF16_DOT_ENV)
        if has_bf16:
            # Measured: chosen only when clearly faster (the measurement itself stubbed).
            for timings, chosen in (((1.0, 2.0), True), ((1.0, 1.1), False), ((2.0, 1.0), False)):
                monkeypatch.setattr(linear, "_bf16_dot_measured", {})
                monkeypatch.setattr(linear, "_time_bf16_products", lambda *args, t=timings: t)
                assert Kernels.for_plan(CPU_BF16).linear.bf16_dot_op is dot
                assert library.atb_bf16_use_dot(-1) == int(chosen)
            # A float32 model never gives its linears bfloat16 inputs: nothing to measure.
            monkeypatch.setattr(linear, "_bf16_dot_measured", {})
            monkeypatch.setattr(linear, "_time_bf16_products", lambda *args: pytest.fail("measured for float32"))
            assert Kernels.for_plan(CPU_FP32).linear.bf16_dot_op is widening
        # A dot product that multiplies wrong is not used, whatever is asked.
        monkeypatch.setenv(linear.BF16_DOT_ENV, "1")
        monkeypatch.setattr(library, "atb_bf16_dot_linear_f32", lambda *args: None)  # writes nothing
        with caplog.at_level("WARNING", logger="atb_models.kernels"):
            kernel = Kernels.for_plan(CPU_BF16).linear
        assert not has_bf16 or "gave wrong products" in caplog.text
        assert kernel.bf16_op is widening and kernel.bf16_dot_op is widening and library.atb_bf16_use_dot(-1) == 0
    finally:
        monkeypatch.undo()
        Kernels.for_plan(CPU_BF16)  # the library's choice as this process measured it, for the tests after


def native_library_with(feature: str, missing: str):
    """The AVX-512 library where it reports `feature` (its atb_<feature>_available()), else a skip saying `missing`
    (also where the native kernels cannot run)."""
    native_bf16_kernels()
    library = native.NativeLibrary.load()
    if not getattr(library, f"atb_{feature}_available")():
        pytest.skip(missing)
    return library


def _dot_product_library():
    return native_library_with("bf16_dot", "this library has no AVX512-BF16 dot product")


def product_without_bias(op, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """A float32-output op's product of all of x's rows (float32, contiguous) against a packed weight, no bias."""
    y = torch.empty(x.shape[0], packed.shape[0] * 64)
    op(x.data_ptr(), x.shape[0], x.shape[1], x.shape[1], packed.data_ptr(), y.shape[1], None, y.data_ptr())
    return y


def test_decode_rows_by_the_dot_product_get_the_widening_s_sums_at_every_row_count():
    library = _dot_product_library()
    op = library.atb_bf16_dot_linear_f32
    was = (library.atb_bf16_dot_decode_rows(-1), library.atb_bf16_use_dot(-1), library.atb_bf16_use_amx(-1),
           library.atb_use_stream_prefetch(-1), library.atb_bf16_dot_one_pass_prefetch(-1))
    generator = torch.Generator().manual_seed(3)
    try:
        library.atb_bf16_use_amx(0)  # (the tiles would take K = 896)
        for out_features, in_features in ((64, 42), (64 * 3, 202), (64 * 37, 896)):
            w = torch.randn(out_features, in_features, generator=generator).bfloat16()
            b = torch.randn(out_features, generator=generator)
            packed = _pair_packed(w)
            x = torch.randn(16, in_features, generator=generator).bfloat16().float()

            def product(rows):
                y = torch.full((rows, out_features), float("nan"))
                op(x.data_ptr(), rows, in_features, in_features, packed.data_ptr(), out_features, b.data_ptr(),
                   y.data_ptr())
                return y
            library.atb_bf16_dot_decode_rows(0)
            library.atb_bf16_use_dot(0)
            widened = product(16)
            assert torch.allclose(widened.double(), F.linear(x.double(), w.double(), b.double()), atol=1e-4,
                                  rtol=1e-4)
            # Decode's dot product up to 1 or 6 rows, the batched one on or off, prefetching or not: each row's sums
            # the same, bit for bit, at every row count (1-6 a pass, 7 and 16 batched).
            for decode_rows, batched, prefetch in itertools.product((0, 1, 6), (0, 1), (0, 1)):
                assert library.atb_bf16_dot_decode_rows(decode_rows) == decode_rows
                library.atb_bf16_use_dot(batched)
                library.atb_use_stream_prefetch(prefetch)  # (the widening's)
                library.atb_bf16_dot_one_pass_prefetch(prefetch)
                for rows in (1, 2, 5, 6, 7, 16):
                    assert torch.equal(product(rows), widened[:rows]), (in_features, decode_rows, batched, rows)
            # The same on bfloat16 rows in and out (prefill's entry): the float32 sums rounded once, rows read where
            # they lie (a strided view), with and without a bias.
            rows16 = torch.cat([x.bfloat16(), x.bfloat16()], dim=1)[:, :in_features]
            for decode_rows, bias in itertools.product((0, 6), (b, None)):
                library.atb_bf16_dot_decode_rows(decode_rows)
                expected = widened if bias is not None else product_without_bias(op, x, packed)
                for rows in (1, 3, 6):
                    y16 = torch.full((rows, out_features), float("nan"), dtype=torch.bfloat16)
                    library.atb_bf16_dot_linear_bf16(rows16.data_ptr(), rows, in_features, rows16.stride(0),
                                                     packed.data_ptr(), out_features,
                                                     None if bias is None else bias.data_ptr(), y16.data_ptr())
                    assert torch.equal(y16, expected[:rows].bfloat16()), (in_features, decode_rows, rows)
            # And the dot product did run: it rounds inputs that are not bfloat16 values, where the widening takes
            # them as they are.
            off = torch.randn(1, in_features, generator=generator)
            sums = []
            for decode_rows in (0, 1):
                library.atb_bf16_dot_decode_rows(decode_rows)
                y = torch.empty(1, out_features)
                op(off.data_ptr(), 1, in_features, in_features, packed.data_ptr(), out_features, b.data_ptr(),
                   y.data_ptr())
                sums.append(y)
            assert not torch.equal(*sums)
        assert library.atb_bf16_dot_decode_rows(9) == 6  # at most a register block's rows
    finally:
        library.atb_bf16_dot_decode_rows(was[0])
        library.atb_bf16_use_dot(was[1])
        library.atb_bf16_use_amx(was[2])
        library.atb_use_stream_prefetch(was[3])
        library.atb_bf16_dot_one_pass_prefetch(was[4])


def test_decode_s_dot_product_is_chosen_up_to_the_rows_it_measured_faster_at(monkeypatch, caplog):
    from atb_models.kernels import linear

    library = _dot_product_library()
    was = library.atb_bf16_dot_decode_rows(-1)
    monkeypatch.setattr(native.NativeLibrary, "load", classmethod(lambda cls: library))
    try:
        # Pinned: nothing measured; a value it does not know is refused in one line, for either model.
        monkeypatch.setattr(linear, "_time_bf16_decode", lambda *a: pytest.fail("measured though set"))
        for value in "0136":
            monkeypatch.setenv(linear.BF16_DOT_DECODE_ENV, value)
            assert linear.bf16_dot_decode_chosen(library) == int(value) == library.atb_bf16_dot_decode_rows(-1)
        for plan in (CPU_BF16, CPU_FP32):
            monkeypatch.setenv(linear.BF16_DOT_DECODE_ENV, "7")
            with pytest.raises(UserError, match="ATB_MODELS_CPU_BF16_DOT_DECODE='7'"):
                Kernels.for_plan(plan)
        monkeypatch.delenv(linear.BF16_DOT_DECODE_ENV)
        # A model's load tells the library (the tiles off here, as if this process had started so).
        monkeypatch.setenv(linear.BF16_AMX_ENV, "0")
        monkeypatch.setattr(linear, "_bf16_amx_decided", {})
        monkeypatch.setenv(linear.BF16_DOT_ENV, "0")
        for value in "10":
            monkeypatch.setenv(linear.BF16_DOT_DECODE_ENV, value)
            assert Kernels.for_plan(CPU_BF16).linear.bf16_dot_op is library.atb_bf16_dot_linear_f32
            assert library.atb_bf16_use_dot(-1) == 0 and library.atb_bf16_dot_decode_rows(-1) == int(value)
        monkeypatch.delenv(linear.BF16_DOT_ENV)
        monkeypatch.delenv(linear.BF16_AMX_ENV)
        monkeypatch.delenv(linear.BF16_DOT_DECODE_ENV)
        # Where the AMX tiles take decode's products: none, unmeasured.
        library.atb_bf16_dot_decode_rows(6)
        assert linear.bf16_dot_decode_chosen(library, tiles=True) == 0 == library.atb_bf16_dot_decode_rows(-1)
        # Measured once a process (stubbed: seconds at 1 row by the dot product prefetching, not prefetching and
        # widened; at 6 rows by the dot product the faster way and widened): 6 rows where it is clearly faster at
        # both, 1 where at one row only, else none (6 rows then unmeasured).
        cases = (((1.0, 3.0, 2.0), (1.0, 2.0), 6, 1), ((3.0, 1.0, 2.0), (1.0, 2.0), 6, 0),
                 ((1.0, 3.0, 2.0), (2.0, 1.0), 1, 1), ((2.0, 3.0, 1.0), None, 0, 1), ((1.0, 1.0, 1.02), None, 0, 1))
        for at_1, at_6, chosen, prefetching in cases:
            asked = []

            def timed(lib, rows, prefetches, t={1: at_1, 6: at_6}):
                asked.append((rows, prefetches))
                return t[rows]
            monkeypatch.setattr(linear, "_bf16_dot_decode_measured", {})
            monkeypatch.setattr(linear, "_time_bf16_decode", timed)
            library.atb_bf16_dot_one_pass_prefetch(1 - prefetching)
            with caplog.at_level("INFO", logger="atb_models.kernels"):
                assert linear.bf16_dot_decode_chosen(library) == chosen
                assert linear.bf16_dot_decode_chosen(library) == chosen == library.atb_bf16_dot_decode_rows(-1)
            assert library.atb_bf16_dot_one_pass_prefetch(-1) == prefetching or not chosen
            assert asked == [(1, (1, 0))] + ([(6, (prefetching,))] if at_6 else [])
            assert caplog.text.count("bfloat16 rows against 16 MB of weights from memory") == 1, caplog.text
            caplog.clear()
        # A dot product whose decode rows' sums differ from the widening's is not used, whatever is asked.
        monkeypatch.setenv(linear.BF16_DOT_DECODE_ENV, "6")
        real = library.atb_bf16_dot_linear_f32
        monkeypatch.setattr(library, "atb_bf16_dot_linear_f32",
                            lambda *args: None if library.atb_bf16_dot_decode_rows(-1) else real(*args))
        with caplog.at_level("WARNING", logger="atb_models.kernels"):
            assert linear.bf16_dot_decode_chosen(library) == 0 == library.atb_bf16_dot_decode_rows(-1)
        assert "other sums than the widening" in caplog.text
    finally:
        monkeypatch.undo()
        library.atb_bf16_dot_decode_rows(was)
        Kernels.for_plan(CPU_BF16)  # the library's choices as this process made them, for the tests after


def test_decode_s_dot_product_is_timed_on_weights_evicted_from_the_caches(monkeypatch):
    from atb_models.kernels import linear

    library = _dot_product_library()
    evicted, evict = [], library.atb_evict_from_caches
    monkeypatch.setattr(library, "atb_evict_from_caches", lambda p, n: (evicted.append(n), evict(p, n)))
    was = (library.atb_bf16_dot_decode_rows(-1), library.atb_bf16_dot_one_pass_prefetch(-1))
    timings = linear._time_bf16_decode(library, 6, (1, 0), repeats=2)
    assert len(timings) == 3 and min(timings) > 0
    assert evicted == [4096 * 2000 * 2] * 9  # before every call, the untimed round's too: 16 MB of bfloat16
    # The switches as they were before the measurement.
    assert (library.atb_bf16_dot_decode_rows(-1), library.atb_bf16_dot_one_pass_prefetch(-1)) == was


# ------------------------------------------------------------------------ bfloat16 attention within segments

# (n_q, n_k, heads, kv_heads, head_dim, causal, count): one token; a prompt with grouped-query heads, its rows not a
# multiple of any block; the last 3 of 70 positions (a cached prefix before them); an image, rows past a query block;
# three frames (or windows) in one call
BF16_ATTENTION_CASES = [(1, 1, 2, 1, 64, True, 1), (37, 37, 14, 2, 64, True, 1), (3, 70, 4, 2, 128, True, 1),
                        (129, 129, 3, 3, 80, False, 1), (64, 64, 8, 8, 80, False, 3)]


def _segment_inputs(n_q, n_k, heads, kv_heads, head_dim, count, dtype=torch.bfloat16):
    """q, k, v as a projection's strided views: each row one token's heads side by side (q's rows the last n_q of
    each segment's n_k positions)."""
    torch.manual_seed(n_q * 1000 + n_k)
    qkv = torch.randn(count, n_k, (heads + 2 * kv_heads) * head_dim, dtype=dtype) * 3
    q = qkv[:, n_k - n_q:, :heads * head_dim].reshape(count * n_q, heads, head_dim)
    k, v = (qkv[:, :, (heads + i * kv_heads) * head_dim:(heads + (i + 1) * kv_heads) * head_dim].reshape(
        count * n_k, kv_heads, head_dim) for i in (0, 1))
    return q, k, v


@pytest.mark.parametrize("case", BF16_ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
def test_bf16_attention_is_pytorchs_bf16_attention_with_sums_in_another_order(case):
    kernels = native_bf16_attention_kernels()
    n_q, n_k, heads, kv_heads, head_dim, causal, count = case
    q, k, v = _segment_inputs(n_q, n_k, heads, kv_heads, head_dim, count)
    # Read where they lie: rows a projection's row apart (a lone row's stride means nothing).
    assert all(t.shape[0] == 1 or t.stride(0) == (heads + 2 * kv_heads) * head_dim for t in (q, k, v))
    ours = kernels.attention(q, k, v, None, causal, torch.empty(count * n_q, heads, head_dim, dtype=q.dtype), count)
    pytorchs = SegmentAttention()(q, k, v, None, causal, torch.empty_like(ours), count)
    exact = SegmentAttention()(q.float(), k.float(), v.float(), None, causal, torch.empty(ours.shape), count)
    # Rounded where PyTorch rounds, summed in another order: most outputs the same bfloat16, the rest apart by
    # about a bfloat16 step of the values they weigh, and no further from the float32 result than PyTorch's.
    assert (ours == pytorchs).float().mean() >= 0.95
    assert (ours.float() - pytorchs.float()).abs().max() <= v.float().abs().max() * 2 ** -7
    assert (ours.float() - exact).abs().max() <= 1.5 * (pytorchs.float() - exact).abs().max() + 2 ** -10


def test_bf16_attention_leaves_what_it_cannot_take_to_pytorch():
    kernels = native_bf16_attention_kernels()
    for dtype, head_dim, rows in ((torch.float32, 64, 20), (torch.bfloat16, 32, 20), (torch.bfloat16, 64, 0)):
        # float32 rows; heads of another size; no rows at all
        q, k, v = _segment_inputs(rows, rows, 4, 2, head_dim, 1, dtype)
        ours = kernels.attention(q, k, v, None, True, torch.empty(rows, 4, head_dim, dtype=dtype))
        assert torch.equal(ours, SegmentAttention()(q, k, v, None, True, torch.empty_like(ours)))


def test_bf16_attention_gives_nan_where_a_score_is_nan_as_pytorch_does():
    kernels = native_bf16_attention_kernels()
    for causal in (False, True):
        q, k, v = _segment_inputs(40, 40, 2, 1, 64, 1)
        k[30, 0, 5] = float("nan")  # key 30: seen by every query without causality, from query 30 on with it
        out = kernels.attention(q, k, v, None, causal, torch.empty(40, 2, 64, dtype=torch.bfloat16))
        nan_rows = out.isnan().flatten(1).all(dim=1)
        finite_rows = out.isfinite().flatten(1).all(dim=1)
        first = 30 if causal else 0
        assert nan_rows[first:].all() and finite_rows[:first].all()


def test_bf16_attention_is_the_kits_where_avx512_bf16_runs_it_but_an_amx_cpu_s_vision_tower_runs_pytorchs():
    from types import SimpleNamespace

    from atb_models.kernels.attention import segment_attention

    def library(isa="avx512", dot=1):
        return SimpleNamespace(isa=isa, atb_bf16_dot_available=lambda: dot, atb_bf16_attention=None)

    zen4, amx = {"avx512f", "avx512_bf16"}, {"avx512f", "avx512_bf16", "amx_bf16"}
    for vision in (False, True):
        assert isinstance(segment_attention(CPU_BF16, library(), zen4, vision), NativeBf16Attention)
    # Each tower by its own dtype: a float32 language model with a bfloat16 vision tower, and the other way round.
    vision_only = dataclasses.replace(CPU_FP32, vision_dtype=torch.bfloat16)
    assert isinstance(segment_attention(vision_only, library(), zen4, vision=True), NativeBf16Attention)
    assert type(segment_attention(vision_only, library(), zen4)) is SegmentAttention
    language_only = dataclasses.replace(CPU_BF16, vision_dtype=torch.float32)
    assert isinstance(segment_attention(language_only, library(), zen4), NativeBf16Attention)
    assert type(segment_attention(language_only, library(), zen4, vision=True)) is SegmentAttention
    # With AMX: a prompt's attention stays the kit's (the same rows whether its prefix came from the cache), an
    # image's is PyTorch's, whose flash attention multiplies in AMX tiles.
    assert isinstance(segment_attention(CPU_BF16, library(), amx), NativeBf16Attention)
    assert type(segment_attention(CPU_BF16, library(), amx, vision=True)) is SegmentAttention
    for plan, lib, flags in ((CPU_FP32, library(), zen4),                  # nothing in bfloat16
                             (CPU_BF16, library(dot=0), zen4),             # a build without AVX512-BF16
                             (CPU_BF16, library(isa="avx2"), zen4),        # the AVX2 library
                             (CPU_BF16, None, zen4),                       # no library
                             (dataclasses.replace(CPU_BF16, kind="cuda"), library(), zen4)):
        for vision in (False, True):
            assert type(segment_attention(plan, lib, flags, vision)) is SegmentAttention


def test_bf16_silu_and_mul_rounds_where_pytorchs_two_bf16_operators_round():
    kernel = native_bf16_kernels().silu_and_mul
    generator = torch.Generator().manual_seed(0)
    for rows, width in ((300, 200), (40, 4864), (1000, 20)):  # partial vectors; a layer's width; threaded, narrow
        projection = (4 * torch.randn(rows, 2 * width, generator=generator)).to(torch.bfloat16)
        projection[0, :3] = torch.tensor([0.0, -100.0, 100.0])  # zero, far on either side
        gate, up = projection.split(width, dim=-1)
        assert kernel.suits(gate, up)
        ours, pytorchs = kernel(gate, up), F.silu(gate) * up
        assert ours.dtype == torch.bfloat16 and ours.shape == (rows, width)
        # silu's float32 value may differ in its last bit from PyTorch's, and then (rarely) its bfloat16 rounding
        assert (ours == pytorchs).float().mean() >= 0.99
        assert torch.all((ours.float() - pytorchs.float()).abs() <= pytorchs.float().abs() * 2 ** -6)


def test_a_vision_block_s_attention_over_runs_of_windows_is_sdpa_s_through_the_kit_s_kernel():
    """Qwen2.5-VL's windows come as runs of equal windows (one call each) and images as single segments: the
    model's VisionAttention gives, through the kit's kernel, what it gives through PyTorch's SDPA."""
    from atb_models.models.qwen2_5_vl import window_segments
    from atb_models.models.qwen2_vl import VisionAttention

    kernels = native_bf16_attention_kernels()
    torch.manual_seed(0)
    attention = VisionAttention(160, 2, torch.bfloat16, kernels)  # heads of 80, as Qwen2-VL's and Qwen2.5-VL's
    for parameter in attention.parameters():
        parameter.data.normal_(0, 0.08)
    # The projection after attention an identity, so that the attention's own outputs are compared.
    attention.proj.weight.data.copy_(torch.eye(160))
    attention.proj.bias.data.zero_()
    segments = window_segments([16, 16, 16, 9, 16, 4, 4], 4)  # windows of 64, 36 and 16 patches, in runs
    assert [count for _, count, _ in segments] == [3, 1, 1, 2]
    patches = 4 * (16 * 4 + 9 + 4 * 2)
    x = torch.randn(patches, 160).to(torch.bfloat16)
    angles = torch.randn(patches, 40)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    ours = attention(x, cos, sin, segments)
    attention.attention = SegmentAttention()
    pytorchs = attention(x, cos, sin, segments)
    # Near-uniform weights over short windows average values towards zero, where a bfloat16 step is finer than the
    # sums' difference more often than in the kernel's own test.
    assert (ours == pytorchs).float().mean() >= 0.9
    assert (ours.float() - pytorchs.float()).abs().max() <= pytorchs.float().abs().max() * 2 ** -7
    with pytest.raises(ValueError, match="cover 308 of 324 patches"):
        attention(x, cos, sin, segments[:-1] + [(segments[-1][0], 1, segments[-1][2])])


def test_a_prompt_s_rows_attend_the_same_whether_its_prefix_came_from_the_cache():
    """Prefix caching must not change a repeated request's tokens: the rows after a cached prefix, attending to K/V
    read back from the cache, get bit for bit what they get when the whole prompt is computed, by the prompt
    attention a bfloat16 model runs. (PyTorch's SDPA did on an AMD EPYC, and did not on an Intel Xeon with AMX,
    whose flash attention's sums differ with the rows computed: why the kit's kernel runs there.)"""
    from atb_models.layers.attention import StepContext, prefill_attention

    attention = native_bf16_kernels().attention
    heads, kv_heads, dim, block_size, n, cached = 8, 2, 64, 16, 300, 256
    torch.manual_seed(0)
    table = torch.randperm(n // block_size + 1)  # the sequence's blocks, anywhere in the cache
    k_cache, v_cache = (torch.zeros(len(table), kv_heads, block_size, dim, dtype=torch.bfloat16) for _ in range(2))
    qkv = (2 * torch.randn(n, heads + 2 * kv_heads, dim)).to(torch.bfloat16)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * torch.rand(dim // 2)
    cos, sin = (f(torch.cat((angles, angles), -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    slots = torch.stack([table[torch.arange(n) // block_size], torch.arange(n) % block_size])
    whole = prefill_attention(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, StepContext(True, slots, [0, n]),
                              dim ** -0.5, False, attention)
    after = StepContext(True, slots[:, cached:], [0, n - cached], prefix_lens=[cached], prefix_tables=[table])
    tail = prefill_attention(qkv[cached:], heads, kv_heads, cos[cached:], sin[cached:], k_cache, v_cache, after,
                             dim ** -0.5, False, attention)
    assert torch.equal(tail, whole[cached:])


def test_a_bf16_model_s_linear_gives_a_row_the_same_sums_at_any_row_count_and_either_way(monkeypatch):
    """Decode's few rows widen the weights, more rows may take the dot product or widen in blocks (choices timed at
    load): all add a pair of k-steps in vdpbf16ps's order, so a request's tokens depend neither on its batch nor on
    those timings. (Blocks: a first pass of up to 5 rows widens, the passes after it take 6 each.)"""
    from atb_models.kernels.linear import panel_layout

    native_bf16_kernels()  # (skips where the native kernels cannot run)
    library = native.NativeLibrary.load()

    generator = torch.Generator().manual_seed(0)
    # K blocks of 64 and 128 k-steps whole; then a short last one, no bias and a second chunk of rows.
    cases = [(512, 1024, True, (1, 6, 7, 11, 16, 40)), (128, 202, False, (1, 7, 16, 300))]
    dot_before, registers_before = library.atb_bf16_use_dot(-1), library.atb_bf16_widen_in_registers(-1)
    amx_before = library.atb_bf16_use_amx(0)  # (the tiles' sums are their own: test_amx_tiles_...)
    try:
        for out_features, in_features, with_bias, row_counts in cases:
            weight = panel_layout(torch.randn(out_features, in_features, generator=generator).bfloat16())
            bias = torch.randn(out_features, generator=generator) if with_bias else None
            x = torch.randn(max(row_counts), in_features, generator=generator).bfloat16()
            x32 = x.float()
            results = {}
            for dot in (0, 1):
                for registers in (0, 1):
                    library.atb_bf16_use_dot(dot)
                    library.atb_bf16_widen_in_registers(registers)
                    for rows in row_counts:
                        y32 = torch.empty(rows, out_features)
                        y16 = torch.empty(rows, out_features, dtype=torch.bfloat16)
                        b = None if bias is None else bias.data_ptr()
                        library.atb_bf16_dot_linear_f32(x32.data_ptr(), rows, in_features, in_features,
                                                        weight.data_ptr(), out_features, b, y32.data_ptr())
                        library.atb_bf16_dot_linear_bf16(x.data_ptr(), rows, in_features, in_features,
                                                         weight.data_ptr(), out_features, b, y16.data_ptr())
                        results[dot, registers, rows] = y32, y16
            y32, y16 = results[1, 1, max(row_counts)]
            assert torch.equal(y16, y32.bfloat16())
            for (dot, registers, rows), (a, b) in results.items():
                assert torch.equal(a, y32[:rows]) and torch.equal(b, y16[:rows]), (in_features, dot, registers, rows)
    finally:
        library.atb_bf16_use_dot(dot_before)
        library.atb_bf16_widen_in_registers(registers_before)
        library.atb_bf16_use_amx(amx_before)


# ------------------------------------------------------------------------------------------------- AMX tiles

def amx_library():
    """The AVX-512 library with its AMX tiles usable."""
    return native_library_with("bf16_amx", "this CPU has no AMX-BF16 (or Linux did not let the process use its tiles)")


# K: one tile's 32 k-steps, three, cpu-small's hidden size; rows: one (decode), a tile less one, a tile, a tile and
# one, 40, and 300 (past a chunk of 256 rows); N: one group and three.
@pytest.mark.parametrize("in_features, out_features", [(32, 64), (96, 192), (896, 128)])
def test_amx_tiles_give_a_row_the_same_sums_at_any_row_count_close_to_the_exact_ones(in_features, out_features):
    library = amx_library()
    from atb_models.kernels.linear import panel_layout

    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator)
    packed = panel_layout(weight)
    wide = torch.randn(300, in_features + 6, generator=generator).bfloat16()
    x = wide[:, 2:in_features + 2]  # rows read where they lie, (in_features + 6) apart
    exact, x32 = F.linear(x.double(), weight.double(), bias.double()), x.float().contiguous()
    before = library.atb_bf16_use_amx(1)
    try:
        results = {}
        for rows in (1, 15, 16, 17, 40, 300):
            for with_bias in (True, False):
                y32 = torch.full((rows, out_features), float("nan"))
                y16 = torch.full((rows, out_features), float("nan"), dtype=torch.bfloat16)
                b = bias.data_ptr() if with_bias else None
                library.atb_bf16_dot_linear_f32(x32.data_ptr(), rows, in_features,
                                                in_features, packed.data_ptr(), out_features, b, y32.data_ptr())
                library.atb_bf16_dot_linear_bf16(x.data_ptr(), rows, in_features, in_features + 6, packed.data_ptr(),
                                                 out_features, b, y16.data_ptr())
                results[rows, with_bias] = y32, y16
    finally:
        library.atb_bf16_use_amx(before)
    full, full16 = results[300, True]
    # float32 sums of exact products: within float32's rounding of the sums of their sizes
    scale = F.linear(x.double().abs(), weight.double().abs(), bias.double().abs())
    assert ((full.double() - exact).abs() <= scale * in_features * 2 ** -23).all()
    assert torch.equal(full16, full.bfloat16())
    for (rows, with_bias), (y32, y16) in results.items():
        expected = full[:rows] if with_bias else results[300, False][0][:rows]
        assert torch.equal(y32, expected) and torch.equal(y16, expected.bfloat16()), (rows, with_bias)


# A float32 model's products of bfloat16 weights on the tiles, each input in three parts. Rows: one, two, five, six,
# a tile, a tile and one, 40, 258 (a chunk of 256 and a block of two rows), 300.
@pytest.mark.parametrize("in_features, out_features", [(32, 64), (96, 192), (896, 128)])
def test_a_float32_model_s_tiles_give_a_row_the_same_sums_at_any_row_count_within_float32_s_rounding(
        in_features, out_features):
    library = amx_library()
    from atb_models.kernels.linear import panel_layout

    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator)
    packed = panel_layout(weight)
    # inputs of every size, read where they lie (in_features + 6 apart): each needs all three of its parts
    wide = torch.randn(300, in_features + 6, generator=generator) * torch.logspace(-6, 6, in_features + 6)
    x = wide[:, 2:in_features + 2]
    exact = F.linear(x.double(), weight.double(), bias.double())
    scale = F.linear(x.double().abs(), weight.double().abs(), bias.double().abs())
    before = library.atb_f32_use_amx(1)
    try:
        results = {}
        for rows in (1, 2, 5, 6, 16, 17, 40, 258, 300):
            for with_bias in (True, False):
                y = torch.full((rows, out_features), float("nan"))
                library.atb_bf16_linear_f32(x.data_ptr(), rows, in_features, in_features + 6, packed.data_ptr(),
                                            out_features, bias.data_ptr() if with_bias else None, y.data_ptr())
                results[rows, with_bias] = y
        library.atb_f32_use_amx(0)
        k_order = torch.empty(300, out_features)
        library.atb_bf16_linear_f32(x.data_ptr(), 300, in_features, in_features + 6, packed.data_ptr(),
                                    out_features, bias.data_ptr(), k_order.data_ptr())
    finally:
        library.atb_f32_use_amx(before)
    full = results[300, True]
    # float32 sums of the exact products of float32 inputs: within float32's rounding of the sums of their sizes,
    # as the vector kernels' k order is
    assert ((full.double() - exact).abs() <= scale * in_features * 2 ** -23).all()
    assert ((k_order.double() - exact).abs() <= scale * in_features * 2 ** -23).all()
    assert not torch.equal(full, k_order) or in_features == 32  # (the tiles' own order: these are theirs)
    for (rows, with_bias), y in results.items():
        expected = full[:rows] if with_bias else results[300, False][:rows]
        assert torch.equal(y, expected), (rows, with_bias)


def test_a_float32_model_s_tiles_lose_no_bit_of_an_input_in_its_three_parts():
    """Weights that pick one input each (one 1.0 a row): every output is one exact product, the sum of the input's
    three parts, which must give back the input, bit for bit, at sizes from 1e-25 to 1e30 (a part below float32's
    normal range, 2^-126, would be flushed: an input under about 2^-102)."""
    library = amx_library()
    from atb_models.kernels.linear import panel_layout

    generator = torch.Generator().manual_seed(3)
    in_features = 64
    picks = torch.zeros(in_features, in_features)
    picks[torch.arange(in_features), torch.randperm(in_features, generator=generator)] = 1.0
    sizes = torch.logspace(-25, 30, in_features) * torch.randn(in_features, generator=generator).sign()
    x = torch.randn(7, in_features, generator=generator) * sizes
    x[0, :6] = torch.tensor([1 + 2 ** -23, -(1 + 2 ** -16 + 2 ** -23), 3.1415927, -2.0 ** 100, 0.0, -0.0])
    # a row with an infinity of each sign (every other output 0 x inf: NaN, as in F.linear), and one with a NaN
    special = x[:3].clone()
    special[1, 5], special[1, 9], special[2, 7] = float("inf"), float("-inf"), float("nan")
    packed = panel_layout(picks.bfloat16())  # (held: the library reads it by address)
    before = library.atb_f32_use_amx(1)
    try:
        for inputs in (x[:1], x, special):  # one row, seven, and the special values
            y = torch.full((len(inputs), in_features), float("nan"))
            library.atb_bf16_linear_f32(inputs.data_ptr(), len(inputs), in_features, in_features, packed.data_ptr(),
                                        in_features, None, y.data_ptr())
            expected = F.linear(inputs, picks)
            torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
            numbers = ~expected.isnan()
            assert torch.equal(y.signbit()[numbers], expected.signbit()[numbers])  # (-0.0 kept too)
    finally:
        library.atb_f32_use_amx(before)


@pytest.mark.parametrize("model", ["bfloat16", "float32"])
def test_with_the_tiles_on_an_input_size_off_32_stays_on_the_vector_kernels(model):
    library = amx_library()
    from atb_models.kernels.linear import panel_layout

    switch, product = ((library.atb_bf16_use_amx, library.atb_bf16_dot_linear_f32) if model == "bfloat16" else
                       (library.atb_f32_use_amx, library.atb_bf16_linear_f32))
    weight = panel_layout(torch.randn(128, 42).bfloat16())
    x = torch.randn(19, 42)
    if model == "bfloat16":
        x = x.bfloat16().float()
    outputs = []
    before = switch(-1)
    try:
        for amx in (1, 0):
            switch(amx)
            y = torch.empty(19, 128)
            product(x.data_ptr(), 19, 42, 42, weight.data_ptr(), 128, None, y.data_ptr())
            outputs.append(y)
    finally:
        switch(before)
    assert torch.equal(*outputs)


class _TileLibrary:
    """The library's AMX switches and products as a bfloat16 model's loading reads them, simulated: `available`
    (the CPU and Linux allow the tiles), `right` (the products are F.linear's)."""

    def __init__(self, available: bool, right: bool = True):
        self.available, self.right, self.on, self.f32_on = available, right, 0, 0

    def atb_bf16_amx_available(self):
        return int(self.available)

    def atb_bf16_use_amx(self, on):
        if on >= 0:
            self.on = int(on and self.available)
        return self.on

    def atb_f32_use_amx(self, on):
        if on >= 0:
            self.f32_on = int(on and self.available)
        return self.f32_on

    def atb_bf16_linear_f32(self, *args):
        self._product(*args, torch.float32)

    def _product(self, x, M, K, ldx, wp, N, bias, y, dtype):
        import ctypes

        from atb_models.kernels.linear import PANEL_GROUP

        if not self.right:
            return
        size = ctypes.sizeof(ctypes.c_uint16 if dtype == torch.bfloat16 else ctypes.c_float)
        rows = torch.frombuffer((ctypes.c_byte * (M * ldx * size)).from_address(x), dtype=dtype).view(M, ldx)
        packed = torch.frombuffer((ctypes.c_byte * (N * K * 2)).from_address(wp), dtype=torch.bfloat16)
        weight = packed.view(N // PANEL_GROUP, K // 2, PANEL_GROUP, 2).permute(0, 2, 1, 3).reshape(N, K)
        b = torch.frombuffer((ctypes.c_float * N).from_address(bias), dtype=torch.float32) if bias else None
        out = torch.frombuffer((ctypes.c_byte * (M * N * size)).from_address(y), dtype=dtype).view(M, N)
        # (in float64: each row's sums the same at any row count, as the tiles' are)
        out.copy_(F.linear(rows[:, :K].double(), weight.double(), None if b is None else b.double()))

    def atb_bf16_dot_linear_f32(self, *args):
        self._product(*args, torch.float32)

    def atb_bf16_dot_linear_bf16(self, *args):
        self._product(*args, torch.bfloat16)


@pytest.mark.parametrize("model", ["bfloat16", "float32"])
def test_amx_tiles_are_chosen_where_the_cpu_has_them_unless_switched_off_or_wrong(model, monkeypatch, caplog):
    """Either model's choice (a bfloat16 model's products, a float32 model's of bfloat16 weights), each its own
    switch of the library's, each made once a process, both by $ATB_MODELS_CPU_BF16_AMX."""
    from atb_models.kernels import linear

    chosen_for, switch = {"bfloat16": (linear.bf16_amx_chosen, "on"),
                          "float32": (linear.f32_amx_chosen, "f32_on")}[model]
    other = "f32_on" if switch == "on" else "on"
    monkeypatch.delenv(linear.BF16_AMX_ENV, raising=False)
    monkeypatch.setattr(linear, "_bf16_amx_decided", {})
    for available, right, chosen in ((True, True, True), (False, True, False), (True, False, False)):
        library = _TileLibrary(available, right)
        caplog.clear()
        with caplog.at_level("WARNING", logger="atb_models.kernels"):
            assert chosen_for(library) == chosen and getattr(library, switch) == int(chosen)
        assert getattr(library, other) == 0  # (the other model's switch is left alone)
        assert ("AMX kernel gave wrong" in caplog.text) == (available and not right)
    monkeypatch.setenv(linear.BF16_AMX_ENV, "0")
    off = _TileLibrary(True)
    assert not chosen_for(off) and getattr(off, switch) == 0
    monkeypatch.setenv(linear.BF16_AMX_ENV, "1")
    on = _TileLibrary(True)
    assert chosen_for(on) and getattr(on, switch) == 1
    # Once a process: a later load neither changes an earlier model's sums nor fails; the other value is logged.
    for library, value, chosen in ((on, "0", True), (off, "1", False)):
        monkeypatch.setenv(linear.BF16_AMX_ENV, value)
        setattr(library, switch, 1 - getattr(library, switch))  # (whatever the switch was left at, the choice is set)
        caplog.clear()
        with caplog.at_level("WARNING", logger="atb_models.kernels"):
            assert chosen_for(library) == chosen and getattr(library, switch) == int(chosen)
        assert f"ATB_MODELS_CPU_BF16_AMX={value} is read once a process" in caplog.text
    monkeypatch.setenv(linear.BF16_AMX_ENV, "yes")
    with pytest.raises(UserError, match="ATB_MODELS_CPU_BF16_AMX='yes': expected 1"):
        chosen_for(on)
    assert getattr(on, switch) == 1


def test_each_model_names_its_tiles_and_leaves_the_other_model_s_switch_alone(monkeypatch):
    from atb_models.kernels import linear

    library = native.NativeLibrary.load() if AVX512 else None
    if library is None:
        pytest.skip("the native kernels need an AVX-512 CPU")
    # (once a process: where the process started with the tiles turned off, they stay off)
    tiles = bool(library.atb_bf16_amx_available()) and os.environ.get(linear.BF16_AMX_ENV) != "0"
    monkeypatch.delenv(linear.BF16_AMX_ENV, raising=False)
    try:
        assert ("bfloat16 on AMX tiles" in Kernels.for_plan(CPU_BF16).describe()) == tiles
        assert library.atb_bf16_use_amx(-1) == int(tiles)
        described = Kernels.for_plan(CPU_FP32).describe()
        assert (linear.F32_TILES_NAME in described) == tiles and "bfloat16 on AMX" not in described
        assert library.atb_bf16_use_amx(-1) == int(tiles) and library.atb_f32_use_amx(-1) == int(tiles)
        # float32 weights kept float32 (ATB_MODELS_CPU_LINEAR=panel) never meet the tiles, and say so (int8
        # weights, where a model has them, multiply on the tiles with any choice: the same outputs as without)
        panel = Kernels.for_plan(CPU_FP32, "panel")
        assert "AMX" not in panel.describe().replace(f"int8 weights {panel.w8a16.name}", "")
        # A later model asking otherwise does not move the first one's products (once a process).
        monkeypatch.setenv(linear.BF16_AMX_ENV, "0")
        assert ("bfloat16 on AMX tiles" in Kernels.for_plan(CPU_BF16).describe()) == tiles
        assert (linear.F32_TILES_NAME in Kernels.for_plan(CPU_FP32).describe()) == tiles
        assert library.atb_bf16_use_amx(-1) == int(tiles) and library.atb_f32_use_amx(-1) == int(tiles)
    finally:
        monkeypatch.undo()
        Kernels.for_plan(CPU_BF16)  # the library's choices as this process makes them, for the tests after
        Kernels.for_plan(CPU_FP32)


@pytest.mark.parametrize("first", ["bfloat16", "float32"])
def test_a_bf16_model_and_a_float32_model_each_make_their_own_tiles_choice(first, monkeypatch, caplog):
    """In a fresh process (the once-a-process choices reset here), the first model of each dtype decides its own
    switch, whatever the other dtype's model asked before it; a bfloat16 model is never named by the float32 tiles."""
    from atb_models.kernels import linear

    library = native.NativeLibrary.load() if AVX512 else None
    if library is None:
        pytest.skip("the native kernels need an AVX-512 CPU")
    tiles = bool(library.atb_bf16_amx_available())
    asked = {"bfloat16": "0", "float32": "1"} if first == "bfloat16" else {"float32": "0", "bfloat16": "1"}
    monkeypatch.setattr(linear, "_bf16_amx_decided", {})
    try:
        for model in (first, "float32" if first == "bfloat16" else "bfloat16"):
            monkeypatch.setenv(linear.BF16_AMX_ENV, asked[model])
            caplog.clear()
            with caplog.at_level("WARNING", logger="atb_models.kernels"):
                described = Kernels.for_plan(CPU_BF16 if model == "bfloat16" else CPU_FP32).describe()
            assert "read once a process" not in caplog.text
            on = tiles and asked[model] == "1"
            if model == "bfloat16":
                assert ("bfloat16 on AMX tiles" in described) == on and linear.F32_TILES_NAME not in described
                assert library.atb_bf16_use_amx(-1) == int(on)
            else:
                assert (linear.F32_TILES_NAME in described) == on and library.atb_f32_use_amx(-1) == int(on)
        assert library.atb_bf16_use_amx(-1) == int(tiles and asked["bfloat16"] == "1")
        assert library.atb_f32_use_amx(-1) == int(tiles and asked["float32"] == "1")
    finally:
        monkeypatch.undo()
        Kernels.for_plan(CPU_BF16)  # the library's choices as this process made them, for the tests after
        Kernels.for_plan(CPU_FP32)


def test_a_compiler_without_amx_still_builds_the_avx512_library_without_the_tiles(monkeypatch, caplog):
    """GCC before 11 refuses -mamx-tile: that must not cost an AMX CPU every other native kernel."""
    native_bf16_kernels()  # (skips where the native kernels cannot run)
    real_build, tried = native.build, []

    def build(name, flags=None):
        tried.append(flags)
        return None if "-mamx-tile" in flags else real_build(name, flags)
    monkeypatch.delenv(native.AMX_EMULATED_ENV, raising=False)  # (the tiles as the compiler gives them)
    monkeypatch.setattr(native, "compile_flags", lambda: (*native.CXX_FLAGS, "-mamx-tile", "-mamx-bf16"))
    monkeypatch.setattr(native, "build", build)
    with caplog.at_level("INFO", logger="atb_models.native"):
        library = native.NativeLibrary.load()
    assert library is not None and library.atb_bf16_amx_available() == 0
    assert tried == [(*native.CXX_FLAGS, "-mamx-tile", "-mamx-bf16"), native.CXX_FLAGS]
    assert "without AMX (-mamx-tile -mamx-bf16)" in caplog.text


def test_amx_emulated_builds_the_avx512_library_with_the_tiles_in_software_in_place_of_the_cpus(monkeypatch):
    """ATB_MODELS_AMX_EMULATED=1 (.ci/run's last pass on a CPU without AMX): the kernels' AMX paths compiled on
    csrc/amx_emulated.h's tiles, never with the compiler's AMX flags, whatever the CPU reports."""
    native_bf16_kernels()  # (skips where the native kernels cannot run)
    tried = []
    monkeypatch.setattr(native, "compile_flags", lambda: (*native.CXX_FLAGS, "-mavx512bf16", "-mamx-tile",
                                                          "-mamx-bf16", "-mamx-int8"))
    monkeypatch.setattr(native, "build", lambda name, flags=None: tried.append(flags))  # (builds nothing)
    for emulated in ("1", "0"):
        monkeypatch.setenv(native.AMX_EMULATED_ENV, emulated)
        assert native.NativeLibrary.load() is None
    assert tried[0] == (*native.CXX_FLAGS, "-mavx512bf16", "-DATB_AMX_EMULATED")
    assert tried[1] == (*native.CXX_FLAGS, "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8")


@pytest.mark.slow
def test_the_real_amx_build_compiles_on_any_cpu_whose_compiler_knows_amx():
    """The emulated tiles take a tile number from a variable; the compiler's intrinsics only a constant. So the
    library as an AMX CPU builds it must compile too, wherever the tests run (not run: no tiles here, perhaps)."""
    import subprocess

    cxx = native.compiler()
    amx = tuple(option for flag, option in native.OPTIONAL_ISA)
    if cxx is None or subprocess.run([cxx, *amx, "-x", "c++", "-E", "-"], input="", capture_output=True,
                                     text=True).returncode != 0:
        pytest.skip("no C++ compiler here that knows AMX (GCC 11 on)")
    assert native.build(native.LIBRARY, (*native.CXX_FLAGS, *amx)) is not None
