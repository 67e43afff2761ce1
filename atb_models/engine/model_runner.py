"""Tensors in, logits out: builds one step's inputs from the scheduled sequences and runs the model."""
import logging

import torch

from atb_models import distributed
from atb_models.engine.encoder_cache import EncoderCache
from atb_models.errors import UserError
from atb_models.host import settle_vector_math
from atb_models.kernels import Kernels
from atb_models.layers.attention import StepContext
from atb_models.layers.linear import pack_weights
from atb_models.platform import free_memory_bytes
from atb_models.quantization import convert_to_w8a16
from atb_models.weights import load_weights

logger = logging.getLogger("atb_models.runner")


def check_weights_fit(cfg, plan, quantized: bool) -> None:
    """Refuses, before anything is allocated, a config.json whose language model alone cannot fit this rank's free
    memory (a vocab_size or intermediate_size off by orders of magnitude would otherwise fail in the allocator, or
    swap). A lower bound: the embedding table (each rank's whole) and the MLPs' three matrices a layer (this rank's
    share), at the weights' element size (one byte where they are int8)."""
    element = plan.llm_dtype.itemsize
    least = (cfg.vocab_size * cfg.hidden_size * element + cfg.num_hidden_layers * 3 * cfg.hidden_size
             * cfg.intermediate_size * (1 if quantized else element) // distributed.tp_size())
    free = free_memory_bytes(plan)
    if least > free:
        raise UserError(f"config.json's sizes (vocab_size {cfg.vocab_size}, hidden_size {cfg.hidden_size}, "
                        f"intermediate_size {cfg.intermediate_size}, {cfg.num_hidden_layers} layers) need at least "
                        f"{least / 2**30:.3g} GiB of weights a rank; {plan.kind} has {free / 2**30:.3g} GiB free")


class ModelRunner:
    def __init__(self, model_config, plan, block_size: int, quantization=None, encoder_cache_bytes: int = 0,
                 kernel_choice: str | None = None):
        """quantization: the quantization.Quantization the language model runs in, or None for float;
        encoder_cache_bytes: the vision-encoder cache's budget (0: none kept); kernel_choice: the CPU's kernels
        (Kernels.for_plan's choice; None: $ATB_MODELS_CPU_LINEAR)."""
        settle_vector_math()
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self.plan = plan
        self.device = plan.device
        self.block_size = block_size
        # This runner's kernels, chosen once: its model and no other uses them.
        self.kernels = Kernels.for_plan(plan, kernel_choice)
        logger.debug("kernels: %s", self.kernels.describe())
        cfg = model_config.hf_config
        check_weights_fit(cfg, plan, quantization is not None)
        model_class = model_config.family.model_class()  # the registry's class for the checkpoint's model_type
        with torch.device(self.device):
            self.model = model_class(cfg, plan.llm_dtype, plan.vision_dtype, self.device, plan.upcast_attention,
                                     kernels=self.kernels)
        if quantization is not None:
            convert_to_w8a16(self.model, quantization, self.kernels.w8a16)
            logger.info("weights: %s", quantization.describe())
        load_weights(self.model, model_config.path, quantization.gptq_format if quantization else None)
        pack_weights(self.model)
        self.model.eval()
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        # Each rank caches only its own KV heads; layout in atb_models/layers/attention.py.
        self.block_shape = (self.model.head_layout.kv_per_rank, block_size, head_dim)

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block across all layers."""
        per_layer = self.block_shape[0] * self.block_shape[1] * self.block_shape[2] * self.plan.llm_dtype.itemsize
        return 2 * len(self.model.model.layers) * per_layer

    def allocate_kv_cache(self, num_blocks: int) -> None:
        for layer in self.model.model.layers:
            layer.k_cache = torch.zeros((num_blocks, *self.block_shape), dtype=self.plan.llm_dtype, device=self.device)
            layer.v_cache = torch.zeros((num_blocks, *self.block_shape), dtype=self.plan.llm_dtype, device=self.device)

    @torch.inference_mode()
    def copy_blocks(self, pairs: list) -> None:
        """K and V of each (source, destination) block copied in every layer: a beam's own copy of a block it
        shared with another (engine.beam_search)."""
        sources, destinations = self._tensor([s for s, _ in pairs]), self._tensor([d for _, d in pairs])
        for layer in self.model.model.layers:
            for cache in (layer.k_cache, layer.v_cache):
                cache.index_copy_(0, destinations, cache.index_select(0, sources))

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _slots(self, seq, start: int, end: int) -> list:
        """(block, offset) in the cache of the sequence's tokens start..end-1."""
        bs = self.block_size
        return [(seq.block_table[j // bs], j % bs) for j in range(start, end)]

    def _visual_embeds(self, seqs: list, starts: list):
        """(rows, features) for the placeholder rows of a prefill's computed tokens, or None. Each image or video
        with tokens to compute takes its features from the encoder cache, else from one vision-tower call per kind
        (the missing ones batched, a medium twice in the step run once); one whose tokens all lie in the cached
        prefix needs none. Counts, per sequence, the media whose vision-tower run was skipped
        (seq.cached_visual_items). Without an encoder cache (caching off) nothing is shared: each medium runs."""
        sharing = self.encoder_cache.max_bytes > 0
        # key -> the features in hand (taken from the cache once: a later put may evict them), and the media to run
        features_of, queued, missing, needed = {}, set(), {"image": [], "video": []}, []
        for seq, offset in zip(seqs, starts):
            first = seq.prefill_start
            for index, visual in enumerate(seq.prompt.visuals):
                key = visual.content_hash if sharing else id(visual)
                begin, end = max(visual.start, first), min(visual.start + visual.num_tokens, seq.prefill_end)
                # Each medium is counted once since admission (a chunked prompt meets it again in later steps).
                first_use = index not in seq.visuals_counted
                if begin >= end:  # none of its tokens computed in this step
                    if first_use and visual.start + visual.num_tokens <= seq.num_cached_tokens:
                        seq.visuals_counted.add(index)  # all its tokens in the cached prefix
                        seq.cached_visual_items += 1
                    continue
                seq.visuals_counted.add(index)
                runs_here = False
                if key not in features_of and key not in queued:
                    cached = self.encoder_cache.get(key) if sharing else None
                    if cached is None:
                        missing[visual.kind].append((key, visual))
                        queued.add(key)
                        runs_here = True
                    else:
                        features_of[key] = cached
                if not runs_here and first_use:  # its features cached, or run for another request of this step
                    seq.cached_visual_items += 1
                needed.append((key, begin - visual.start, end - visual.start, offset + begin - first))
        for unique in missing.values():
            if not unique:
                continue
            pixels = torch.cat([v.pixel_values for _, v in unique]).to(self.device)
            features = self.model.visual(pixels, [tuple(v.grid_thw) for _, v in unique])
            for (key, visual), part in zip(unique, features.split([v.num_tokens for _, v in unique])):
                features_of[key] = part
                if sharing:
                    self.encoder_cache.put(key, part)
        if not needed:
            return None
        rows = [torch.arange(row, row + end - begin) for _, begin, end, row in needed]
        parts = [features_of[key][begin:end] for key, begin, end, _ in needed]
        return torch.cat(rows).to(self.device), torch.cat(parts)

    @torch.inference_mode()
    def run(self, seqs: list, is_prefill: bool, rows_from: int | None = None) -> torch.Tensor:
        """Float32 logits [len(seqs), vocab] for each sequence's next token; with `rows_from` (a prefill of one
        sequence), the logits after each of its tokens from that index on (teacher forcing, benchmark.engines).
        In a prefill, a sequence that wants_prompt_logprobs has the logits after each token it computes, in order
        (prefill_end - prefill_start rows in place of its one).
        A prefill computes each sequence's tokens [seq.prefill_start, seq.prefill_end): those before are in the
        cache (a cached prefix, or the chunks of earlier steps). A decode step's logits have 1 + len(draft_tokens)
        rows for a sequence with guessed tokens (engine.speculative)."""
        if is_prefill:
            ids, positions, slots, starts, last_rows = [], [], [], [0], []
            for seq in seqs:
                first, end = seq.prefill_start, seq.prefill_end
                ids.extend(seq.token_ids[first:end])
                positions.append(seq.positions(first, end))
                slots.extend(self._slots(seq, first, end))
                starts.append(starts[-1] + end - first)
                if rows_from is not None:
                    last_rows.extend(range(starts[-2] + rows_from - first, starts[-1]))
                else:
                    last_rows.extend(range(starts[-2], starts[-1]) if seq.wants_prompt_logprobs
                                     else [starts[-1] - 1])
            prefixes = [seq.prefill_start for seq in seqs]
            ctx = StepContext(True, self._tensor(slots).t(), seq_starts=starts)
            if any(prefixes):
                ctx.prefix_lens = prefixes
                ctx.prefix_tables = [self._tensor(seq.block_table) for seq in seqs]
            visual_embeds = self._visual_embeds(seqs, starts[:-1])
            positions = torch.cat(positions, dim=1).to(self.device)
            logits = self.model(self._tensor(ids), positions, self._tensor(last_rows), ctx, visual_embeds)
        else:
            # One row a sequence, and one more for each token guessed for it (engine.speculative): a guess at the
            # position after the row before it, attending to the rows before its own, whose K/V the decode
            # attention stores first.
            rows = [(seq, j) for seq in seqs for j in range(1 + len(seq.draft_tokens))]
            ids = [seq.draft_tokens[j - 1] if j else seq.token_ids[-1] for seq, j in rows]
            positions = self._tensor([seq.decode_position() + j for seq, j in rows]).expand(3, -1)
            slots = [self._slots(seq, seq.num_tokens - 1 + j, seq.num_tokens + j)[0] for seq, j in rows]
            context_lens = self._tensor([seq.num_tokens + j for seq, j in rows])
            max_blocks = max(len(seq.block_table) for seq in seqs)
            tables = self._tensor([seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq, _ in rows])
            ctx = StepContext(False, self._tensor(slots).t(), block_tables=tables, context_lens=context_lens)
            logits = self.model(self._tensor(ids), positions, None, ctx)  # logits of every row
        return logits
