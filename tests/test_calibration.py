"""Calibrated W8A16 (`python -m atb_models.quantize --algorithm gptq`): GPTQ's rounding against round-to-nearest,
the Hessians the calibration pass measures, the tool's calibrated output and its refusals."""
from __future__ import annotations

import json

import pytest
import torch

from atb_models import LLM, SamplingParams
from atb_models.calibration import Hessians, gptq_quantize, module_of, passes
from atb_models.kernels.w8a16 import QMAX, dequantize, quantize
from atb_models.quantize import main as quantize_main

OPTIONS = dict(dtype="float32", device="cpu", max_batch_size=2, max_input_length=512, max_output_length=8,
               block_size=16)


def output_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, h: torch.Tensor) -> float:
    """sum over rows of e^T H e: the squared error the rounding puts on the linear's outputs."""
    e = w - dequantize(q, scale)
    return torch.einsum("oi,ij,oj->", e.double(), h.double(), e.double()).item()


@pytest.mark.parametrize("group_size", [None, 32])
def test_with_a_diagonal_hessian_gptq_is_round_to_nearest(group_size):
    w = torch.randn(48, 128)
    q, scale = gptq_quantize(w, torch.diag(torch.rand(128) + 0.5), group_size)
    expected_q, expected_scale = quantize(w, group_size)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)


@pytest.mark.parametrize("group_size", [None, 64])
def test_gptq_puts_less_error_on_the_outputs_of_correlated_inputs(group_size):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=generator)
    directions = torch.randn(16, 256, generator=generator)

    def activations():  # a few strong shared directions, as a layer's inputs have, and some noise
        return (torch.randn(512, 16, generator=generator) @ directions * 3
                + torch.randn(512, 256, generator=generator) * 0.3)

    x = activations()
    h = x.T @ x / x.shape[0]
    q, scale = gptq_quantize(w, h, group_size)
    rtn_q, rtn_scale = quantize(w, group_size)
    assert q.dtype == torch.int8 and q.abs().max().item() <= QMAX and scale.shape == rtn_scale.shape
    assert output_error(w, q, scale, h) < 0.5 * output_error(w, rtn_q, rtn_scale, h)
    held = activations()  # a held-out draw from the same distribution gains too
    assert output_error(w, q, scale, held.T @ held) < 0.7 * output_error(w, rtn_q, rtn_scale, held.T @ held)


def test_gptq_rounds_an_input_that_never_fires_to_zero_and_still_inverts():
    w = torch.randn(8, 64)
    x = torch.randn(100, 64)
    x[:, 5] = 0
    q, _ = gptq_quantize(w, x.T @ x)
    assert (q[:, 5] == 0).all() and (q[:, 4] != 0).any()


def test_the_hooks_add_each_input_outer_product_over_every_position():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    hooks = Hessians(model, ["0", "1"])
    a, b = torch.randn(2, 5, 4), torch.randn(7, 4)
    model(a), model(b)
    hooks.remove()
    rows = torch.cat([a.reshape(-1, 4), b])
    assert hooks.rows["0"] == 17
    assert torch.allclose(hooks.mean("0"), rows.T @ rows / 17, atol=1e-5)
    model(b)  # removed: counts nothing more
    assert hooks.rows["1"] == 17


def test_checkpoint_weights_map_to_the_packed_module_that_reads_their_input():
    assert module_of("model.layers.3.self_attn.k_proj.weight") == "model.layers.3.self_attn.qkv_proj"
    assert module_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_up_proj"
    assert module_of("model.layers.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj"
    assert module_of("lm_head.weight") == "lm_head"


def test_layers_go_in_passes_whose_hessians_fit_the_budget():
    sizes = {"a": 10, "b": 10, "c": 20, "d": 5}  # float32 bytes: 400, 400, 1600, 100
    assert passes(list(sizes), sizes, budget=1000) == [["a", "b"], ["c"], ["d"]]
    assert passes(list(sizes), sizes, budget=10 ** 6) == [list(sizes)]


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    """The tool's gptq output of a tiny checkpoint, calibrated on a folder of two pictures (the built-in set runs in
    the slow compare test), and its rtn output."""
    from atb_models.demo.checkpoint import make_image

    float_dir = tiny_checkpoint()
    root = tmp_path_factory.mktemp("gptq")
    pictures = root / "pictures"
    pictures.mkdir()
    for seed in range(2):
        make_image(pictures / f"{seed}.png", width=84, height=56, seed=seed)
    (pictures / ".hidden").write_text("skipped, as run_pa's dataset mode skips it")
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(root / "gptq"), "--algorithm", "gptq",
                          "--calib_data", str(pictures), "--calib_tokens", "8"]) == 0
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(root / "rtn")]) == 0
    return float_dir, root / "gptq", root / "rtn"


def test_the_calibrated_checkpoint_keeps_rtns_scales_and_loads_and_runs(calibrated, sample_image_path):
    float_dir, gptq, rtn = calibrated
    description = json.loads((gptq / "quant_model_description.json").read_text())
    assert description["algorithm"] == "gptq" and description["model.layers.0.mlp.down_proj.weight"] == "W8A16"
    gptq_llm, rtn_llm = LLM(str(gptq), **OPTIONS), LLM(str(rtn), **OPTIONS)
    ours, theirs = dict(gptq_llm.runner.model.named_parameters()), dict(rtn_llm.runner.model.named_parameters())
    # Per-channel scales come from the untouched rows; the int8 values are GPTQ's own.
    assert torch.equal(ours["model.layers.1.mlp.down_proj.weight_scale"],
                       theirs["model.layers.1.mlp.down_proj.weight_scale"])
    assert not torch.equal(ours["model.layers.1.mlp.down_proj.weight"], theirs["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])
    out = gptq_llm.generate([[{"image": str(sample_image_path)}, {"text": "What is this?"}]],
                            SamplingParams(max_tokens=4, ignore_eos=True))
    assert out[0].error is None and len(out[0].token_ids) == 4


@pytest.mark.parametrize("case", ["calib_flag_without_gptq", "no_calib_folder", "calib_folder_without_media",
                                  "zero_tokens"])
def test_calibration_refusals_are_one_line_before_anything_is_written(case, calibrated, tmp_path, capsys):
    float_dir = calibrated[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a picture")
    flags, expected = {
        "calib_flag_without_gptq": (["--calib_tokens", "4"], "rtn uses no data"),
        "no_calib_folder": (["--algorithm", "gptq", "--calib_data", str(tmp_path / "nowhere")], "no such folder"),
        "calib_folder_without_media": (["--algorithm", "gptq", "--calib_data", str(empty)], "--calib_data"),
        "zero_tokens": (["--algorithm", "gptq", "--calib_tokens", "0"], "at least 1"),
    }[case]
    out = tmp_path / "out"
    assert quantize_main(["--model_path", str(float_dir), "--output_dir", str(out), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error: ") and expected in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "staging" in p.name]
