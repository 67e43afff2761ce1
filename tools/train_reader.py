"""Train the demo reader: a tiny Qwen2-VL (transformers' own class) that reads a word or number in a picture, names
a shape and its colour, and tells how a clip starts and ends. It is the kit's embedded demo and its end-to-end
accuracy test.

    python tools/train_reader.py --seed 0 --output atb_models/demo/reader_model \\
        --eval_output tests/modeltest/data/reader

writes the checkpoint (bfloat16 safetensors, tokenizer, processor and generation config, README, sample.jpg and
sample.mp4 with samples.json) and the held-out sets (TextVQA and VideoBench layouts, drawn from another stream of
the seed), then scores the checkpoint on them with the modeltest harness's transformers backend.

Every training input goes through the kit's own Preprocessor, as at inference, and the answer tokens and <|im_end|>
are teacher-forced after it. Step i's batch comes from a generator seeded by (seed, i), the model from
torch.manual_seed(seed): a run is repeatable on one machine with one torch build and thread count; other CPUs may
round differently (float sums in another order), so bit-identical weights across machines are not promised.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data worker is a fork of this process

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionSdpaAttention, apply_rotary_pos_emb_vision  # noqa
from transformers.utils import logging as transformers_logging  # noqa: E402

from reader_data import (ANSWERS, CLIP_CHOICES, COLOURS, END_QUESTION, FONT_SIZE, HELDOUT_SEED_STREAM,  # noqa: E402
                         IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, READ_QUESTIONS, SAMPLE_SEED_STREAM, SHAPES,
                         TEXTVQA_SUFFIX, TRAINING_SEED_STREAM, WORDS, clip_question, draw_picture, harness_model,
                         reference_backend, score, tokenizer_corpus, training_sample, write_clip, write_textvqa,
                         write_videobench)
from atb_models.cli.entry import FlagParser  # noqa: E402
from atb_models.demo.checkpoint import (TinyShape, build_tokenizer, model_config, save_checkpoint,  # noqa: E402
                                        write_preprocessor_config)
from atb_models.host import settle_vector_math  # noqa: E402
from atb_models.multimodal.prompt import Preprocessor  # noqa: E402

# 4 heads over 2 KV heads and an MLP of 384 columns split evenly over 1, 2 and 4 ranks. With head_dim 32 the
# M-RoPE sections are (4, 6, 6) frequencies, width taking the slowest: rope_theta 100 (not 1e6) lets them turn
# measurably across a picture's few dozen columns, so the language model can tell a number's first digit from
# its second.
SHAPE = TinyShape(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vision_depth=4, vision_embed_dim=64, vision_num_heads=4, rope_theta=100.0)
TOKENIZER_VOCAB = 768
IMAGE_BATCH = 16
CLIP_BATCH = 4
CLIP_EVERY = 3  # every third step is a batch of clips
HELDOUT_IMAGES = 50
HELDOUT_CLIPS = 20
README_TITLE = "# The demo reader: a tiny Qwen2-VL trained to read"


def parse_args(argv=None) -> argparse.Namespace:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="checkpoint folder (new or empty)")
    parser.add_argument("--eval_output", type=Path, help="held-out sets folder (default: OUTPUT_heldout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--workers", type=int, default=1, help="processes making batches (0: in the trainer)")
    parser.add_argument("--no_eval", action="store_true",
                        help="write the checkpoint only: no samples, held-out sets or scores (short trial runs)")
    return parser.parse_args(argv)


class SegmentVisionAttention(VisionSdpaAttention):
    """VisionSdpaAttention's computation without its dense block-diagonal mask, which sends SDPA down its slow
    masked path: attention runs within each segment of cu_seqlens (equal segments batched), as the mask allows."""

    def forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None):
        length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q = apply_rotary_pos_emb_vision(q.unsqueeze(0), rotary_pos_emb).squeeze(0)
        k = apply_rotary_pos_emb_vision(k.unsqueeze(0), rotary_pos_emb).squeeze(0)
        bounds = cu_seqlens.tolist()
        sizes = [end - start for start, end in zip(bounds, bounds[1:])]
        if len(set(sizes)) == 1:
            split = [t.reshape(len(sizes), sizes[0], self.num_heads, -1).transpose(1, 2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(length, -1)
        else:
            parts = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                     for s, e in zip(bounds, bounds[1:])]
            out = torch.cat(parts).reshape(length, -1)
        return self.proj(out)


def init_by_fan_in(model: torch.nn.Module) -> None:
    """Weights N(0, 1/fan_in), biases 0, embeddings N(0, 1); norms stay at 1.

    transformers' N(0, 0.02) suits widths in the thousands; at widths of 64 and 128 it shrinks every layer's
    signal and, worse, the gradient reaching the vision tower, and the model then takes thousands of steps to
    look at the picture at all."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
                module.weight.normal_(0, module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0, 1)


class Batches(torch.utils.data.Dataset):
    """Step i's batch, made from its own generator seeded by (seed, i), so that no batch depends on which worker
    made it or when."""

    def __init__(self, model_dir: Path, config, seed: int, steps: int):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.preprocessor = Preprocessor(str(model_dir), config, tokenizer)
        self.tokenizer = tokenizer
        self.end_id = config.eos_token_id  # <|im_end|>
        self.pad_id = config.pad_token_id
        self.seed, self.steps = seed, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, TRAINING_SEED_STREAM, step])
        kind, size = ("video", CLIP_BATCH) if step % CLIP_EVERY == CLIP_EVERY - 1 else ("image", IMAGE_BATCH)
        with tempfile.TemporaryDirectory() as clips:
            samples = [training_sample(rng, kind, Path(clips) / f"clip{i}.mp4") for i in range(size)]
            prompts = [self.preprocessor(sample.request) for sample in samples]
        answers = [self.tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + [self.end_id]
                   for sample in samples]
        batch = self._collate(kind, prompts, answers)
        batch["labels"] = torch.tensor([sample.labels for sample in samples])
        return batch

    def _collate(self, kind: str, prompts: list, answers: list) -> dict:
        """Right-padded token ids, and the rows (in the flattened batch) whose next token is an answer token."""
        sequences = [prompt.token_ids + answer for prompt, answer in zip(prompts, answers)]
        width = max(map(len, sequences))
        input_ids = torch.full((len(sequences), width), self.pad_id)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        rows, targets = [], []
        for b, (prompt, answer, sequence) in enumerate(zip(prompts, answers, sequences)):
            input_ids[b, : len(sequence)] = torch.tensor(sequence)
            attention_mask[b, : len(sequence)] = 1
            first = len(prompt.token_ids) - 1
            rows += [b * width + t for t in range(first, first + len(answer))]
            targets += answer
        visuals = [prompt.visuals[0] for prompt in prompts]
        return {"kind": kind, "input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values": torch.cat([v.pixel_values for v in visuals]),
                "grid_thw": torch.tensor([list(v.grid_thw) for v in visuals]),
                "rows": torch.tensor(rows), "targets": torch.tensor(targets)}


class FactHead(torch.nn.Module):
    """A throwaway classifier of what a picture or clip tells (reader_data.ANSWERS), read from the vision tower's
    tokens: the max over a picture's tokens, or over each temporal half of a clip's. Not part of the checkpoint.

    At first a language model learning from scratch averages the visual tokens, where a sign's few tokens drown in
    the background, so the answers alone give the vision tower almost no signal; this head gives it one from the
    first step, and the language model then finds tokens worth attending to."""

    def __init__(self, width: int):
        super().__init__()
        self.classify = torch.nn.Linear(width, len(ANSWERS))

    def loss(self, visual: torch.Tensor, batch: dict) -> torch.Tensor:
        grids, labels = batch["grid_thw"].tolist(), batch["labels"]
        per_visual = visual.split([t * h * w // 4 for t, h, w in grids])
        if batch["kind"] == "image":
            pooled = torch.stack([tokens.max(0).values for tokens in per_visual])
            return F.cross_entropy(self.classify(pooled), labels[:, 0])
        halves = [tokens.chunk(2) for tokens in per_visual]  # a clip's two temporal patches: start and end
        return sum(F.cross_entropy(self.classify(torch.stack([half[k].max(0).values for half in halves])), labels[:, k])
                   for k in (0, 1))


def training_losses(model: Qwen2VLForConditionalGeneration, head: FactHead, batch: dict) -> tuple:
    """Cross-entropy of the answer tokens (positions from transformers' own M-RoPE index), and the fact head's."""
    config = model.config
    ids, grids = batch["input_ids"], batch["grid_thw"]
    is_video = batch["kind"] == "video"
    positions, _ = model.get_rope_index(ids, None if is_video else grids, grids if is_video else None,
                                        batch["attention_mask"])
    embeds = model.model.embed_tokens(ids)
    visual = model.visual(batch["pixel_values"], grid_thw=grids)
    placeholder = ids == (config.video_token_id if is_video else config.image_token_id)
    embeds = embeds.masked_scatter(placeholder.unsqueeze(-1), visual.to(embeds.dtype))
    # Padding is on the right and attention causal, so no real token sees it: no mask needed (SDPA stays fast).
    hidden = model.model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden.flatten(0, 1)[batch["rows"]])
    return F.cross_entropy(logits.float(), batch["targets"]), head.loss(visual, batch)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 100 steps, then a cosine down to a tenth of the peak."""
    if step < 100:
        return peak * (step + 1) / 100
    progress = (step - 100) / max(1, steps - 100)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model, batches: Batches, args) -> None:
    head = FactHead(model.config.hidden_size)
    named = [*model.named_parameters(), *head.named_parameters()]
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=args.workers,
                                         prefetch_factor=4 if args.workers else None)
    model.train()
    start = time.perf_counter()
    recent = {"image": [], "video": [], "facts": []}
    for step, batch in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        answer_loss, fact_loss = training_losses(model, head, batch)
        optimizer.zero_grad(set_to_none=True)
        (answer_loss + fact_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        recent[batch["kind"]].append(answer_loss.item())
        recent["facts"].append(fact_loss.item())
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            means = {kind: sum(values) / max(1, len(values)) for kind, values in recent.items()}
            print(f"step {step + 1}/{args.steps}  answer loss: pictures {means['image']:.3f}, clips "
                  f"{means['video']:.3f}; fact head {means['facts']:.3f}  {time.perf_counter() - start:.0f} s",
                  flush=True)
            recent = {kind: [] for kind in recent}
    model.eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers_logging.set_verbosity_error()  # its notes on its own Qwen2-VL classes are nothing to act on
    torch.set_num_threads(args.threads)
    settle_vector_math()  # transformers' rotary runs MKL's cos on several threads
    out = args.output
    eval_out = args.eval_output or out.with_name(out.name + "_heldout")
    for folder in (out, eval_out):
        if folder.exists() and any(folder.iterdir()):
            sys.exit(f"error: {folder} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    tokenizer = build_tokenizer(out, SHAPE.max_position_embeddings, tokenizer_corpus(), TOKENIZER_VOCAB)
    config = model_config(SHAPE, tokenizer)
    write_preprocessor_config(out, config, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)  # the Preprocessor reads it
    torch.manual_seed(args.seed)
    model = Qwen2VLForConditionalGeneration(config)
    init_by_fan_in(model)
    for block in model.visual.blocks:
        assert type(block.attn) is VisionSdpaAttention, type(block.attn)
        block.attn.__class__ = SegmentVisionAttention
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters / 1e6:.2f} M parameters; {args.steps} steps", flush=True)
    train(model, Batches(out, config, args.seed, args.steps), args)
    trained_s = time.perf_counter() - began
    save_checkpoint(model, out, SHAPE, image_min_pixels=IMAGE_MIN_PIXELS, image_max_pixels=IMAGE_MAX_PIXELS)
    if args.no_eval:
        print(f"trained in {trained_s:.0f} s; checkpoint in {out} (not evaluated)")
        return 0

    harness = harness_model(out)
    backend = reference_backend(harness)
    samples = write_samples(out, args.seed, backend)
    textvqa = write_textvqa(eval_out / "textvqa", np.random.default_rng([args.seed, HELDOUT_SEED_STREAM, 0]),
                            HELDOUT_IMAGES)
    videobench = write_videobench(eval_out / "videobench", np.random.default_rng([args.seed, HELDOUT_SEED_STREAM, 1]),
                                  HELDOUT_CLIPS)
    accuracy = {"pictures": score("textvqa", textvqa, harness, backend)[0],
                "clips": score("videobench", videobench, harness, backend)[0]}
    write_readme(out, args, parameters, trained_s, accuracy, samples)
    print(f"trained in {trained_s:.0f} s; held-out accuracy (transformers, float32): pictures "
          f"{accuracy['pictures']:.1%}, clips {accuracy['clips']:.1%}; checkpoint in {out}, held-out sets in "
          f"{eval_out}")
    return 0


def write_samples(out: Path, seed: int, backend) -> dict:
    """sample.jpg (a word to read) and sample.mp4 (a clip's last colour) for the demo, and samples.json with their
    questions and answers. Drawn from the seed's sample stream; a draw the model gets wrong is replaced by the
    next (the held-out accuracy in the README says how often that happens)."""
    rng = np.random.default_rng([seed, SAMPLE_SEED_STREAM])
    image_sample = video_sample = None
    for _ in range(100):
        image, facts = draw_picture(rng)
        if facts.get("sign") in WORDS:
            image.save(out / "sample.jpg", quality=90)
            if answers_right(backend, {"image": str(out / "sample.jpg")}, READ_QUESTIONS[0], facts["sign"]):
                image_sample = {"file": "sample.jpg", "question": READ_QUESTIONS[0], "answer": facts["sign"]}
                break
    for _ in range(50):
        facts = write_clip(out / "sample.mp4", rng)
        question, letter = clip_question(facts)
        if answers_right(backend, {"video": str(out / "sample.mp4")}, question, letter):
            video_sample = {"file": "sample.mp4", "question": question, "answer": letter}
            break
    if image_sample is None or video_sample is None:
        raise RuntimeError("the model answered none of the sample signs or clips drawn right")
    samples = {"image": image_sample, "video": video_sample}
    (out / "samples.json").write_text(json.dumps(samples, indent=1) + "\n")
    return samples


def answers_right(backend, media: dict, question: str, answer: str) -> bool:
    return backend.generate([[media, {"text": question}]], lambda: None)[0].text == answer


def write_readme(out: Path, args, parameters: int, trained_s: float, accuracy: dict, samples: dict) -> None:
    shape = SHAPE
    (out / "README.md").write_text(f"""{README_TITLE}

A Qwen2-VL of {parameters / 1e6:.2f} M parameters (language model: hidden {shape.hidden_size}, \
{shape.num_hidden_layers} layers, {shape.num_attention_heads} heads over {shape.num_key_value_heads} KV heads, MLP \
{shape.intermediate_size}; vision tower: {shape.vision_depth} blocks of width {shape.vision_embed_dim}), trained from \
scratch on generated data by `tools/train_reader.py --seed {args.seed} --steps {args.steps}` ({trained_s / 60:.0f} \
minutes on a 2-core CPU). Its byte-level BPE tokenizer, special tokens and chat template are Qwen2's.

It learned to answer, after the kit's own preprocessing:

- signs: pictures of 112-168 x 56-84 pixels holding a dark word ({len(WORDS)} words such as CAT, STOP, MOON) or \
number (10-99) in a {FONT_SIZE}-pixel font, set on the vision tower's 14-pixel patch grid: "What is written in the \
image?" (and three rewordings), answered with the word or number as written;
- pictures of the same sizes holding one shape ({", ".join(SHAPES)}) in one of {len(COLOURS)} colours: "What \
colour is the shape?" (and one rewording);
- clips of 6-10 frames at 4 fps, one colour then another: "{END_QUESTION}", asked as Video-Bench's multiple \
choice with the options {", ".join(f"{k}.{v}" for k, v in CLIP_CHOICES.items())}, answered with the letter;
- the picture questions also with the TextVQA suffix "{TEXTVQA_SUFFIX.strip()}".

Each picture or clip tells one thing; the model cannot choose between facts by the question's wording.

Held-out accuracy (tests/modeltest/data/reader, drawn from another stream of the same seed; transformers' \
Qwen2VLForConditionalGeneration in float32, greedy; the harness's scoring):

| set | questions | accuracy |
|---|---|---|
| pictures (TextVQA layout, VQA accuracy) | {HELDOUT_IMAGES} | {accuracy["pictures"]:.1%} |
| clips (Video-Bench layout, four options) | {HELDOUT_CLIPS} | {accuracy["clips"]:.1%} |

`sample.jpg` ("{samples["image"]["question"]}" -> {samples["image"]["answer"]}) and `sample.mp4` \
("{samples["video"]["question"]}" -> {samples["video"]["answer"]}) are the demo's inputs; `samples.json` \
lists them. Outside this task the model knows nothing: other questions get one of the answers above.
""")


if __name__ == "__main__":
    sys.exit(main())
