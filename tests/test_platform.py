"""The device / backend / dtype decisions, on simulated hardware (and the real CPU where it matters)."""

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from atb_models import host, platform
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
    monkeypatch.delenv(host.FLAGS_OFF_ENV, raising=False)  # (the simulated machine's flags, all of them)
    monkeypatch.setattr(host, "read_cpuinfo", lambda: CPUINFO)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    caps = probe("cpu")
    assert caps == Capabilities("cpu", "AMD EPYC 9654 96-Core Processor (avx512_bf16)", native_bf16=True,
                                native_fp16=False, device_count=1)


def test_probe_cpu_without_matrix_flags_has_neither_bf16_nor_fp16(monkeypatch):
    monkeypatch.delenv(host.FLAGS_OFF_ENV, raising=False)  # (the simulated machine's flags, all of them)
    monkeypatch.setattr(host, "read_cpuinfo", lambda: CPUINFO.replace(" avx512_bf16", ""))
    caps = probe("cpu")
    assert (caps.name, caps.native_bf16, caps.native_fp16) == ("AMD EPYC 9654 96-Core Processor", False, False)


def test_probe_cpu_with_pytorch_below_avx512_runs_no_bf16_whatever_the_flags(monkeypatch):
    # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU: PyTorch's bfloat16 products (oneDNN's packing refuses a bfloat16
    # weight) and the kit's AVX-512 library are out, so the CPU computes as one without the flags.
    monkeypatch.delenv(host.FLAGS_OFF_ENV, raising=False)  # (the simulated machine's flags, all of them)
    monkeypatch.setattr(host, "read_cpuinfo", lambda: CPUINFO)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    caps = probe("cpu")
    assert (caps.native_bf16, caps.native_fp16) == (False, False)
    assert caps.unusable == "PyTorch's CPU capability is AVX2, not AVX512"
    plan = resolve_plan(config_dtype="bfloat16", caps=caps)
    assert (plan.llm_dtype, plan.vision_dtype) == (torch.float32, torch.float32)
    assert "this CPU has no usable AVX512-BF16/AMX (PyTorch's CPU capability is AVX2" in plan.reason
    with pytest.raises(UserError, match=r"no native bf16 \(PyTorch's CPU capability is AVX2"):
        resolve_plan(requested_dtype="bfloat16", config_dtype="bfloat16", caps=caps)


def test_flags_turned_off_make_the_kit_see_and_build_for_this_cpu_as_one_without_them(monkeypatch):
    """$ATB_MODELS_CPU_FLAGS_OFF (.ci/run's stand-in for an AVX-512 CPU without VNNI, AVX512-BF16 or AMX): this
    machine's flags less those named, for the plan and the native library's build alike; a cpuinfo text given
    explicitly is read as it is."""
    from atb_models.kernels import native

    monkeypatch.delenv(host.FLAGS_OFF_ENV, raising=False)  # (the simulated machine's flags, all of them)
    monkeypatch.setattr(host, "read_cpuinfo", lambda: CPUINFO.replace(" avx512vl", " avx512vl avx512_vnni"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert probe("cpu").native_bf16 and {"-mavx512bf16", "-mavx512vnni"} <= set(native.compile_flags())
    monkeypatch.setenv(host.FLAGS_OFF_ENV, "avx512_bf16 avx512_vnni")
    caps = probe("cpu")
    assert (caps.name, caps.native_bf16) == ("AMD EPYC 9654 96-Core Processor", False)
    assert native.compile_flags() == native.CXX_FLAGS and "avx512f" in host.cpu_flags()
    assert cpu_capabilities(CPUINFO).native_bf16 and "avx512_bf16" in host.cpu_flags(CPUINFO)


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


# --- MKL's vector math: each operator's first call on one thread

def _settles():
    from atb_models import host
    from atb_models.oracle import worker

    return {"kit": host.settle_vector_math, "oracle worker": worker._settle_vector_math}


@pytest.mark.parametrize("side", ["kit", "oracle worker"])
def test_settle_vector_math_calls_each_operator_per_dtype_on_too_few_elements_to_split(monkeypatch, side):
    """PyTorch splits a unary operator across threads above 2048 elements (its grain); each settle's calls must
    stay at or below that, in both dtypes MKL's vector math serves."""
    from atb_models import host

    calls = []
    for name in host.VECTOR_MATH_OPERATORS:
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda x, _name=name, _real=real: calls.append(
            (_name, x.dtype, x.numel())) or _real(x))
    _settles()[side]()
    assert sorted((name, str(dtype)) for name, dtype, _ in calls) == sorted(
        (name, str(dtype)) for name in host.VECTOR_MATH_OPERATORS for dtype in (torch.float32, torch.float64))
    assert max(n for _, _, n in calls) <= 2048


def test_vector_math_operators_are_the_ones_this_torch_hands_to_mkl_and_the_oracle_workers():
    """The list is ATen's own (its header's uncommented IMPLEMENT_VML_MKL lines), so a torch that hands MKL another
    operator fails here; the oracle worker, which cannot import the kit, keeps the same list."""
    from atb_models import host
    from atb_models.oracle import worker

    header = Path(torch.__file__).parent / "include" / "ATen" / "cpu" / "vml.h"
    if not header.is_file() or not torch.backends.mkl.is_available():
        pytest.skip("this torch has no ATen headers or no MKL: no vector math to settle")
    listed = re.findall(r"^IMPLEMENT_VML_MKL\((\w+),", header.read_text(), flags=re.MULTILINE)
    assert listed and sorted(listed) == sorted(host.VECTOR_MATH_OPERATORS)
    assert worker.VECTOR_MATH_OPERATORS == host.VECTOR_MATH_OPERATORS


def test_oracle_worker_settles_vector_math_before_its_command(monkeypatch, tmp_path):
    from atb_models.oracle import worker

    calls = []
    monkeypatch.setattr(worker, "_settle_vector_math", lambda: calls.append("settle"))
    monkeypatch.setattr(worker, "_build", lambda *_args: calls.append("build"))
    worker.main(["build", "--like", str(tmp_path), "--out", str(tmp_path / "out"), "--settings", "{}"])
    assert calls == ["settle", "build"]


def test_model_runner_and_reference_loader_settle_vector_math_before_the_model_exists(monkeypatch):
    """The kit's runner and the benchmark's in-process transformers both settle MKL's kernels before building a
    model: a refused checkpoint stops them after the settle, and the settle has been called."""
    from atb_models.benchmark import engines
    from atb_models.engine import model_runner

    calls = []
    for module in (model_runner, engines):
        monkeypatch.setattr(module, "settle_vector_math", lambda _m=module.__name__: calls.append(_m))

    class Refused(Exception):
        pass

    def refuse(*_args, **_kwargs):
        raise Refused

    family = SimpleNamespace(model_class=lambda: refuse,
                             reference_class=lambda: SimpleNamespace(from_pretrained=refuse))
    sizes = SimpleNamespace(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1)
    config = SimpleNamespace(family=family, hf_config=sizes, path="/nonexistent")
    plan = SimpleNamespace(kind="cpu", device=torch.device("cpu"), llm_dtype=torch.float32,
                           vision_dtype=torch.float32, upcast_attention=False)
    monkeypatch.setattr(model_runner.Kernels, "for_plan", staticmethod(lambda *_a: SimpleNamespace(describe=str)))
    with pytest.raises(Refused):
        model_runner.ModelRunner(config, plan, block_size=16)
    with pytest.raises(Refused):
        engines.load_reference_model(config, plan)
    assert calls == ["atb_models.engine.model_runner", "atb_models.benchmark.engines"]


def test_a_process_temp_folder_sweeps_the_folders_of_processes_that_are_gone(tmp_path):
    """A SIGKILLed launcher, quantizer or calibration leaves its temporary folder; the next one removes it, and
    never another live process's, nor a name of another form."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, live, other = (tmp_path / f"kit_{gone}-abc", tmp_path / f"kit_{os.getppid()}-def", tmp_path / "kit_x-1")
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "f").write_text("x")
    made = host.process_temp_folder("kit_", str(tmp_path))
    assert os.path.basename(made).startswith(f"kit_{os.getpid()}-") and os.path.isdir(made)
    assert not stale.exists() and live.exists() and other.exists()
