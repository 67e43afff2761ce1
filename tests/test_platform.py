"""The device / backend / dtype decisions, on simulated hardware (and the real CPU where it matters)."""

from types import SimpleNamespace

import pytest
import torch

from atb_models import platform
from atb_models.errors import UserError
from atb_models.platform import Capabilities, cpu_capabilities, detect_device_kind, probe, resolve_plan

CPU_BF16 = Capabilities("cpu", "Intel Xeon (avx512_bf16, amx_bf16)", native_bf16=True, native_fp16=False,
                        device_count=1)
CPU_PLAIN = Capabilities("cpu", "AMD EPYC 7763", native_bf16=False, native_fp16=False, device_count=1)
CPU_FP16 = Capabilities("cpu", "Intel Xeon (avx512_fp16)", native_bf16=True, native_fp16=True, device_count=1)
AMPERE = Capabilities("cuda", "NVIDIA A100", native_bf16=True, native_fp16=True, device_count=8)
V100 = Capabilities("cuda", "Tesla V100-SXM2-32GB", native_bf16=False, native_fp16=True, device_count=4)
NPU_910B = Capabilities("npu", "Ascend910B3", native_bf16=True, native_fp16=True, device_count=8)
NPU_910A = Capabilities("npu", "Ascend910A", native_bf16=False, native_fp16=True, device_count=8)


def plan_for(caps, dtype="auto", config_dtype="bfloat16", local_rank=0):
    return resolve_plan(requested_dtype=dtype, config_dtype=config_dtype, local_rank=local_rank, caps=caps)


# --- auto + bfloat16 checkpoint

@pytest.mark.parametrize("caps", [CPU_BF16, AMPERE, NPU_910B], ids=["cpu-avx512bf16", "ampere", "910b"])
def test_auto_keeps_bf16_checkpoint_where_bf16_is_native(caps):
    plan = plan_for(caps)
    assert (plan.llm_dtype, plan.vision_dtype, plan.upcast_attention) == (torch.bfloat16, torch.bfloat16, False)


def test_auto_bf16_checkpoint_on_cpu_without_bf16_units_computes_in_float32():
    plan = plan_for(CPU_PLAIN)
    assert (plan.llm_dtype, plan.vision_dtype, plan.upcast_attention) == (torch.float32, torch.float32, False)
    assert "no AVX512-BF16/AMX" in plan.reason and "float32" in plan.reason


@pytest.mark.parametrize("caps", [V100, NPU_910A], ids=["v100", "910a"])
def test_auto_bf16_checkpoint_on_accelerator_without_bf16_runs_llm_fp16_upcast_and_vision_fp32(caps):
    plan = plan_for(caps)
    assert (plan.llm_dtype, plan.vision_dtype, plan.upcast_attention) == (torch.float16, torch.float32, True)
    assert caps.name in plan.reason and "vision tower in float32" in plan.reason


# --- auto + float16 / float32 checkpoints

@pytest.mark.parametrize("caps", [AMPERE, V100, NPU_910A, CPU_FP16], ids=["ampere", "v100", "910a", "cpu-fp16"])
def test_auto_keeps_fp16_checkpoint_where_fp16_is_native_with_fp32_softmax(caps):
    plan = plan_for(caps, config_dtype="float16")
    assert (plan.llm_dtype, plan.vision_dtype, plan.upcast_attention) == (torch.float16, torch.float16, True)


@pytest.mark.parametrize("caps", [CPU_PLAIN, CPU_BF16], ids=["cpu-plain", "cpu-bf16-only"])
def test_auto_fp16_checkpoint_on_cpu_without_fp16_units_computes_in_float32(caps):
    plan = plan_for(caps, config_dtype="float16")
    assert (plan.llm_dtype, plan.vision_dtype) == (torch.float32, torch.float32)
    assert "float16 matmuls would be far slower" in plan.reason


@pytest.mark.parametrize("config_dtype", ["float32", None], ids=["float32", "absent"])
@pytest.mark.parametrize("caps", [CPU_BF16, AMPERE, NPU_910B], ids=["cpu", "ampere", "910b"])
def test_auto_float32_or_absent_checkpoint_dtype_stays_float32(caps, config_dtype):
    plan = plan_for(caps, config_dtype=config_dtype)
    assert (plan.llm_dtype, plan.vision_dtype, plan.upcast_attention) == (torch.float32, torch.float32, False)


@pytest.mark.parametrize("spelling", ["bfloat16", "BF16", "torch.bfloat16", torch.bfloat16])
def test_checkpoint_dtype_accepts_the_spellings_configs_hold(spelling):
    assert platform.checkpoint_dtype(spelling) == torch.bfloat16


def test_checkpoint_dtype_that_is_not_floating_is_a_user_error():
    with pytest.raises(UserError, match="torch_dtype 'int8'"):
        plan_for(AMPERE, config_dtype="int8")


# --- explicit --dtype

@pytest.mark.parametrize("caps", [CPU_PLAIN, CPU_BF16, V100, NPU_910A, AMPERE], ids=lambda c: c.name)
def test_explicit_float32_is_always_allowed(caps):
    plan = plan_for(caps, dtype="float32")
    assert (plan.llm_dtype, plan.vision_dtype, plan.upcast_attention) == (torch.float32, torch.float32, False)


@pytest.mark.parametrize("caps", [CPU_BF16, AMPERE, NPU_910B], ids=["cpu-avx512bf16", "ampere", "910b"])
def test_explicit_bf16_on_native_device_is_used_for_both_towers(caps):
    plan = plan_for(caps, dtype="bfloat16", config_dtype="float32")
    assert (plan.llm_dtype, plan.vision_dtype, plan.upcast_attention) == (torch.bfloat16, torch.bfloat16, False)
    assert "--dtype bfloat16" in plan.reason


@pytest.mark.parametrize("caps", [AMPERE, V100, NPU_910A], ids=["ampere", "v100", "910a"])
def test_explicit_fp16_on_accelerator_runs_both_towers_fp16_with_fp32_softmax(caps):
    plan = plan_for(caps, dtype="float16")
    assert (plan.llm_dtype, plan.vision_dtype, plan.upcast_attention) == (torch.float16, torch.float16, True)


def test_explicit_bf16_on_cpu_without_bf16_units_is_rejected_with_advice():
    with pytest.raises(UserError) as err:
        plan_for(CPU_PLAIN, dtype="bfloat16")
    assert str(err.value) == ("--dtype bfloat16: this CPU has no native bf16 (needs AVX512-BF16 or AMX); "
                              "use --dtype float32 or --dtype auto")


def test_explicit_fp16_on_cpu_without_fp16_units_is_rejected_with_advice():
    with pytest.raises(UserError, match=r"--dtype float16: this CPU has no native fp16 .*use --dtype float32"):
        plan_for(CPU_BF16, dtype="float16")


@pytest.mark.parametrize("caps", [V100, NPU_910A], ids=["v100", "910a"])
def test_explicit_bf16_on_accelerator_without_bf16_is_rejected_suggesting_float16(caps):
    with pytest.raises(UserError) as err:
        plan_for(caps, dtype="bfloat16")
    message = str(err.value)
    assert message.startswith("--dtype bfloat16: " + caps.name) and "use --dtype float16 or --dtype auto" in message
    assert "\n" not in message


@pytest.mark.parametrize("flag, value", [("dtype", "fp8"), ("dtype", "half"), ("device", "tpu")])
def test_unknown_flag_values_are_user_errors_naming_the_flag(flag, value):
    kwargs = {"requested_dtype": value} if flag == "dtype" else {"requested_device": value}
    with pytest.raises(UserError, match=f"--{flag} {value}: unknown value"):
        resolve_plan(caps=CPU_PLAIN, **kwargs)


# --- device, index and backend

@pytest.mark.parametrize("caps, backend", [(CPU_PLAIN, "gloo"), (AMPERE, "nccl"), (NPU_910B, "hccl")],
                         ids=["cpu", "cuda", "npu"])
def test_dist_backend_follows_the_device_kind(caps, backend):
    assert plan_for(caps).dist_backend == backend


def test_accelerator_device_index_is_the_local_rank():
    plan = plan_for(AMPERE, local_rank=3)
    assert plan.device == torch.device("cuda", 3)
    assert plan_for(NPU_910B, local_rank=5).index == 5  # torch.device("npu") needs torch_npu, absent here


def test_cpu_device_ignores_the_local_rank():
    assert plan_for(CPU_PLAIN, local_rank=3).device == torch.device("cpu")


def test_local_rank_beyond_the_visible_devices_is_a_user_error():
    with pytest.raises(UserError, match="LOCAL_RANK 4: only 4 cuda device"):
        plan_for(V100, local_rank=4)


def test_requested_device_other_than_the_simulated_one_is_a_user_error():
    with pytest.raises(UserError, match="--device cuda: not this machine's device"):
        resolve_plan(requested_device="cuda", caps=CPU_PLAIN)


# --- the log line

def test_describe_is_one_line_naming_device_backend_and_dtypes():
    line = plan_for(CPU_PLAIN).describe()
    assert "\n" not in line
    assert line.startswith("device cpu (AMD EPYC 7763), backend gloo, language model float32, vision float32: ")
    assert line.endswith("computing in float32")


def test_describe_of_the_fp16_fallback_mentions_fp32_softmax_and_the_device_index():
    line = plan_for(V100, local_rank=1).describe()
    assert line.startswith("device cuda:1 (Tesla V100-SXM2-32GB), backend nccl, "
                           "language model float16 (float32 softmax), vision float32: ")


# --- probing the real machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme sse avx2 avx512f avx512_bf16 avx512vl
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme sse avx2 avx512f avx512_bf16 avx512vl
"""


def test_probe_cpu_reads_bf16_from_the_cpuinfo_flags(monkeypatch):
    monkeypatch.setattr(platform, "read_cpuinfo", lambda: CPUINFO)
    caps = probe("cpu")
    assert caps == Capabilities("cpu", "AMD EPYC 9654 96-Core Processor (avx512_bf16)", native_bf16=True,
                                native_fp16=False, device_count=1)


def test_probe_cpu_without_matrix_flags_has_neither_bf16_nor_fp16(monkeypatch):
    monkeypatch.setattr(platform, "read_cpuinfo", lambda: CPUINFO.replace(" avx512_bf16", ""))
    caps = probe("cpu")
    assert (caps.name, caps.native_bf16, caps.native_fp16) == ("AMD EPYC 9654 96-Core Processor", False, False)


def test_cpu_capabilities_see_amx_and_fp16_flags():
    caps = cpu_capabilities("model name : Xeon\nflags : amx_bf16 amx_fp16 avx512_fp16\n")
    assert (caps.native_bf16, caps.native_fp16) == (True, True)


def test_cpu_capabilities_without_cpuinfo_assume_nothing_native():
    caps = cpu_capabilities("")
    assert (caps.name, caps.native_bf16, caps.native_fp16) == ("unknown CPU", False, False)


def test_resolve_plan_on_this_machine_runs_on_the_cpu():
    plan = resolve_plan()
    assert plan.kind == "cpu" and plan.dist_backend == "gloo"


def test_auto_detects_the_cpu_here():
    assert detect_device_kind("auto") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_explicit_cuda_without_a_cuda_device_is_a_user_error():
    with pytest.raises(UserError, match="--device cuda: no CUDA device is visible"):
        detect_device_kind("cuda")


@pytest.mark.skipif(platform._npu_device_count() > 0, reason="an NPU is visible")
def test_explicit_npu_without_an_npu_is_a_user_error():
    with pytest.raises(UserError, match="--device npu: no Ascend NPU is visible"):
        detect_device_kind("npu")


def fake_torch_npu(name, soc_version):
    npu = SimpleNamespace(get_device_name=lambda index: name, get_soc_version=lambda: soc_version,
                          device_count=lambda: 8, is_available=lambda: True)
    return SimpleNamespace(npu=npu)


@pytest.mark.parametrize("name, soc_version, bf16", [
    ("Ascend910B3", 222, True),
    ("Ascend910A", 100, False),     # the soc version alone decides
    ("Ascend310P3", 202, False),
    ("Ascend910ProA", 220, True),   # no "910A" in the name, soc version says 910B-class
    ("Ascend910A", 999, False),     # the name alone decides
])
def test_probe_npu_has_no_bf16_on_the_910a_and_310p_families(monkeypatch, name, soc_version, bf16):
    monkeypatch.setattr(platform, "_import_torch_npu", lambda: fake_torch_npu(name, soc_version))
    caps = probe("npu")
    assert (caps.kind, caps.name, caps.native_bf16, caps.native_fp16, caps.device_count) == ("npu", name, bf16,
                                                                                            True, 8)


@pytest.mark.parametrize("major, bf16", [(7, False), (8, True), (9, True)], ids=["volta", "ampere", "hopper"])
def test_probe_cuda_has_native_bf16_from_compute_capability_8(monkeypatch, major, bf16):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert probe("cuda") == Capabilities("cuda", "GPU", native_bf16=bf16, native_fp16=True, device_count=2)


def test_linear_kernel_matches_f_linear_on_the_cpu_and_is_f_linear_elsewhere():
    import torch.nn.functional as F

    from atb_models.platform import ONEDNN_MIN_WEIGHT_ELEMENTS, PLAIN_LINEAR, linear_kernel

    cpu_plan = resolve_plan("cpu", "float32", "float32")
    kernel = linear_kernel(cpu_plan)
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
    gpu = Capabilities(kind="cuda", name="sim", native_bf16=True, native_fp16=True, device_count=1)
    assert linear_kernel(resolve_plan("auto", "auto", "bfloat16", caps=gpu)) is PLAIN_LINEAR
    assert PLAIN_LINEAR.pack(large) is None


def test_pack_weights_packs_large_linears_but_not_a_tied_lm_head(monkeypatch):
    from atb_models.layers import linear as linear_module
    from atb_models.platform import OneDnnLinear

    monkeypatch.setattr(linear_module, "_kernel", OneDnnLinear(None, lambda w, rows: w.clone().mul_(2)))
    model = torch.nn.ModuleList([linear_module.Linear(512, 512, bias=False, dtype=torch.float32),
                                 linear_module.Linear(8, 8, bias=False, dtype=torch.float32),
                                 linear_module.VocabParallelLMHead(512, 600, torch.float32)])
    for module in model:
        torch.nn.init.ones_(module.weight)
    model[2].tie_to(torch.ones(600, 512))
    assert linear_module.pack_weights(model) == 1
    assert model[0].weight.eq(2).all() and model[1].weight.eq(1).all() and model[2].weight.eq(1).all()


def _panel_packed(weight: torch.Tensor) -> torch.Tensor:
    """The panel kernel's layout written out by hand: group g, step k holds the 64 outputs W[64g:64g+64, k]."""
    out_features, in_features = weight.shape
    packed = torch.empty(out_features // 64, in_features, 64)
    for g in range(out_features // 64):
        for k in range(in_features):
            packed[g, k] = weight[64 * g:64 * g + 64, k]
    return packed


def test_the_cpu_linear_is_the_kits_panel_kernel_where_the_cpu_has_avx512_and_it_matches_f_linear():
    import torch.nn.functional as F

    from atb_models.platform import ONEDNN_MIN_WEIGHT_ELEMENTS, OneDnnLinear, PanelLinear, linear_kernel

    kernel = linear_kernel(resolve_plan("cpu", "float32", "float32"), "auto")
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        # Built with AVX-512 instructions: another CPU must not get it (it would die of SIGILL).
        assert not isinstance(kernel, PanelLinear) and isinstance(kernel, OneDnnLinear)
        return
    assert isinstance(kernel, PanelLinear), "g++ builds the panel kernel on an AVX-512 CPU"
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


def test_the_cpu_linear_follows_its_environment_variable(monkeypatch):
    from atb_models.platform import PLAIN_LINEAR, OneDnnLinear, PanelLinear, linear_kernel

    plan = resolve_plan("cpu", "float32", "float32")
    monkeypatch.setenv("ATB_MODELS_CPU_LINEAR", "onednn")
    kernel = linear_kernel(plan)
    assert isinstance(kernel, OneDnnLinear) and not isinstance(kernel, PanelLinear)
    monkeypatch.setenv("ATB_MODELS_CPU_LINEAR", "torch")
    assert linear_kernel(plan) is PLAIN_LINEAR
    monkeypatch.setenv("ATB_MODELS_CPU_LINEAR", "fastest")
    with pytest.raises(UserError, match="ATB_MODELS_CPU_LINEAR='fastest'"):
        linear_kernel(plan)


@pytest.mark.parametrize("compiler", [None, "/bin/false"])
def test_without_a_working_compiler_the_cpu_linear_falls_back_to_onednn(monkeypatch, tmp_path, caplog, compiler):
    from atb_models import native
    from atb_models.platform import OneDnnLinear, PanelLinear, linear_kernel

    monkeypatch.setenv("ATB_MODELS_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "compiler", lambda: compiler)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with caplog.at_level("INFO", logger="atb_models.native"):
        kernel = linear_kernel(resolve_plan("cpu", "float32", "float32"), "panel")
    assert isinstance(kernel, OneDnnLinear) and not isinstance(kernel, PanelLinear)
    assert "no C++ compiler" in caplog.text if compiler is None else "failed" in caplog.text
    assert not list(tmp_path.rglob("*.so")), "no library and no half-built file is left behind"


def _native_or_none(make, kind):
    """The native kernel `make(plan)` gives for a float32 CPU plan, checked: a `kind` on an AVX-512 CPU (g++ builds
    it there), None on any other (built with AVX-512 instructions, it would die of SIGILL)."""
    kernel = make(resolve_plan("cpu", "float32", "float32"))
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert kernel is None
    else:
        assert isinstance(kernel, kind), "g++ builds the kit's native kernels on an AVX-512 CPU"
    return kernel


def _decode_step(lengths: list, block_size: int, num_blocks: int, head_dim: int, generator):
    """A decode step's context as the model runner makes it, for sequences of `lengths` (each counting its new
    token), each in its own blocks in no order; and each new position's rotary, as the model computes it."""
    from atb_models.layers import attention
    from atb_models.layers.rotary import MRotaryEmbedding

    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(lengths), 10, dtype=torch.long)  # unused entries padded with 0 as the runner does
    used = 0
    for row, length in enumerate(lengths):
        count = -(-length // block_size)
        tables[row, :count] = order[used:used + count]
        used += count
    last = [n - 1 for n in lengths]
    slots = torch.tensor([[tables[b, t // block_size].item() for b, t in enumerate(last)],
                          [t % block_size for t in last]])
    context = torch.tensor(lengths)
    mask = (torch.arange(tables.shape[1] * block_size)[None, :] < context[:, None])[:, None, None, :]
    step = attention.StepContext(False, slots, block_tables=tables, context_mask=mask, context_lens=context)
    positions = torch.tensor(last).expand(3, -1)
    cos, sin = MRotaryEmbedding(head_dim, 10000.0, [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
                                torch.device("cpu")).cos_sin(positions, torch.float32)
    return step, cos, sin


@pytest.mark.parametrize("head_dim", [64, 128, 48])
def test_native_decode_attention_stores_and_attends_as_the_pytorch_path_does(head_dim):
    from atb_models.layers import attention
    from atb_models.platform import PagedDecodeAttention, decode_attention_kernel

    kernel = _native_or_none(decode_attention_kernel, PagedDecodeAttention)
    if kernel is None:
        return
    generator = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, block_size, num_blocks = 14, 2, 4, 40
    # One token, exactly a block, a block and one, 16 (one whole vector of scores), 37 (vectors and a tail).
    lengths = [1, 4, 5, 16, 37]
    step, cos, sin = _decode_step(lengths, block_size, num_blocks, head_dim, generator)
    cache = [torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=generator) for _ in range(2)]
    # q, k, v as the model hands them over: strided views into one projection output.
    qkv = 3 * torch.randn(len(lengths), heads + 2 * kv_heads, head_dim, generator=generator)  # scores over ~[-30, 30]
    q = qkv[:, :heads]
    results = []
    for native in (None, kernel):
        k_cache, v_cache = cache[0].clone(), cache[1].clone()
        attention.set_context(step)
        attention.set_decode_attention_kernel(native)
        try:
            out = attention.rotary_paged_attention(qkv, heads, kv_heads, cos, sin, k_cache, v_cache,
                                                   head_dim ** -0.5, upcast=False)
        finally:
            attention.set_context(None)
            attention.set_decode_attention_kernel(None)
        results.append((out, k_cache, v_cache))
    (expected, k_expected, v_expected), (got, k_got, v_got) = results
    # Whole 16-float vectors per head row run natively; otherwise the kernel declines and PyTorch runs.
    assert kernel.suits(q, k_got) == (head_dim % 16 == 0)
    assert torch.equal(v_got, v_expected)
    assert torch.allclose(k_got, k_expected, atol=1e-5, rtol=1e-5)  # rotated: rounding may differ in the last bit
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(k_expected, cache[0])  # the step did store its K


def test_native_rms_norm_matches_the_pytorch_operators_with_and_without_the_residual_add():
    from atb_models.layers import norm
    from atb_models.platform import NativeRMSNorm, rms_norm_kernel

    kernel = _native_or_none(rms_norm_kernel, NativeRMSNorm)
    if kernel is None:
        return
    generator = torch.Generator().manual_seed(0)
    for rows, hidden in ((1, 896), (16, 40), (100, 1536)):  # 40: a partial vector; 100 rows: threaded
        layer = norm.RMSNorm(hidden, 1e-6, torch.float32)
        layer.weight.copy_(torch.randn(hidden, generator=generator))
        x = torch.randn(rows, hidden, generator=generator)
        delta = torch.randn(rows, hidden, generator=generator)
        expected_sum = x + delta
        expected = layer(expected_sum)  # PyTorch's operators: no native kernel set
        norm.set_rms_norm_kernel(kernel)
        try:
            total, got = layer.add_and_norm(x, delta)
            alone = layer(x)
        finally:
            norm.set_rms_norm_kernel(None)
        assert torch.equal(total, expected_sum)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.allclose(alone, layer(x), atol=1e-5, rtol=1e-5)


def test_native_silu_and_mul_matches_pytorchs_silu_times_up_on_the_halves_of_a_projection():
    import torch.nn.functional as F

    from atb_models.layers import activation
    from atb_models.platform import NativeSiluAndMul, silu_and_mul_kernel

    kernel = _native_or_none(silu_and_mul_kernel, NativeSiluAndMul)
    if kernel is None:
        return
    generator = torch.Generator().manual_seed(0)
    for rows, width in ((4, 4864), (500, 40), (300, 200)):  # 40, 200: partial vectors; 300 x 200: threaded
        projection = 8 * torch.randn(rows, 2 * width, generator=generator)
        projection[0, :4] = torch.tensor([0.0, -200.0, 200.0, -1e-30])  # zero, far on either side, tiny
        gate, up = projection.split(width, dim=-1)
        expected = F.silu(gate.double()) * up.double()
        activation.set_silu_and_mul_kernel(kernel)
        try:
            got = activation.silu_and_mul(gate, up)
        finally:
            activation.set_silu_and_mul_kernel(None)
        assert got.shape == (rows, width) and got.is_contiguous()
        assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5), (rows, width)
    # Halves of different shapes or layouts, or too few values to repay the call, are not its case: PyTorch runs.
    assert not kernel.suits(gate, up[:, :-1]) and not kernel.suits(gate.t(), up.t())
    assert not kernel.suits(gate[:1], up[:1])
    assert not kernel.suits(gate.double(), up.double())


def test_native_decoder_layer_decodes_as_the_layer_does_operator_by_operator():
    from atb_models.layers import activation, attention, linear, norm
    from atb_models.layers.sharding import HeadLayout
    from atb_models.models import qwen2_vl
    from atb_models.platform import (PLAIN_LINEAR, NativeDecoderLayer, decode_attention_kernel, decoder_layer_kernel,
                                     linear_kernel, rms_norm_kernel, silu_and_mul_kernel)

    plan = resolve_plan("cpu", "float32", "float32")
    kernel = _native_or_none(decoder_layer_kernel, NativeDecoderLayer)
    if kernel is None:
        return
    generator = torch.Generator().manual_seed(0)
    # Large enough for every linear to be packed for the panel kernel (output sizes multiples of 64).
    config = SimpleNamespace(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                             intermediate_size=1024)
    layer = qwen2_vl.DecoderLayer(config, HeadLayout(8, 2, 1, 0), torch.float32, False)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
    block_size, num_blocks = 16, 12
    lengths = [1, 17, 40, 5]
    step, cos, sin = _decode_step(lengths, block_size, num_blocks, 64, generator)
    caches = [torch.randn(num_blocks, 2, block_size, 64, generator=generator) for _ in range(2)]
    x = torch.randn(len(lengths), 512, generator=generator)
    linear.set_linear_kernel(linear_kernel(plan))
    attention.set_decode_attention_kernel(decode_attention_kernel(plan))
    norm.set_rms_norm_kernel(rms_norm_kernel(plan))
    activation.set_silu_and_mul_kernel(silu_and_mul_kernel(plan))
    results = []
    try:
        assert linear.pack_weights(layer) == 4
        for native in (None, kernel):
            layer.k_cache, layer.v_cache = caches[0].clone(), caches[1].clone()
            step.native_step = None
            attention.set_context(step)
            qwen2_vl.set_decoder_layer_kernel(native)
            results.append((layer(x.clone(), cos, sin), layer.k_cache, layer.v_cache))
        assert layer._native_layer_weights() is not None, "the layer was the native kernel's case"
        # Not its case: the attention upcast (the operator path runs, and still agrees).
        layer.upcast_attention, layer.k_cache = True, caches[0].clone()
        assert layer._native_layer_weights() is None
    finally:
        attention.set_context(None)
        qwen2_vl.set_decoder_layer_kernel(None)
        linear.set_linear_kernel(PLAIN_LINEAR)
        attention.set_decode_attention_kernel(None)
        norm.set_rms_norm_kernel(None)
        activation.set_silu_and_mul_kernel(None)
    (expected, k_expected, v_expected), (got, k_got, v_got) = results
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(k_got, k_expected, atol=1e-6) and torch.equal(v_got, v_expected)
    assert not torch.equal(k_expected, caches[0])  # the step did store its K
    unpacked = qwen2_vl.DecoderLayer(config, HeadLayout(8, 2, 1, 0), torch.float32, False)
    qwen2_vl.set_decoder_layer_kernel(kernel)
    try:
        unpacked.k_cache, unpacked.v_cache = caches
        assert unpacked._native_layer_weights() is None  # weights not in the panel layout
    finally:
        qwen2_vl.set_decoder_layer_kernel(None)
