"""The tiny checkpoint builder: what it writes must load and read like a released Qwen2-VL-Instruct checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from atb_models.demo.__main__ import main as demo_main
from atb_models.demo.checkpoint import SPECIAL_TOKENS, TinyShape, build_checkpoint
from atb_models.multimodal.media import count_video_frames
from atb_models.errors import UserError

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def saved_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the checkpoint's safetensors files, by the name it is stored under."""
    tensors = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def test_classic_checkpoint_loads_in_transformers_with_the_saved_weights(tiny_checkpoint):
    checkpoint = tiny_checkpoint()
    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, torch_dtype=torch.bfloat16)
    on_disk = saved_tensors(checkpoint)
    loaded = model.state_dict()
    assert set(on_disk) == set(loaded)
    for name, tensor in on_disk.items():
        assert torch.equal(loaded[name], tensor), name


def test_processor_loads_as_qwen2vl_with_a_fast_tokenizer_and_the_pixel_limits(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint())
    assert isinstance(processor, Qwen2VLProcessor)
    assert processor.tokenizer.is_fast
    image_processor = processor.image_processor
    assert (image_processor.min_pixels, image_processor.max_pixels) == (56 * 56, 28 * 28 * 64)
    assert (image_processor.patch_size, image_processor.temporal_patch_size, image_processor.merge_size) == (14, 2, 2)


def test_random_model_predicts_varied_decodable_tokens(tiny_checkpoint, sample_image_path):
    checkpoint = tiny_checkpoint()
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, torch_dtype=torch.float32)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.open(sample_image_path)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    predicted = logits.argmax(-1)
    assert len(set(predicted.tolist())) > len(predicted) // 4
    assert predicted.max() < len(processor.tokenizer), "padding rows of the vocabulary must never win"


def nested_name(classic_name: str) -> str:
    if classic_name.startswith("model."):
        return "model.language_model." + classic_name.removeprefix("model.")
    if classic_name.startswith("visual."):
        return "model." + classic_name
    return classic_name


def test_nested_layout_moves_language_model_and_vision_tower_under_model(tiny_checkpoint):
    classic = saved_tensors(tiny_checkpoint())
    nested = saved_tensors(tiny_checkpoint(layout="nested"))
    assert {nested_name(name) for name in classic} == set(nested)
    assert "lm_head.weight" in nested and "model.visual.patch_embed.proj.weight" in nested
    assert all(torch.equal(nested[nested_name(name)], tensor) for name, tensor in classic.items())


def test_sharded_nested_layout_indexes_every_tensor_in_its_file(tiny_checkpoint):
    checkpoint = tiny_checkpoint(layout="nested", shards=2)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {nested_name(name) for name in saved_tensors(tiny_checkpoint())}
    files = set(index["weight_map"].values())
    assert files == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    for file in files:
        with safe_open(checkpoint / file, framework="pt") as handle:
            assert set(handle.keys()) == {name for name, owner in index["weight_map"].items() if owner == file}
    stored_bytes = sum(tensor.numel() * tensor.element_size() for tensor in saved_tensors(checkpoint).values())
    assert index["metadata"]["total_size"] == stored_bytes


def test_sharded_classic_checkpoint_loads_in_transformers_like_the_single_file(tiny_checkpoint):
    sharded = tiny_checkpoint(shards=3)
    assert len(list(sharded.glob("model-0000?-of-00003.safetensors"))) == 3
    model = Qwen2VLForConditionalGeneration.from_pretrained(sharded, torch_dtype=torch.bfloat16)
    single = saved_tensors(tiny_checkpoint())
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in single.items())


def test_tied_embeddings_store_no_lm_head_and_load_tied(tiny_checkpoint):
    checkpoint = tiny_checkpoint(shape=TinyShape(num_key_value_heads=4, tie_word_embeddings=True))
    assert "lm_head.weight" not in saved_tensors(checkpoint)
    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.num_key_value_heads == 4


def test_chat_template_renders_image_and_text_request(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        DEFAULT_SYSTEM
        + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n"
        + "<|im_start|>assistant\n"
    )


def test_chat_template_renders_text_only_request_with_default_system_prompt(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint())
    messages = [{"role": "user", "content": "Say hello."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == DEFAULT_SYSTEM + "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_keeps_a_given_system_prompt_and_omits_generation_prompt_when_not_asked(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_processor_chat_template_numbers_pictures_and_videos_with_add_vision_id(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint())
    content = [{"type": "image"}, {"type": "video"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], add_vision_id=True)
    assert rendered == (
        DEFAULT_SYSTEM
        + "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        + "Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        + "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Compare.<|im_end|>\n"
    )


def test_config_token_ids_are_the_tokenizers(tiny_checkpoint):
    checkpoint = tiny_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    token_id = tokenizer.convert_tokens_to_ids
    assert config["bos_token_id"] == config["pad_token_id"] == token_id("<|endoftext|>")
    assert config["eos_token_id"] == token_id("<|im_end|>") == tokenizer.eos_token_id
    assert config["vision_start_token_id"] == token_id("<|vision_start|>")
    assert config["vision_end_token_id"] == token_id("<|vision_end|>")
    assert config["vision_token_id"] == token_id("<|vision_pad|>")
    assert config["image_token_id"] == token_id("<|image_pad|>")
    assert config["video_token_id"] == token_id("<|video_pad|>")
    assert generation["eos_token_id"] == [token_id("<|im_end|>"), token_id("<|endoftext|>")]
    assert generation["do_sample"] is False


def test_special_tokens_follow_the_learned_vocabulary_in_qwen2_order(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint())
    first = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[0])
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(first, first + len(SPECIAL_TOKENS)))
    assert first + len(SPECIAL_TOKENS) == len(tokenizer)


def test_config_reads_like_a_released_one(tiny_checkpoint):
    config = json.loads((tiny_checkpoint() / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint())
    assert config["vocab_size"] % 64 == 0 and 0 <= config["vocab_size"] - len(tokenizer) < 64
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert config["vision_config"]["hidden_size"] == config["hidden_size"]
    assert config["vision_config"]["patch_size"] == 14


@pytest.mark.parametrize(
    "text",
    [
        "What is in the picture? Describe this video.",
        "Zebras quietly jump over 42 fences!",  # words the corpus never saw
        "naïve café, 你好\n\n\tend  ",  # bytes outside the corpus, newlines, trailing spaces
    ],
)
def test_tokenizer_round_trips_plain_text(tiny_checkpoint, text):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint())
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_weights_are_saved_in_bfloat16(tiny_checkpoint):
    checkpoint = tiny_checkpoint()
    assert {tensor.dtype for tensor in saved_tensors(checkpoint).values()} == {torch.bfloat16}
    assert json.loads((checkpoint / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_same_seed_gives_identical_files_and_another_seed_other_weights(tiny_checkpoint, tmp_path):
    first = tiny_checkpoint()
    again = build_checkpoint(tmp_path / "again")
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    other = tiny_checkpoint(seed=1)
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_norm_scales_are_near_one_and_biases_are_not_zero(tiny_checkpoint):
    tensors = saved_tensors(tiny_checkpoint())
    norm = tensors["model.norm.weight"].float()
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.01
    assert tensors["model.layers.0.self_attn.q_proj.bias"].float().abs().sum() > 0


def test_default_mrope_section_keeps_qwen2_vl_proportions():
    assert TinyShape().mrope_section == (2, 3, 3)
    assert TinyShape(hidden_size=128).mrope_section == (4, 6, 6)  # head_dim 32, like [16, 24, 24] / 4
    assert TinyShape(mrope_section=[4, 2, 2]).mrope_section == (4, 2, 2)
    with pytest.raises(ValueError):
        TinyShape(mrope_section=(2, 2, 2))


def test_make_video_reads_back_with_the_requested_frame_count(sample_video_path):
    assert count_video_frames(sample_video_path) == 8
    capture = cv2.VideoCapture(str(sample_video_path))
    size = (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    assert size == (160, 120) and fps == pytest.approx(2.0)


def test_make_frames_writes_distinct_pngs_in_order(sample_frames):
    assert [path.name for path in sample_frames] == [f"frame_{index:03d}.png" for index in range(4)]
    pictures = [Image.open(path) for path in sample_frames]
    assert all(picture.size == (160, 120) and picture.mode == "RGB" for picture in pictures)
    assert pictures[0].tobytes() != pictures[1].tobytes()


def test_sample_image_is_rgb_of_the_requested_size(sample_image_path):
    picture = Image.open(sample_image_path)
    assert picture.size == (320, 240) and picture.mode == "RGB"


def test_build_checkpoint_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        build_checkpoint(tmp_path)


def test_demo_cli_builds_and_rebuilds_in_place(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert demo_main(["build", "--output", str(out_dir)]) == 0
    assert demo_main(["build", "--output", str(out_dir), "--seed", "1"]) == 0
    assert "random" in capsys.readouterr().out
    assert Image.open(out_dir / "sample.jpg").size == (320, 240)
    assert count_video_frames(out_dir / "sample.mp4") > 0
    assert "random" in (out_dir / "README.md").read_text()
    Qwen2VLForConditionalGeneration.from_pretrained(out_dir)


def test_demo_cli_refuses_to_overwrite_a_folder_it_did_not_build(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert demo_main(["build", "--output", str(tmp_path)]) == 1
    assert "refusing" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_cli_refuses_a_file_or_a_path_under_one_in_one_line(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for output in (notes, notes / "demo"):
        assert demo_main(["build", "--output", str(output)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("Error: --output ") and err.count("\n") == 1, err
    assert notes.read_text() == "mine"
