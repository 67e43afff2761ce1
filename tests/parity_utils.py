"""The reference side of parity tests: transformers' Qwen2VLForConditionalGeneration on the kit's own inputs."""
import functools

import torch
from transformers import Qwen2VLForConditionalGeneration


@functools.lru_cache(maxsize=8)
def reference_model(path: str) -> Qwen2VLForConditionalGeneration:
    return Qwen2VLForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32).eval()


def reference_generate(path, prompt, max_new_tokens: int):
    """Greedy tokens and per-step float32 logits from transformers for one preprocessed prompt."""
    model = reference_model(str(path))
    ids = torch.tensor([prompt.token_ids])
    kwargs = {}
    for kind, pixels, grids in (("image", "pixel_values", "image_grid_thw"),
                                ("video", "pixel_values_videos", "video_grid_thw")):
        items = [v for v in prompt.visuals if v.kind == kind]
        if items:
            kwargs[pixels] = torch.cat([v.pixel_values for v in items])
            kwargs[grids] = torch.tensor([list(v.grid_thw) for v in items])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, output_scores=True, return_dict_in_generate=True,
                             eos_token_id=None, **kwargs)
    return out.sequences[0, ids.shape[1]:].tolist(), [s[0].float() for s in out.scores]


class LogitsRecorder:
    """Wraps an LLM's model runner to keep the logits row of every sequence at every step."""

    def __init__(self, llm):
        self.by_seq = {}
        run = llm.runner.run

        def recording_run(seqs, is_prefill):
            logits = run(seqs, is_prefill)
            for seq, row in zip(seqs, logits):
                self.by_seq.setdefault(seq.seq_id, []).append(row.clone())
            return logits

        llm.runner.run = recording_run
