"""Weight-only int8 (W8A16): the quantization itself, `python -m atb_models.quantize` (its output, its refusals),
loading that output and quantizing at load (the same bytes, the same tokens), and tensor parallelism in int8."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from atb_models import LLM, SamplingParams, UserError
from atb_models.kernels.w8a16 import dequantize, quantize
from atb_models.quantize import main as quantize_main
from tests.test_tensor_parallel import SHAPE_2B, run_ranks

OPTIONS = dict(dtype="float32", device="cpu", max_batch_size=2, max_input_length=512, max_output_length=8,
               block_size=16)
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_quantization_is_symmetric_with_one_scale_per_row_or_group():
    w = torch.randn(6, 256)
    w[2] = 0
    q, scale = quantize(w)
    assert q.dtype == torch.int8 and scale.shape == (6, 1) and scale.dtype == torch.float32
    assert q.abs().amax(dim=1).tolist() == [127, 127, 0, 127, 127, 127]  # every row's largest maps to +-127
    assert scale[2].item() == 1.0  # a zero row: zeros, and a scale that divides by nothing
    assert ((dequantize(q, scale) - w).abs() <= scale / 2 + 1e-7).all()  # round to nearest
    q, scale = quantize(w.bfloat16(), group_size=64)
    assert scale.shape == (6, 4)
    assert torch.equal(q, quantize(w.bfloat16().float(), group_size=64)[0])  # computed in float32 from any dtype
    with pytest.raises(ValueError, match="does not divide"):
        quantize(w, group_size=100)


@pytest.fixture(scope="module")
def float_and_quantized(tiny_checkpoint, tmp_path_factory):
    """A two-shard float checkpoint and the tool's per-channel output of it."""
    float_dir = tiny_checkpoint(shards=2)
    out = tmp_path_factory.mktemp("w8a16") / "out"
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(out), "--method", "w8a16"]) == 0
    return float_dir, out


def test_the_tool_writes_int8_linears_scales_a_description_and_an_index(float_and_quantized):
    float_dir, out = float_and_quantized
    config = json.loads((out / "config.json").read_text())
    assert config["quantize"] == "w8a16"
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W8A16" and description["group_size"] == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {p.name for p in float_dir.glob("*.safetensors")}  # one shard out per shard in
    for layer in range(2):
        for linear in LAYER_LINEARS:
            name = f"model.layers.{layer}.{'self_attn' if 'proj' in linear and linear[0] in 'qkvo' else 'mlp'}" \
                   f".{linear}.weight"
            assert description[name] == description[name + "_scale"] == "W8A16" and name + "_scale" in index
    floats = [name for name, kind in description.items() if kind == "FLOAT"]
    assert "lm_head.weight" in floats and "model.embed_tokens.weight" in floats
    assert not any(name.startswith("visual.") and description[name] == "W8A16" for name in index)
    assert (out / "tokenizer.json").read_bytes() == (float_dir / "tokenizer.json").read_bytes()


def test_the_tools_output_and_quantizing_at_load_hold_the_same_int8_weights_and_give_the_same_tokens(
        float_and_quantized, sample_image_path):
    float_dir, out = float_and_quantized
    saved, at_load = LLM(str(out), **OPTIONS), LLM(str(float_dir), quantize="w8a16", **OPTIONS)
    assert saved.quantization.from_float is False and at_load.quantization.from_float is True
    ours, theirs = dict(saved.runner.model.named_parameters()), dict(at_load.runner.model.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    qkv = ours["model.layers.0.self_attn.qkv_proj.weight_scale"]
    assert qkv.dtype == torch.float32 and qkv.shape[1] == 1
    requests = [[{"image": str(sample_image_path)}, {"text": "What is this?"}], [{"text": "Hello there"}]]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in saved.generate(requests, params)] == [
        o.token_ids for o in at_load.generate(requests, params)]


def test_per_group_scales_load_and_follow_the_float_model_closely(tiny_checkpoint, tmp_path, sample_image_path):
    float_dir = tiny_checkpoint()
    out = tmp_path / "g32"
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(out), "--group_size", "32"]) == 0
    llm = LLM(str(out), **OPTIONS)
    scale = dict(llm.runner.model.named_parameters())["model.layers.0.mlp.down_proj.weight_scale"]
    assert scale.shape == (64, 128 // 32)
    float_llm = LLM(str(float_dir), **OPTIONS)
    from tests.parity_utils import LogitsRecorder

    recorders = [LogitsRecorder(engine) for engine in (llm, float_llm)]
    request = [[{"image": str(sample_image_path)}, {"text": "What is this?"}]]
    for engine in (llm, float_llm):
        engine.generate(request, SamplingParams(max_tokens=4, ignore_eos=True))
    int8_logits, float_logits = (torch.stack(r.by_seq[0]) for r in recorders)
    assert (int8_logits - float_logits).abs().max().item() < 0.05 * float_logits.abs().max().item()


@pytest.mark.parametrize("case", ["int32_weight", "uint8_weight", "scales_of_other_groups"])
def test_a_quantized_checkpoint_with_damaged_int8_weights_or_scales_is_refused_at_load(case, float_and_quantized,
                                                                                        tmp_path):
    _, quantized = float_and_quantized
    damaged = tmp_path / "damaged"
    shutil.copytree(quantized, damaged)
    name = "model.layers.0.mlp.down_proj.weight"
    [shard] = [p for p in damaged.glob("*.safetensors") if name in safe_open(p, "pt").keys()]
    tensors = load_file(shard)
    if case == "int32_weight":  # values an int8 cannot hold, which a conversion would wrap
        tensors[name] = tensors[name].to(torch.int32) * 1000 + 1
    elif case == "uint8_weight":
        tensors[name] = tensors[name].to(torch.uint8)
    else:  # three groups a row where the description says one scale per row
        tensors[name + "_scale"] = tensors[name + "_scale"].repeat(1, 4)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"{name}" + (".*damaged" if case != "int32_weight" else ".*torch.int32")):
        LLM(str(damaged), **OPTIONS)


def test_the_tools_output_folder_has_ordinary_modes_and_a_replaced_empty_folder_keeps_its_own(float_and_quantized,
                                                                                               tmp_path):
    float_dir, _ = float_and_quantized
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o750)
    mine.chmod(0o750)
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(mine)]) == 0
    assert stat.S_IMODE(mine.stat().st_mode) == 0o750
    mask = os.umask(0)
    os.umask(mask)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in mine.iterdir())


def test_shards_in_sub_folders_sharing_a_file_name_keep_their_places_in_the_output(float_and_quantized, tmp_path,
                                                                                   sample_image_path):
    """An index may place shards in sub-folders (a/w.safetensors, b/w.safetensors); the tool wrote both to
    OUT/w.safetensors, the second over the first, and said it had written a checkpoint that does not load."""
    float_dir, _ = float_and_quantized
    source = tmp_path / "nested"
    shutil.copytree(float_dir, source)
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    for folder, shard in zip("ab", sorted(set(weight_map.values()))):
        (source / folder).mkdir()
        shutil.move(source / shard, source / folder / "w.safetensors")
        weight_map = {name: f"{folder}/w.safetensors" if f == shard else f for name, f in weight_map.items()}
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    assert quantize_main(["--model_path", str(source), "--output_dir", str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {"a/w.safetensors", "b/w.safetensors"}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / "a").stat().st_mode) == 0o777 & ~mask
    request = [{"image": sample_image_path}, {"text": "Describe."}]
    ours = LLM(str(out), **OPTIONS).generate([request], SamplingParams(max_tokens=4))[0]
    theirs = LLM(str(float_dir), quantize="w8a16", **OPTIONS).generate([request], SamplingParams(max_tokens=4))[0]
    assert ours.token_ids == theirs.token_ids


@pytest.mark.parametrize("case", ["already_quantized", "output_not_empty", "unknown_model_type", "tied_head",
                                  "output_under_a_file", "output_under_proc"])
def test_the_tool_refuses_in_one_line_and_writes_nothing(case, float_and_quantized, tiny_checkpoint, tmp_path,
                                                          capsys):
    float_dir, quantized = float_and_quantized
    source, out, extra = float_dir, tmp_path / "out", []
    if case == "already_quantized":
        source, expected = quantized, "is already quantized (w8a16)"
    elif case == "output_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expected = "exists and is not empty"
    elif case == "unknown_model_type":
        source = tmp_path / "llama"
        shutil.copytree(float_dir, source)
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
        expected = "llama"
    elif case == "output_under_a_file":
        (tmp_path / "afile").write_text("mine")
        out, expected = tmp_path / "afile" / "sub", "cannot create"
    elif case == "output_under_proc":
        out, expected = Path("/proc/atb_models_test_out"), "--output_dir /proc/atb_models_test_out"
    else:
        from atb_models.demo.checkpoint import TinyShape

        source, extra = tiny_checkpoint(shape=TinyShape(tie_word_embeddings=True)), ["--quantize_lm_head"]
        expected = "tied to the embedding table"
    assert quantize_main(["--model_path", str(source), "--output_dir", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error: ") and expected in err[-1] and "Traceback" not in "\n".join(err)
    if case == "output_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


@pytest.mark.parametrize("where", ["a shard", "a copied file"])
def test_a_full_disk_while_writing_is_one_error_line_and_leaves_nothing(where, float_and_quantized, tmp_path,
                                                                          monkeypatch, capsys):
    """safetensors reports a full disk in its own error type, and a copy as an OSError: both were tracebacks."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from atb_models import quantize as quantize_module

    def full(*args, **kwargs):
        if where == "a shard":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch if where == "a shard" else quantize_module.shutil,
                        "save_file" if where == "a shard" else "copy", full)
    float_dir, _ = float_and_quantized
    mine = tmp_path / "mine"
    mine.mkdir()
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(mine)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"Error: --output_dir {mine} not written: ")
    assert "No space left on device" in err
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and not any(mine.iterdir())


def test_a_failed_run_removes_the_folders_it_made_above_the_output_and_no_other(float_and_quantized, tmp_path,
                                                                                 capsys):
    """The parents of OUT are made before the work starts; a run that then failed (here a group size that divides
    no layer, found once the shards are read) left them behind."""
    float_dir, _ = float_and_quantized
    (tmp_path / "mine").mkdir()
    out = tmp_path / "mine" / "new" / "deeper" / "out"
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(out), "--group_size", "7"]) == 1
    assert "does not divide" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and not any((tmp_path / "mine").iterdir())


def test_an_empty_current_folder_given_as_dot_is_written_like_any_empty_folder(float_and_quantized, tmp_path,
                                                                                monkeypatch):
    """`--output_dir .` in an empty folder: Path(".").parent is "." itself, so the staging folder went inside the
    output and the tool ended in 'not written: Invalid argument'."""
    float_dir, _ = float_and_quantized
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", "."]) == 0
    assert json.loads((here / "config.json").read_text())["quantize"] == "w8a16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_the_tools_module_and_help_load_no_torch():
    """torch loads inside the entry point, whose handlers turn Ctrl-C into `Interrupted`: imported with the module
    (through atb_models.host), a Ctrl-C in the tool's first second was a traceback, and --help waited for it."""
    from tests.test_run_pa import HEAVY, _modules_after

    modules = _modules_after("from atb_models.quantize import build_parser\nbuild_parser().format_help()")
    assert not modules & set(HEAVY), modules & set(HEAVY)


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_int8_ranks_give_the_tokens_of_one_rank_and_read_only_their_slices(tiny_checkpoint, sample_image_path,
                                                                           tmp_path, world_size):
    """Qwen2-VL-2B's head ratio (12 / 2): zero heads and replicated KV heads with int8 weights and their scales."""
    float_dir = tiny_checkpoint(shape=SHAPE_2B)
    out = tmp_path / "w8a16"
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(out)]) == 0
    requests = [[{"image": str(sample_image_path)}, {"text": "What is in the picture?"}],
                [{"text": "Hello, what colour is the sky?"}]]
    one = LLM(str(out), **dict(OPTIONS, max_batch_size=4))
    expected = [o.token_ids for o in one.generate(requests, SamplingParams(max_tokens=5, ignore_eos=True))]
    ranks = run_ranks(tmp_path, world_size, {"model": str(out), "requests": requests, "max_tokens": 5})
    assert [o["token_ids"] for o in json.loads((ranks / "outputs.json").read_text())] == expected
    full = 256 * 192  # gate_proj: int8 [intermediate, hidden], split by rows
    for rank in range(world_size):
        read = json.loads((ranks / f"read_rank{rank}.json").read_text())
        assert read["model.layers.0.mlp.gate_proj.weight"] == full // world_size


def test_run_pa_quantized_at_load_still_reads_the_demo_sign(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "examples" / "models" / "qwen2_vl" / "run_pa.sh"), "--quantize", "w8a16",
                           "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Answer[0]: CAKE" in done.stdout and "w8a16 (per output channel, quantized as loaded)" in done.stderr


def _gptq_folder(kit_folder: Path, out: Path, group_size: int, checkpoint_format: str = "gptq") -> None:
    """The kit's W8A16 checkpoint `kit_folder` rewritten as AutoGPTQ / GPTQModel write an 8-bit symmetric one:
    q + 128 packed four inputs to an int32 (input 4r+j in byte j of row r), the zero point 128 packed four outputs to
    an int32 (AutoGPTQ's v1 format stores it less one), scales [groups, out] in float16, g_idx the inputs' groups."""
    shutil.copytree(kit_folder, out)
    (out / "quant_model_description.json").unlink()
    config = json.loads((out / "config.json").read_text())
    del config["quantize"]
    config["quantization_config"] = {"quant_method": "gptq", "bits": 8, "group_size": group_size, "sym": True,
                                     "desc_act": False, "checkpoint_format": checkpoint_format}
    (out / "config.json").write_text(json.dumps(config))
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None

    def as_int32(values):  # bit patterns 0..2**32-1 as the int32 safetensors holds
        return torch.where(values >= 2 ** 31, values - 2 ** 32, values).to(torch.int32).contiguous()

    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith(".weight") and n + "_scale" in tensors]:
            q, scale = tensors.pop(name), tensors.pop(name + "_scale")
            base = name[:-len("weight")]
            stored = (q.to(torch.int64) + 128).t()  # [in, out]
            tensors[base + "qweight"] = as_int32(sum(stored[j::4] << (8 * j) for j in range(4)))
            zeros = torch.full((scale.shape[1], q.shape[0]), 127 if checkpoint_format == "gptq" else 128)
            tensors[base + "qzeros"] = as_int32(sum(zeros[:, j::4] << (8 * j) for j in range(4)))
            tensors[base + "scales"] = scale.t().half().contiguous()
            tensors[base + "g_idx"] = (torch.arange(q.shape[1]) // (q.shape[1] // scale.shape[1])).to(torch.int32)
            if index is not None:
                del index["weight_map"][name], index["weight_map"][name + "_scale"]
                index["weight_map"].update({base + part: shard.name for part in ("qweight", "qzeros", "scales",
                                                                                     "g_idx")})
        save_file(tensors, shard, metadata={"format": "pt"})
    if index is not None:
        index_file.write_text(json.dumps(index))


def _scales_in_float16(folder: Path) -> None:
    """The kit checkpoint's scales rounded to float16 values, as a GPTQ checkpoint stores them."""
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        tensors.update({n: t.half().float() for n, t in tensors.items() if n.endswith("weight_scale")})
        save_file(tensors, shard, metadata={"format": "pt"})


def test_a_gptq_tensor_unpacks_byte_by_byte_to_the_int8_weight_and_its_scales():
    from atb_models.quantization import gptq_to_int8

    # Output 0's inputs 0..3 hold the bytes 0x00, 0x7F, 0x80, 0xFF (q - 128: -128, -1, 0, 127); outputs 1..3 hold 128.
    qweight = torch.tensor([[0xFF807F00 - 2 ** 32] + [0x80808080 - 2 ** 32] * 3], dtype=torch.int32)
    tensors = {"qweight": qweight, "qzeros": torch.tensor([[0x7F7F7F7F]], dtype=torch.int32),
               "scales": torch.tensor([[0.5, 1.0, 2.0, 0.25]], dtype=torch.float16),
               "g_idx": torch.zeros(4, dtype=torch.int32)}
    weight, scale = gptq_to_int8("lin", tensors, "gptq")
    assert weight.dtype == torch.int8 and weight[0].tolist() == [-128, -1, 0, 127] and not weight[1:].any()
    assert scale.dtype == torch.float32 and scale[:, 0].tolist() == [0.5, 1.0, 2.0, 0.25]
    tensors["qzeros"] = torch.tensor([[0x80808080 - 2 ** 32]], dtype=torch.int32)  # v2 stores the zero itself
    assert torch.equal(gptq_to_int8("lin", tensors, "gptq_v2")[0], weight)
    without_order = {part: t for part, t in tensors.items() if part != "g_idx"}  # (some writers leave it out)
    assert torch.equal(gptq_to_int8("lin", without_order, "gptq_v2")[0], weight)
    with pytest.raises(UserError, match="zero points other than 128"):
        gptq_to_int8("lin", tensors, "gptq")  # v1 reading a stored 128 as 129
    tensors["g_idx"] = torch.tensor([0, 1, 0, 1], dtype=torch.int32)
    tensors["scales"] = torch.ones(2, 4, dtype=torch.float16)
    tensors["qzeros"] = torch.full((2, 1), 0x80808080 - 2 ** 32, dtype=torch.int32)
    with pytest.raises(UserError, match="act-order"):
        gptq_to_int8("lin", tensors, "gptq_v2")


@pytest.mark.parametrize("group_size, checkpoint_format", [(-1, "gptq"), (32, "gptq_v2")])
def test_an_8_bit_gptq_checkpoint_loads_as_the_same_int8_model_and_gives_the_same_tokens(
        group_size, checkpoint_format, float_and_quantized, tiny_checkpoint, tmp_path, sample_image_path):
    if group_size == -1:
        float_dir, kit = float_and_quantized  # two shards: a linear's GPTQ tensors are found in theirs
    else:
        float_dir, kit = tiny_checkpoint(), tmp_path / "g32"
        assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(kit), "--group_size", "32"]) == 0
    ours = tmp_path / "kit"
    shutil.copytree(kit, ours)
    _scales_in_float16(ours)
    gptq = tmp_path / "gptq"
    _gptq_folder(ours, gptq, group_size, checkpoint_format)
    kit_llm, gptq_llm = LLM(str(ours), **OPTIONS), LLM(str(gptq), **OPTIONS)
    assert gptq_llm.quantization.gptq_format == checkpoint_format
    assert gptq_llm.quantization.group_size == (None if group_size == -1 else group_size)
    kit_params, gptq_params = (dict(e.runner.model.named_parameters()) for e in (kit_llm, gptq_llm))
    assert kit_params.keys() == gptq_params.keys()
    assert all(torch.equal(kit_params[name], gptq_params[name]) for name in kit_params)
    requests = [[{"image": str(sample_image_path)}, {"text": "What is this?"}], [{"text": "Hello there"}]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in gptq_llm.generate(requests, params)] == [
        o.token_ids for o in kit_llm.generate(requests, params)]


@pytest.mark.parametrize("change, expected", [
    ({"bits": 4}, "8-bit weights only"),
    ({"quant_method": "awq"}, "quant_method 'awq'"),
    ({"sym": False}, "asymmetric"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"group_size": 0}, "group_size must be"),
])
def test_gptq_checkpoints_the_kit_cannot_run_are_refused_in_one_line(change, expected, float_and_quantized,
                                                                     sample_image_path, tmp_path, capsys):
    from examples.models.qwen2_vl import run_pa

    gptq = tmp_path / "gptq"
    _gptq_folder(float_and_quantized[1], gptq, -1)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"].update(change)
    (gptq / "config.json").write_text(json.dumps(config))
    assert run_pa.main(["--model_path", str(gptq), "--input_image", str(sample_image_path), "--max_output_length",
                        "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error: ") and expected in err[-1] and "Traceback" not in "\n".join(err)
