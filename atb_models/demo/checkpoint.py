"""Tiny random Qwen2-VL checkpoints and sample media, built locally with transformers' own classes.

The weights are random: these checkpoints exercise loading, shapes, the chat format and parity with the
reference implementation, never the quality of an answer. Nothing here is downloaded.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2RMSNorm

from atb_models.errors import UserError
from atb_models.layers.sharding import ceil_div
from atb_models.multimodal.media import count_video_frames

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL's special tokens, in the order they follow the learned vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template shipped with Qwen2-VL-Instruct checkpoints, unchanged.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Enough English for a few hundred merges, with the words the demo prompts use.
CORPUS = """\
What is in the picture? Describe this video. Describe this image in one sentence.
What colour is the car? The car is red. The sky is blue and the grass is green.
Colours: red, green, blue, yellow, orange, purple, pink, brown, black, white and grey.
Is there a cat in the picture? There is a small cat sitting on a wooden table near the window.
A dog runs across the field while two children play with a yellow ball.
The video shows a person walking along the street at night. The lights are bright.
How many people are in the image? I can see three people standing in front of a house.
Please answer the question briefly. Explain your answer step by step.
Read the text in the image and tell me what it says.
The picture shows a red square, a green circle and a blue triangle on a white background.
A train moves slowly through the city; the buildings are tall and the windows shine in the sun.
Where was this photo taken? It looks like a beach with sand, water, and a few boats.
What happens at the end of the video? The man opens the door and leaves the room.
Compare the first frame with the last frame. What has changed between them?
You are a helpful assistant. Thank you for your question. Here is a short description.
The numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 appear on the sign.
Count the objects: one apple, two bananas, three oranges, four cups and five plates.
The weather is sunny today, but tomorrow it will rain and the wind will be cold.
She reads a book in the garden under a large tree with green leaves and pink flowers.
The chart has a line that goes up, then down, then up again; the title is at the top.
Left, right, top, bottom, centre, corner, edge, above, below, inside, outside, next to.
It's a photo of a kitchen. There's a kettle, a pan, and a bowl of fruit on the counter.
They're walking to the station because the bus didn't come. We'll wait here; I'm not sure.
Describe the scene: a mountain lake at sunrise, with mist over the water and birds in the sky.
"""

README_TITLE = "# Tiny random Qwen2-VL checkpoint"

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _default_mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like Qwen2-VL's [16, 24, 24] of 64."""
    half = head_dim // 2
    temporal = round(half * 16 / 64)
    height = (half - temporal) // 2
    return temporal, height, half - temporal - height


@dataclass(frozen=True)
class TinyShape:
    """Sizes of a tiny Qwen2-VL; everything not here stays at Qwen2-VL's own values (patch 14, merge 2, ...)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_num_heads: int = 2
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    max_position_embeddings: int = 4096
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    mrope_section: tuple[int, ...] | None = None
    vocab_size: int | None = None  # None: the tokenizer's size rounded up to 64; larger for real-size LM heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads, "
                f"and those into {self.num_key_value_heads} key/value groups"
            )
        if self.vision_embed_dim % self.vision_num_heads:
            raise ValueError(f"vision_embed_dim {self.vision_embed_dim} must split into {self.vision_num_heads} heads")
        if not isinstance(getattr(torch, self.torch_dtype, None), torch.dtype):
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not a torch dtype")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        section = _default_mrope_section(self.head_dim) if self.mrope_section is None else tuple(self.mrope_section)
        if len(section) != 3 or sum(section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {section} must be 3 parts summing to head_dim/2 = {self.head_dim // 2}")
        object.__setattr__(self, "mrope_section", section)  # frozen: set once, here

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def build_tokenizer(
    out_dir: str | Path, model_max_length: int = 32768, extra_corpus: str = "", vocab_size: int = 512
) -> Tokenizer:
    """Train a small byte-level BPE like Qwen2's, save tokenizer.json, tokenizer_config.json, chat_template.json.

    extra_corpus is learned beside CORPUS: a word it repeats often enough becomes one token.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    every_byte = pre_tokenizers.ByteLevel.alphabet()  # so any text encodes, whatever the corpus lacked
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=every_byte, show_progress=False)
    tokenizer.train_from_iterator((CORPUS + extra_corpus).splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in SPECIAL_TOKENS])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    added_tokens_decoder = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    # The processor reads its template from its own file, as with the real Instruct checkpoints.
    _write_json(out_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return tokenizer


def build_checkpoint(
    out_dir: str | Path,
    shape: TinyShape = TinyShape(),
    seed: int = 0,
    layout: str = "classic",
    shards: int = 1,
    image_min_pixels: int = 56 * 56,
    image_max_pixels: int = 28 * 28 * 64,
) -> Path:
    """Write a random Qwen2-VL checkpoint that transformers loads: config, weights, tokenizer, processor config.

    layout "classic" names tensors as transformers 4.46 does (model.*, visual.*, lm_head.*); "nested" as newer
    releases do (model.language_model.*, model.visual.*, lm_head.*). shards > 1 splits the weights over several
    files with a model.safetensors.index.json.
    """
    if layout not in ("classic", "nested"):
        raise UserError(f"layout must be 'classic' or 'nested', not {layout!r}")
    if shards < 1:
        raise UserError(f"shards must be at least 1, not {shards}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty; build a checkpoint into a new or empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(out_dir, model_max_length=shape.max_position_embeddings)
    model = Qwen2VLForConditionalGeneration(model_config(shape, tokenizer))
    _randomise(model, seed)
    with torch.no_grad():
        # Rows past the tokenizer only pad the table, as in released checkpoints. A zero logit loses to the best
        # of 500 random ones, so greedy decoding never picks an id the tokenizer cannot decode.
        model.lm_head.weight[tokenizer.get_vocab_size() :] = 0
    save_checkpoint(model, out_dir, shape, layout, shards, image_min_pixels, image_max_pixels)
    (out_dir / "README.md").write_text(
        f"{README_TITLE}\n\n"
        "Built by `atb_models.demo` with transformers' own Qwen2-VL classes. The weights are random: the model\n"
        "loads and runs like Qwen2-VL, but its answers mean nothing. Use it for tests and demos only.\n"
    )
    return out_dir


def save_checkpoint(
    model: Qwen2VLForConditionalGeneration,
    out_dir: Path,
    shape: TinyShape,
    layout: str = "classic",
    shards: int = 1,
    image_min_pixels: int = 56 * 56,
    image_max_pixels: int = 28 * 28 * 64,
) -> None:
    """Write `model` beside its tokenizer as a released checkpoint reads: weights in shape.torch_dtype (the model
    is cast in place), config.json, generation_config.json and preprocessor_config.json."""
    config = model.config
    model.to(getattr(torch, shape.torch_dtype))
    if layout == "classic" and shards == 1:
        model.save_pretrained(out_dir)
    else:
        config.save_pretrained(out_dir)
        _save_safetensors(_tensors_to_save(model, layout), out_dir, shards)
    _write_config_as_released(out_dir / "config.json", shape)
    # Written whole (save_pretrained drops default values such as do_sample): stop on either end token,
    # <|im_end|> or <|endoftext|> (Qwen2's bos and pad token).
    generation_config = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": [config.eos_token_id, config.bos_token_id],
        "pad_token_id": config.pad_token_id,
        "do_sample": False,
    }
    _write_json(out_dir / "generation_config.json", generation_config)
    write_preprocessor_config(out_dir, config, image_min_pixels, image_max_pixels)


def write_preprocessor_config(out_dir: Path, config: Qwen2VLConfig, min_pixels: int, max_pixels: int) -> None:
    """The image processor's settings: CLIP normalisation, the model's patching, and the image pixel bounds."""
    vision = config.vision_config
    preprocessor_config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
    }
    _write_json(Path(out_dir) / "preprocessor_config.json", preprocessor_config)


def build_demo(out_dir: str | Path, seed: int = 0) -> Path:
    """The demo checkpoint (default TinyShape) plus sample.jpg and sample.mp4; rebuilds an earlier demo in place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        readme = out_dir / "README.md"
        if not (readme.is_file() and readme.read_text().startswith(README_TITLE)):
            raise UserError(f"{out_dir} exists and is not a demo checkpoint; refusing to overwrite it")
        shutil.rmtree(out_dir)
    build_checkpoint(out_dir, seed=seed)
    make_image(out_dir / "sample.jpg", width=320, height=240, seed=seed)
    make_video(out_dir / "sample.mp4", num_frames=8, fps=2.0, width=320, height=240, seed=seed)
    return out_dir


def model_config(shape: TinyShape, tokenizer: Tokenizer) -> Qwen2VLConfig:
    """The Qwen2VLConfig of `shape`, with the vocabulary and special token ids of `tokenizer`."""
    token_id = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    tokenizer_size = tokenizer.get_vocab_size()
    return Qwen2VLConfig(
        architectures=["Qwen2VLForConditionalGeneration"],
        # padded like real checkpoints' embedding tables
        vocab_size=max(ceil_div(tokenizer_size, 64) * 64, shape.vocab_size or 0),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=shape.max_position_embeddings,
        sliding_window=shape.max_position_embeddings,
        max_window_layers=shape.num_hidden_layers,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        rope_scaling={"type": "mrope", "mrope_section": list(shape.mrope_section)},
        tie_word_embeddings=shape.tie_word_embeddings,
        torch_dtype=shape.torch_dtype,
        bos_token_id=token_id["<|endoftext|>"],
        eos_token_id=token_id["<|im_end|>"],
        pad_token_id=token_id["<|endoftext|>"],
        vision_start_token_id=token_id["<|vision_start|>"],
        vision_end_token_id=token_id["<|vision_end|>"],
        vision_token_id=token_id["<|vision_pad|>"],
        image_token_id=token_id["<|image_pad|>"],
        video_token_id=token_id["<|video_pad|>"],
        vision_config=_vision_config(shape),
    )


def _vision_config(shape: TinyShape) -> dict:
    return {
        "depth": shape.vision_depth,
        "embed_dim": shape.vision_embed_dim,
        "num_heads": shape.vision_num_heads,
        "hidden_size": shape.hidden_size,
        "hidden_act": "quick_gelu",
        "mlp_ratio": 4,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def _randomise(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter from one seeded generator.

    transformers' init leaves norm scales at exactly 1 and biases at 0, which would hide a missing bias or norm
    weight in a parity test; here weights are N(0, 0.02), norm scales 1 + N(0, 0.1), biases N(0, 0.02).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (nn.LayerNorm, Qwen2RMSNorm))
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.1 * noise if is_norm and name == "weight" else 0.02 * noise)


def _tensors_to_save(model: Qwen2VLForConditionalGeneration, layout: str) -> dict[str, torch.Tensor]:
    """The state dict as save_pretrained would write it (tied copies dropped), renamed for the layout."""
    dropped = set(model._tied_weights_keys) if model.config.tie_word_embeddings else set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name in dropped:
            continue
        if layout == "nested":
            if name.startswith("model."):
                name = "model.language_model." + name.removeprefix("model.")
            elif name.startswith("visual."):
                name = "model." + name
        tensors[name] = tensor.contiguous()
    return tensors


def _save_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int) -> None:
    names = list(tensors)
    if shards > len(names):
        raise UserError(f"cannot split {len(names)} tensors into {shards} shards")
    if shards == 1:
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = names[index * len(names) // shards : (index + 1) * len(names) // shards]
        save_file({name: tensors[name] for name in part}, out_dir / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    total_size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index_json)


def _write_config_as_released(config_path: Path, shape: TinyShape) -> None:
    """Make config.json read like a released Qwen2-VL one, which loaders other than transformers also meet.

    Qwen2VLConfig turns rope type "mrope" into "default" in memory and saves only non-default vision fields;
    released checkpoints say "mrope" and list the whole vision config.
    """
    config = json.loads(config_path.read_text())
    config["rope_scaling"] = {"type": "mrope", "mrope_section": list(shape.mrope_section)}
    config["vision_config"] = _vision_config(shape)
    _write_json(config_path, config)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """RGB uint8 noise with a few solid coloured rectangles, so resizing and patching have edges to keep."""
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    for _ in range(4):
        x0, x1 = sorted(rng.integers(0, width, size=2))
        y0, y1 = sorted(rng.integers(0, height, size=2))
        pixels[y0 : y1 + 1, x0 : x1 + 1] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return pixels


def make_image(path: str | Path | None, width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A deterministic RGB test picture; saved to path (format from its suffix) when a path is given."""
    image = Image.fromarray(_picture(np.random.default_rng(seed), width, height), "RGB")
    if path is not None:
        image.save(path)
    return image


def make_video(
    path: str | Path, num_frames: int = 8, fps: float = 2.0, width: int = 320, height: int = 240, seed: int = 0
) -> Path:
    """Write an mp4 (mp4v) of a still picture with a white bar sliding across it, and check it reads back."""
    path = Path(path)
    background = _picture(np.random.default_rng(seed), width, height)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    bar_width = max(1, width // 8)
    for index in range(num_frames):
        frame = background.copy()
        x0 = index * (width - bar_width) // max(1, num_frames - 1)
        frame[:, x0 : x0 + bar_width] = 255
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()

    frames_read = count_video_frames(path)
    if frames_read != num_frames:
        raise RuntimeError(f"OpenCV wrote {path} but reads back {frames_read} frames, not {num_frames}")
    return path


def make_frames(out_dir: str | Path, n: int, width: int = 320, height: int = 240, seed: int = 0) -> list[Path]:
    """Write n different PNG frames (frame_000.png, ...) into out_dir and return their paths in order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"frame_{index:03d}.png" for index in range(n)]
    for index, path in enumerate(paths):
        make_image(path, width, height, seed + index)
    return paths
