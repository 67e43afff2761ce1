"""The kit's Qwen2.5-VL against transformers 4.51.3's on random tiny checkpoints that transformers itself built:
identical greedy tokens and prompt lengths, float32 logits within 1e-3.

transformers 4.51.3 lives in its own venv (atb_models.oracle; .ci/run creates it): without it these tests skip,
saying so. The kit preprocesses each request; the oracle runs transformers' model on exactly those inputs."""
import json
from pathlib import Path

import pytest
import torch

from atb_models import LLM, SamplingParams, oracle
from atb_models.benchmark.engines import reference_inputs
from atb_models.demo.checkpoint import make_image
from atb_models.models.qwen2_5_vl import window_order, window_segments
from atb_models.multimodal.rope_index import rope_index
from tests.parity_utils import LogitsRecorder

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 6
TOLERANCE = 1e-3
WINDOW_IMAGE_MAX_PIXELS = 190_000  # a 420x300 image stays 420x308: 11x15 merged tokens, 3x4 windows of 4x4


@pytest.fixture(scope="session")
def oracle_ready():
    if not oracle.venv_ready():
        pytest.skip(f"the Qwen2.5-VL oracle venv (transformers {oracle.TRANSFORMERS_VERSION}) is missing at "
                    f"{oracle.venv_dir()}: create it with `python -m atb_models.oracle venv` (.ci/run does)")


@pytest.fixture(scope="session")
def oracle_worker(oracle_ready):
    """One oracle process for the session's builds and references (the venv's imports paid once)."""
    with oracle.OracleWorker() as worker:
        yield worker


@pytest.fixture(scope="session")
def q25_checkpoint(oracle_worker, tiny_checkpoint, tmp_path_factory):
    """q25_checkpoint(**shape) -> a Qwen2.5-VL folder built by transformers 4.51.3; once per distinct shape."""
    built = {}

    def get(**shape):
        key = tuple(sorted((k, str(v)) for k, v in shape.items()))
        if key not in built:
            out = tmp_path_factory.mktemp("qwen2_5_vl")
            built[key] = oracle.build_checkpoint(tiny_checkpoint(), out, max_pixels=WINDOW_IMAGE_MAX_PIXELS,
                                                   worker=oracle_worker, **shape)
        return built[key]

    return get


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("q25_media")
    paths = {"windows": d / "windows.png", "tall": d / "tall.png", "odd": d / "odd.jpg"}
    make_image(paths["windows"], width=420, height=300, seed=5)   # spans 3x4 attention windows
    make_image(paths["tall"], width=40, height=700, seed=6)       # one window wide, many tall
    make_image(paths["odd"], width=97, height=131, seed=7)
    return {name: str(path) for name, path in paths.items()}


def make_llm(path, **kwargs):
    options = dict(dtype="float32", device="cpu", max_batch_size=4, max_input_length=1024, max_output_length=16,
                   block_size=16)
    options.update(kwargs)
    return LLM(str(path), **options)


def oracle_inputs(prompt) -> dict:
    """A kit-preprocessed prompt as transformers' generate() takes it (the benchmark's own conversion)."""
    return reference_inputs([prompt], 0, torch.device("cpu"), video_seconds=True)


def assert_matches_oracle(llm, path, requests, work_dir, worker):
    recorder = LogitsRecorder(llm)
    outputs = llm.generate(requests, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
    prompts = [llm.preprocessor(request) for request in requests]
    references = oracle.reference(path, [oracle_inputs(p) for p in prompts], MAX_NEW, work_dir, worker)
    for i, (prompt, out, (ref_tokens, ref_logits)) in enumerate(zip(prompts, outputs, references)):
        assert out.error is None, out.error
        assert out.prompt_token_count == len(prompt.token_ids)
        assert out.token_ids == ref_tokens, f"request {i}"
        ours = torch.stack(recorder.by_seq[i])
        worst = (ours - ref_logits).abs().max().item()
        assert worst < TOLERANCE, f"request {i}: logits differ by {worst}"
    return outputs


def test_text_and_a_window_spanning_image_match_transformers(q25_checkpoint, oracle_worker, media, tmp_path):
    path = q25_checkpoint()
    llm = make_llm(path)
    image = llm.preprocessor([{"image": media["windows"]}]).visuals[0]
    assert image.grid_thw == (1, 22, 30)  # 11x15 merged tokens: windows of 4x4 with partial ones at the edges
    assert_matches_oracle(llm, path, [
        [{"text": "Hello, what colour is the sky?"}],
        [{"image": media["windows"]}, {"text": "What is in the picture?"}],
    ], tmp_path, oracle_worker)


def test_two_images_a_tall_thin_one_and_videos_match_transformers(q25_checkpoint, oracle_worker, media, sample_frames,
                                                                   sample_video_path, tmp_path):
    path = q25_checkpoint()
    frames = [str(f) for f in sample_frames]
    assert_matches_oracle(make_llm(path), path, [
        [{"image": media["windows"]}, {"text": "Compare"}, {"image": media["odd"]}, {"text": "these two."}],
        [{"image": media["tall"]}, {"text": "Read it."}],
        [{"video": frames}, {"text": "What happens in this video?"}],                 # 2 fps: qwen-vl-utils' rule
        [{"video": frames + frames, "fps": 0.5}, {"image": media["odd"]}, {"text": "Describe both."}],
        [{"video": str(sample_video_path)}, {"text": "And this clip?"}],                # a file: --video_fps
    ], tmp_path, oracle_worker)


def test_tied_embeddings_and_the_released_mrope_config_form_match_transformers(q25_checkpoint, oracle_worker, media,
                                                                              tmp_path):
    # 8 query heads on 2 key/value heads (3B's ratio), the head tied to the embedding (as 3B's), and rope_scaling
    # written {"type": "mrope", ...} as the released configs have it.
    path = q25_checkpoint(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, rope_form="mrope",
                          fullatt_block_indexes=[0, 2], vision_depth=3)
    llm = make_llm(path)
    assert llm.runner.model.tie_word_embeddings
    assert_matches_oracle(llm, path, [[{"image": media["windows"]}, {"text": "What is this?"}]], tmp_path,
                          oracle_worker)


def test_window_order_matters_full_attention_everywhere_changes_the_tokens(q25_checkpoint, oracle_worker, media,
                                                                            tmp_path):
    path = q25_checkpoint()
    llm = make_llm(path)
    request = [{"image": media["windows"]}, {"text": "What is in the picture?"}]
    inputs = oracle_inputs(llm.preprocessor(request))
    (windowed, _), (full, _) = oracle.reference(path, [inputs, dict(inputs, full_attention=True)], MAX_NEW, tmp_path,
                                                  oracle_worker)
    assert windowed != full, "the checkpoint's vision attention is too flat for window order to show"
    # The kit's tower with every block over the whole image gives transformers' full-attention tokens.
    llm.runner.model.visual.full_attention_blocks = frozenset(range(len(llm.runner.model.visual.blocks)))
    assert llm.generate([request], SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))[0].token_ids == full


def test_window_order_lists_each_window_whole_and_never_mixes_images():
    # One 1x(4x6 merged) image and one 1x(2x2) image, windows of 2x2 merged units.
    order, lengths = window_order([(1, 8, 12), (1, 4, 4)], spatial_merge_size=2, window_merged=2)
    assert lengths == [4, 4, 4, 4, 4, 4, 4]
    assert order[:4].tolist() == [0, 1, 6, 7]          # the first window: rows 0-1, columns 0-1 of the first image
    assert sorted(order[24:].tolist()) == [24, 25, 26, 27]  # the second image's one window, after the first's
    assert sorted(order.tolist()) == list(range(28))
    # Partial windows at the right and bottom edges.
    _, lengths = window_order([(2, 6, 10)], spatial_merge_size=2, window_merged=2)
    assert lengths == [4, 4, 2, 2, 2, 1] * 2
    assert window_segments([4, 4, 2, 2, 2, 1], unit=4) == [(0, 2, 16), (32, 3, 8), (56, 1, 4)]


def test_video_positions_follow_absolute_time_at_the_sampled_frame_rate():
    # A video block of 3 grid steps of 1x1 merged tokens after one text token: temporal position
    # int(step * seconds_per_grid * tokens_per_second).
    ids = [1, 9, 7, 7, 7, 2]  # text, vision_start, 3 video tokens, text
    common = dict(image_token_id=6, video_token_id=7, vision_start_token_id=9, spatial_merge_size=2)
    grids = [(3, 2, 2)]
    at_half_fps, _ = rope_index(ids, None, grids, video_seconds_per_grid=[2 / 0.5], tokens_per_second=2, **common)
    at_two_fps, _ = rope_index(ids, None, grids, video_seconds_per_grid=[2 / 2.0], tokens_per_second=2, **common)
    assert at_half_fps[0, 2:5].tolist() == [2, 10, 18]   # 0, 4 and 8 s at 2 tokens a second, after 2 tokens
    assert at_two_fps[0, 2:5].tolist() == [2, 4, 6]
    assert at_half_fps[0, 5].item() == 19 and at_two_fps[0, 5].item() == 7
    qwen2, _ = rope_index(ids, None, grids, **common)     # Qwen2-VL: grid steps count one apart
    assert qwen2[0, 2:5].tolist() == [2, 3, 4]


def test_frame_lists_default_to_two_frames_a_second_and_an_item_fps_reaches_the_positions(q25_checkpoint,
                                                                                         sample_frames, caplog):
    llm = make_llm(q25_checkpoint())
    frames = [str(f) for f in sample_frames]
    with caplog.at_level("DEBUG", logger="atb_models"):
        default = llm.preprocessor([{"video": frames}, {"text": "x"}])
    assert "<video: 4 frames>: 4 frames at 2 fps, 1 s per temporal grid step" in caplog.text
    slow = llm.preprocessor([{"video": frames, "fps": 0.5}, {"text": "x"}])
    assert default.visuals[0].seconds_per_grid == 1.0 and slow.visuals[0].seconds_per_grid == 4.0
    assert default.token_ids == slow.token_ids
    assert not torch.equal(default.positions, slow.positions)
    rows = torch.tensor(default.token_ids) == llm.runner.model.config.video_token_id

    def temporal_steps(prompt):
        t = prompt.positions[0, rows]
        return sorted(set((t - t.min()).tolist()))

    # Two grid steps (4 frames), tokens_per_second 2: 1 s apart at 2 fps, 4 s apart at 0.5 fps.
    assert temporal_steps(default) == [0, 2] and temporal_steps(slow) == [0, 8]


# Qwen2.5-VL-3B's 16 query heads on 2 key/value heads (head_dim 8 to stay tiny): at 4 ranks each KV head is
# replicated on two ranks.
SHAPE_3B_HEADS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=16, num_key_value_heads=2,
                      tie_word_embeddings=True)


# 72B's 64 query heads on 8 key/value heads, at 8 ranks.
SHAPE_72B_HEADS = dict(hidden_size=512, intermediate_size=256, num_attention_heads=64, num_key_value_heads=8)


@pytest.fixture(scope="module")
def one_rank_outputs(oracle_worker, tmp_path_factory):
    """one_rank_outputs(path, requests) -> the kit's outputs at one rank, checked against transformers once per
    checkpoint and requests: the tests at several world sizes compare their ranks with the same ones."""
    checked = {}

    def get(path, requests):
        key = (str(path), json.dumps(requests))
        if key not in checked:
            checked[key] = assert_matches_oracle(make_llm(path), path, requests, tmp_path_factory.mktemp("oracle"),
                                                 oracle_worker)
        return checked[key]

    return get


@pytest.mark.parametrize("shape,world_size", [
    pytest.param(SHAPE_3B_HEADS, 2, id="3b_at_two_ranks"),
    pytest.param(SHAPE_3B_HEADS, 4, id="3b_at_four_ranks"),  # the 2 and 4 ranks stay in the default run
    pytest.param(SHAPE_72B_HEADS, 8, id="72b_at_eight_ranks", marks=pytest.mark.slow),
])
def test_tensor_parallel_ranks_give_the_tokens_of_one_rank(q25_checkpoint, one_rank_outputs, media, sample_frames,
                                                            tmp_path, shape, world_size):
    from tests.test_tensor_parallel import run_ranks

    path = q25_checkpoint(**shape)
    requests = [
        [{"image": media["windows"]}, {"text": "What is in the picture?"}],
        [{"video": [str(f) for f in sample_frames]}, {"image": media["odd"]}, {"text": "Describe both."}],
        [{"text": "Hello, what colour is the sky?"}],
    ]
    one_rank = one_rank_outputs(path, requests)
    out = run_ranks(tmp_path, world_size, {"model": str(path), "requests": requests, "max_tokens": MAX_NEW})
    per_rank = [json.loads((out / f"tokens_rank{r}.json").read_text()) for r in range(world_size)]
    assert all(tokens == [o.token_ids for o in one_rank] for tokens in per_rank)


def test_run_pa_sh_runs_a_checkpoint_on_an_image_and_a_video_and_refuses_bad_input_as_for_qwen2_vl(
        q25_checkpoint, media, sample_video_path, tmp_path):
    import os
    import subprocess
    import sys

    from tests.test_run_pa import COMMON_ARGS, assert_answers, assert_no_traceback, error_lines

    def run_pa(*args):
        return subprocess.run(["bash", str(ROOT / "examples" / "models" / "qwen2_5_vl" / "run_pa.sh"), *COMMON_ARGS,
                               *map(str, args)], cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable},
                              capture_output=True, text=True, timeout=300)

    path = q25_checkpoint()
    result = run_pa("--model_path", path, "--input_image", media["windows"], "--input_image", sample_video_path,
                    "--max_batch_size", "1", "--max_input_length", "1024")
    assert result.returncode == 0, result.stderr
    assert_answers(result.stdout, 1)
    assert f"<image: {media['windows']}> <video: {sample_video_path}>" in result.stdout
    assert_no_traceback(result)
    missing = run_pa("--model_path", path, "--input_image", tmp_path / "nowhere.jpg")
    assert missing.returncode == 1 and error_lines(missing) == [f"Error: image file not found: {tmp_path}/nowhere.jpg"]
    assert_no_traceback(missing)


@pytest.mark.parametrize("native_bf16", [False, True], ids=["no_bf16", "native_bf16"])
def test_vision_tower_is_float32_where_bf16_is_not_native_and_bf16_where_it_is(q25_checkpoint, gpu_policy_on_cpu,
                                                                               native_bf16):
    from safetensors import safe_open

    gpu_policy_on_cpu(native_bf16=native_bf16)
    path = q25_checkpoint()
    visual = make_llm(path, dtype="auto").runner.model.visual
    expected = torch.bfloat16 if native_bf16 else torch.float32
    names = {name for name, _ in visual.named_parameters()}
    for part in ("patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.norm2.weight",
                 "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
                 "blocks.0.mlp.gate_up_proj.weight", "blocks.0.mlp.down_proj.weight", "merger.ln_q.weight",
                 "merger.mlp.0.weight", "merger.mlp.2.weight"):
        assert part in names
    assert {name: p.dtype for name, p in visual.named_parameters()} == dict.fromkeys(names, expected)
    with safe_open(str(path / "model.safetensors"), framework="pt") as stored:
        qkv = stored.get_tensor("visual.blocks.0.attn.qkv.weight")
    assert qkv.dtype == torch.bfloat16
    assert torch.equal(visual.blocks[0].attn.qkv.weight, qkv.to(expected))


def test_modeltest_harness_runs_textvqa_on_a_qwen2_5_vl_checkpoint_with_both_backends(q25_checkpoint, media,
                                                                                        tmp_path):
    """`mm_run.sh textvqa qwen2_5_vl` with the kit (pa) and with transformers (hf, in the reference venv's worker):
    every sample answered, and the two answer alike."""
    import csv
    import os
    import subprocess
    import sys

    harness = ROOT / "tests" / "modeltest"
    lines = [{"image": media["windows"], "question": "what is this?", "question_id": 1},
             {"image": media["odd"], "question": "which colour?", "question_id": 2}]
    (tmp_path / "textvqa_val.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    annotations = [{"question_id": line["question_id"], "answers": [{"answer": "zzz"}] * 10} for line in lines]
    (tmp_path / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": annotations}))
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(harness), os.environ.get("PYTHONPATH", "")])}
    answers = {}
    for backend in ("pa", "hf"):
        out = tmp_path / f"out_{backend}"
        done = subprocess.run(["bash", str(harness / "scripts" / "mm_run.sh"), "textvqa", "qwen2_5_vl",
                               "--world_size", "1", "--backend", backend, "--device", "cpu", "--dtype", "float32",
                               "--max_output_length", "4", "--model_path", str(q25_checkpoint()),
                               "--dataset_path", str(tmp_path / "textvqa_val.jsonl"), "--output_dir", str(out)],
                              cwd=harness, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        [result_csv] = out.glob("*/modeltest/qwen2_5_vl/precision_result/results/**/*_result.csv")
        with open(result_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows[-1]["Total"] == "2" and rows[-1]["Failed"] == "0"
        [samples] = out.glob("*/modeltest/qwen2_5_vl/precision_result/**/*_debug_*.jsonl")
        records = [json.loads(line) for line in samples.read_text().splitlines()]
        answers[backend] = [(r["question_id"], r["answer"], r["output_tokens"]) for r in records]
    assert answers["pa"] == answers["hf"] and len(answers["pa"]) == 2


def test_without_transformers_qwen2_5_vl_the_reference_is_one_user_error():
    import transformers

    from atb_models import UserError
    from atb_models.models import model_family

    family = model_family("qwen2_5_vl")
    if hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has Qwen2.5-VL")
    with pytest.raises(UserError, match=r"has no Qwen2_5_VLForConditionalGeneration: comparing Qwen2.5-VL"):
        family.reference_class()


def test_a_failed_job_of_the_oracle_worker_says_why_and_the_worker_goes_on(oracle_worker, tiny_checkpoint,
                                                                           tmp_path):
    with pytest.raises(RuntimeError, match=r"oracle failed \(build\):(.|\n)*unknown shape keys \['hidden_sizes'\]"):
        oracle.build_checkpoint(tiny_checkpoint(), tmp_path / "bad", worker=oracle_worker, hidden_sizes=64)
    with pytest.raises(RuntimeError, match=r"oracle failed \(reference\)"):
        oracle.reference(tmp_path / "nowhere", [], MAX_NEW, tmp_path, oracle_worker)
    built = oracle.build_checkpoint(tiny_checkpoint(), tmp_path / "good", worker=oracle_worker, vision_depth=2)
    assert json.loads((built / "config.json").read_text())["vision_config"]["depth"] == 2


@pytest.mark.slow
def test_a_reference_worker_that_cannot_load_the_folder_is_one_user_error_and_leaves_no_process(q25_checkpoint,
                                                                                                tmp_path):
    import shutil

    from atb_models import UserError
    from atb_models.benchmark.engines import open_reference
    from atb_models.config import load_model_config
    from atb_models.platform import resolve_plan

    broken = tmp_path / "broken"
    shutil.copytree(q25_checkpoint(), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    model_config = load_model_config(str(broken))
    with pytest.raises(UserError, match=r"^the reference model failed: cannot load .*broken"):
        open_reference(model_config, resolve_plan("cpu", "float32", model_config.torch_dtype))
    import subprocess

    workers = subprocess.run(["pgrep", "-f", f"worker.py serve .*{broken}"], capture_output=True, text=True)
    assert workers.stdout == ""


@pytest.mark.slow
def test_benchmark_compare_takes_a_qwen2_5_vl_checkpoint(q25_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATB_MODELS_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "atb_models.benchmark", "compare", "--preset", "tiny", "--model_path",
                           str(q25_checkpoint()), "--workloads", "single,decode", "--repeats", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "reference: transformers Qwen2_5_VLForConditionalGeneration (transformers 4.51.3" in done.stdout
    assert "single: kit and transformers tokens identical" in done.stdout
    figures = [line.split(":")[0] for line in done.stdout.strip().splitlines()[-3:]]
    assert figures == ["speedup_vs_hf[single]", "decode_vs_floor[bs1]", "decode_vs_floor[bs16]"]


def test_a_quantized_qwen2_5_vl_keeps_its_vision_tower_float_and_matches_quantizing_at_load(q25_checkpoint, media,
                                                                                             tmp_path):
    from atb_models.quantize import main as quantize_main

    path = q25_checkpoint()
    out = tmp_path / "w8a16"
    assert quantize_main(["--model_path", str(path), "--output_dir", str(out)]) == 0
    saved, at_load = make_llm(out), make_llm(path, quantize="w8a16")
    params = dict(saved.runner.model.named_parameters())
    int8 = sorted(name for name, p in params.items() if p.dtype == torch.int8)
    assert int8 and all(name.startswith("model.layers.") for name in int8)
    assert all(p.dtype == torch.float32 for name, p in params.items() if name.startswith("visual."))
    request = [[{"image": media["windows"]}, {"text": "What is in the picture?"}]]
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    assert saved.generate(request, params)[0].token_ids == at_load.generate(request, params)[0].token_ids
