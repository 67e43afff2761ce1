"""Tensors in, logits out: builds one step's inputs from the scheduled sequences and runs the model."""
import logging

import torch

from atb_models.kernels import Kernels
from atb_models.layers.attention import StepContext
from atb_models.layers.linear import pack_weights
from atb_models.quantization import convert_to_w8a16
from atb_models.weights import load_weights

logger = logging.getLogger("atb_models.runner")


class ModelRunner:
    def __init__(self, model_config, plan, block_size: int, quantization=None):
        """quantization: the quantization.Quantization the language model runs in, or None for float."""
        self.plan = plan
        self.device = plan.device
        self.block_size = block_size
        # This runner's kernels, chosen once: its model and no other uses them.
        self.kernels = Kernels.for_plan(plan)
        logger.debug("kernels: %s", self.kernels.describe())
        cfg = model_config.hf_config
        model_class = model_config.family.model_class()  # the registry's class for the checkpoint's model_type
        with torch.device(self.device):
            self.model = model_class(cfg, plan.llm_dtype, plan.vision_dtype, self.device, plan.upcast_attention,
                                     kernels=self.kernels)
        if quantization is not None:
            convert_to_w8a16(self.model, quantization, self.kernels.w8a16)
            logger.info("weights: %s", quantization.describe())
        load_weights(self.model, model_config.path)
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

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _slots(self, seq, start: int, end: int) -> list:
        """(block, offset) in the cache of the sequence's tokens start..end-1."""
        bs = self.block_size
        return [(seq.block_table[j // bs], j % bs) for j in range(start, end)]

    @staticmethod
    def _visual_batch(seqs, kind: str):
        items = [v for seq in seqs for v in seq.prompt.visuals if v.kind == kind]
        if not items:
            return None
        return torch.cat([v.pixel_values for v in items]), [tuple(v.grid_thw) for v in items]

    @torch.inference_mode()
    def run(self, seqs: list, is_prefill: bool, rows_from: int | None = None) -> torch.Tensor:
        """Float32 logits [len(seqs), vocab] for each sequence's next token; with `rows_from` (a prefill of one
        sequence), the logits after each of its tokens from that index on (teacher forcing, benchmark.engines)."""
        if is_prefill:
            ids, positions, slots, starts, last_rows = [], [], [], [0], []
            for seq in seqs:
                ids.extend(seq.token_ids)
                positions.append(seq.positions(0, seq.num_tokens))
                slots.extend(self._slots(seq, 0, seq.num_tokens))
                starts.append(starts[-1] + seq.num_tokens)
                last_rows.extend(range(starts[-2] + rows_from, starts[-1]) if rows_from is not None
                                 else [starts[-1] - 1])
            ctx = StepContext(True, self._tensor(slots).t(), seq_starts=starts)
            images = self._visual_batch(seqs, "image")
            videos = self._visual_batch(seqs, "video")
            if images is not None:
                images = (images[0].to(self.device), images[1])
            if videos is not None:
                videos = (videos[0].to(self.device), videos[1])
            positions = torch.cat(positions, dim=1).to(self.device)
            logits = self.model(self._tensor(ids), positions, self._tensor(last_rows), ctx, images, videos)
        else:
            bs = self.block_size
            ids = [seq.token_ids[-1] for seq in seqs]
            positions = torch.cat([seq.positions(seq.num_tokens - 1, seq.num_tokens) for seq in seqs], dim=1)
            slots = [self._slots(seq, seq.num_tokens - 1, seq.num_tokens)[0] for seq in seqs]
            context_lens = self._tensor([seq.num_tokens for seq in seqs])
            max_blocks = max(len(seq.block_table) for seq in seqs)
            tables = self._tensor([seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in seqs])
            positions_in_blocks = torch.arange(max_blocks * bs, device=self.device)
            mask = (positions_in_blocks[None, :] < context_lens[:, None])[:, None, None, :]
            ctx = StepContext(False, self._tensor(slots).t(), block_tables=tables, context_mask=mask,
                              context_lens=context_lens)
            rows = torch.arange(len(seqs), device=self.device)
            logits = self.model(self._tensor(ids), positions.to(self.device), rows, ctx)
        return logits
