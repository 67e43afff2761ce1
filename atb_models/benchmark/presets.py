"""What `compare` runs: a checkpoint shape, the workloads' sizes and how many times each is repeated.

A preset's random checkpoint is built once by its family's demo checkpoint builder (the registry's: for Qwen2-VL
`atb_models.demo.build_checkpoint`, for Qwen2.5-VL `atb_models.oracle.build_demo_checkpoint`) into
`$ATB_MODELS_HOME/benchmark/<preset>` (default
`~/.cache/atb_models/benchmark/<preset>`), as are the workloads' images, and reused; `--model_path` runs a preset's
workloads on any checkpoint instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from atb_models.config import kit_home
from atb_models.demo.checkpoint import TinyShape
from atb_models.errors import UserError
from atb_models.models import model_family

logger = logging.getLogger("atb_models.benchmark")

READY_MARKER = "BENCHMARK_CHECKPOINT_READY"  # written last: a folder without it is an interrupted build


def _spread(first: int, last: int, count: int, multiple: int = 1) -> list[int]:
    """count values from first to last, evenly spaced, each rounded to a multiple."""
    return [round((first + (last - first) * i / (count - 1)) / multiple) * multiple for i in range(count)]


@dataclass(frozen=True)
class Workloads:
    single_image: tuple[int, int]               # (width, height) of the one image of `single`
    single_tokens: int                          # its output length
    batch_images: tuple[tuple[int, int], ...]   # `batch16`: one image per request
    batch_tokens: tuple[int, ...]               # and each request's output length
    decode_batch_sizes: tuple[int, ...]         # `decode`: batch sizes timed
    decode_steps: int                           # decode steps per timed run
    question: str = "Describe this image in one sentence."
    decode_prompt: str = ("Describe the scene: a mountain lake at sunrise, with mist over the water and birds in the "
                          "sky. Explain your answer step by step.")


def batch16_workloads(first: tuple[int, int], last: tuple[int, int], tokens: tuple[int, int]) -> tuple:
    """16 requests whose images grow from `first` to `last` (sides multiples of 28) and whose output lengths run
    from tokens[0] to tokens[1], paired in a fixed shuffled order so long outputs do not all go with large images."""
    widths = _spread(first[0], last[0], 16, 28)
    heights = _spread(first[1], last[1], 16, 28)
    lengths = _spread(tokens[0], tokens[1], 16)
    order = [5, 12, 0, 9, 14, 3, 7, 10, 1, 15, 6, 11, 2, 8, 13, 4]
    return tuple(zip(widths, heights)), tuple(lengths[i] for i in order)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model_type: str             # the registry's family whose demo builder makes the checkpoint
    shape: object               # that builder's shape settings (a TinyShape for Qwen2-VL, a dict for Qwen2.5-VL)
    image_max_pixels: int       # the checkpoint's processor ceiling: every workload image keeps its size
    dtype: str                  # computed in
    device: str
    workloads: Workloads
    repeats: int                # timed runs of each workload per engine, after one warm-up
    bandwidth_bytes: int        # tensor read to measure memory bandwidth: well above the last-level cache
    max_input_length: int       # engine limits that fit every workload
    max_output_length: int


def _preset(name, description, shape, image_max_pixels, dtype, device, single, batch, decode, repeats,
            bandwidth_bytes, max_input_length, model_type="qwen2_vl") -> Preset:
    batch_images, batch_tokens = batch
    workloads = Workloads(single[0], single[1], batch_images, batch_tokens, decode[0], decode[1])
    max_output = max(single[1], *batch_tokens, decode[1] + 1)
    return Preset(name, description, model_type, shape, image_max_pixels, dtype, device, workloads, repeats,
                  bandwidth_bytes, max_input_length, max_output)


PRESETS = {
    preset.name: preset
    for preset in (
        _preset("tiny", "a 2-layer toy for the tests: every workload in seconds",
                TinyShape(), 224 * 224, "float32", "cpu",
                single=((112, 112), 8), batch=batch16_workloads((56, 56), (168, 112), (2, 8)), decode=((1, 16), 4),
                repeats=1, bandwidth_bytes=64 << 20, max_input_length=512),
        _preset("cpu-small", "Qwen2-0.5B language model (896 hidden, 24 layers, 14/2 heads, 4864 intermediate) with "
                "an 8-block vision tower of 640 dims / 8 heads, float32 on the CPU",
                TinyShape(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vision_depth=8, vision_embed_dim=640, vision_num_heads=8,
                          tie_word_embeddings=True, torch_dtype="bfloat16", max_position_embeddings=32768),
                672 * 672, "float32", "cpu",
                single=((448, 448), 64), batch=batch16_workloads((224, 224), (672, 448), (16, 128)),
                decode=((1, 16), 32), repeats=3, bandwidth_bytes=1 << 30, max_input_length=1024),
        _preset("cpu-small-qwen25", "cpu-small's workloads and language model in Qwen2.5-VL form (tied embeddings) "
                "with an 8-block windowed vision tower of 640 dims / 8 heads, 1712 intermediate, full attention in "
                "blocks 3 and 7; built by transformers 4.51.3 in the reference venv",
                {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                 "num_key_value_heads": 2, "tie_word_embeddings": True, "vision_depth": 8, "vision_hidden_size": 640,
                 "vision_intermediate_size": 1712, "vision_num_heads": 8, "fullatt_block_indexes": [3, 7],
                 "vision_attention_std": 0.02, "merger_std": 0.02},
                672 * 672, "float32", "cpu",
                single=((448, 448), 64), batch=batch16_workloads((224, 224), (672, 448), (16, 128)),
                decode=((1, 16), 32), repeats=3, bandwidth_bytes=1 << 30, max_input_length=1024,
                model_type="qwen2_5_vl"),
        _preset("2b", "Qwen2-VL-2B shapes (1536 hidden, 28 layers, 12/2 heads, 8960 intermediate, vision 32 x "
                "1280/16, vocabulary 151936) in bfloat16, for a GPU",
                TinyShape(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, vision_depth=32, vision_embed_dim=1280, vision_num_heads=16,
                          tie_word_embeddings=True, torch_dtype="bfloat16", max_position_embeddings=32768,
                          mrope_section=(16, 24, 24), vocab_size=151936),
                # 952 x 784 pixels: 34 x 28 merged tokens = 952 visual tokens, about 1,000 with the text
                12845056, "bfloat16", "auto",
                single=((952, 784), 128), batch=batch16_workloads((224, 224), (672, 448), (16, 128)),
                decode=((1, 16), 128), repeats=3, bandwidth_bytes=4 << 30, max_input_length=2048),
    )
}


def benchmark_dir(preset: Preset) -> Path:
    """benchmark/<preset> under the kit's home (config.kit_home)."""
    return kit_home() / "benchmark" / preset.name


def ensure_checkpoint(preset: Preset) -> Path:
    """The preset's random checkpoint, built on first use (into a staging folder renamed when complete)."""
    target = benchmark_dir(preset) / "checkpoint"
    if (target / READY_MARKER).is_file():
        return target
    logger.info("building the %s checkpoint in %s (once; large presets take minutes)", preset.name, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=target.parent))
        try:
            model_family(preset.model_type).build_demo_checkpoint(staging, shape=preset.shape,
                                                                  image_max_pixels=preset.image_max_pixels)
            (staging / READY_MARKER).write_text(f"{preset.name}: {preset.description}\n")
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot build the {preset.name} checkpoint in {target}: {e}; set ATB_MODELS_HOME to a "
                        "writable folder or pass --model_path") from None
    return target
