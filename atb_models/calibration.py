"""Calibrated weight-only int8: the quantize tool's `--algorithm gptq`.

Round-to-nearest (`rtn`, the tool's default and what quantize-at-load does) rounds each weight on its own; that is
the best a data-free method can do, and on a checkpoint whose logits sit close together it changes a few argmaxes in
a hundred. GPTQ (Frantar et al., 2022) rounds one input column at a time and moves each column's rounding error onto
the columns not yet rounded, weighted by H = E[x x^T] of the linear's input activations, so the error that reaches
the output (e^T H e per row) is what gets minimised, not the error of each weight.

H comes from a calibration pass of the float model: the calibration prompts (the tool's built-in set, or the images
and videos of --calib_data) are answered greedily, then each prompt with its answer is run once more as one prefill
while forward hooks on the language model's linears add x^T x. The layers are taken in passes small enough that
their Hessians fit HESSIAN_BUDGET_BYTES.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from atb_models.errors import UserError
from atb_models.host import process_temp_folder
from atb_models.kernels.w8a16 import QMAX

logger = logging.getLogger("atb_models")

# Bumped when the rounding or the built-in set changes: a cached calibrated checkpoint is then made anew.
VERSION = 1
DAMP = 0.01               # of H's mean diagonal, added to its diagonal so it inverts (standard GPTQ damping)
BLOCK = 128               # columns rounded before their errors are carried to the rest in one matmul
HESSIAN_BUDGET_BYTES = 4 << 30
CALIBRATION_TOKENS = 64   # the greedy answer each calibration prompt gets; its positions are calibrated too
# The built-in set: pictures the kit draws (seeds and sizes of its own, apart from the benchmark's) with a few
# generic questions, and text-only prompts.
BUILTIN_QUESTIONS = ("Describe this image.", "What is written in this picture?", "What shapes and colours do you see?",
                     "Read the text in the image aloud.")
BUILTIN_TEXTS = ("Write a short story about a lighthouse keeper.", "Explain how a bicycle gear works.")
BUILTIN_IMAGES = 8
# A checkpoint linear (as its classic name ends) -> the kit module that computes it (q/k/v and gate/up are packed).
PACKED_MODULE = {"self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
                 "self_attn.v_proj": "self_attn.qkv_proj", "self_attn.o_proj": "self_attn.o_proj",
                 "mlp.gate_proj": "mlp.gate_up_proj", "mlp.up_proj": "mlp.gate_up_proj",
                 "mlp.down_proj": "mlp.down_proj"}


def module_of(canonical: str) -> str:
    """The kit module whose input a checkpoint weight (canonical name, `...weight`) multiplies."""
    stem = canonical.removesuffix(".weight")
    if stem == "lm_head":
        return stem
    for part, module in PACKED_MODULE.items():
        if stem.endswith("." + part):
            return stem[: -len(part)] + module
    raise ValueError(f"{canonical} is not a quantized linear")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int | None = None,
                  damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], float32 scale [out, groups]) like kernels.w8a16.quantize, with GPTQ's error feedback under
    `hessian` [in, in]. A group's scale is taken from its columns as they stand when the group is reached (the
    errors carried onto them included); with a diagonal hessian nothing is carried and the result is
    round-to-nearest's, bit for bit."""
    w = weight.float().clone()
    out_features, in_features = w.shape
    group = in_features if group_size is None else group_size
    if in_features % group:
        raise ValueError(f"group size {group} does not divide {in_features} input columns")
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # an input that never fires: its column cannot matter, round it to zero
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    # The upper Cholesky factor of H^-1: row i holds how column i's error spreads over the columns after it.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.empty(out_features, in_features, dtype=torch.int8)
    scale = torch.empty(out_features, in_features // group, dtype=torch.float32)
    block = group if group_size is not None else min(BLOCK, in_features)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        if start % group == 0:
            amax = w[:, start:start + group].abs().amax(dim=1)
            scale[:, start // group] = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
        s = scale[:, start // group]
        cols = w[:, start:end].clone()
        errors = torch.empty_like(cols)
        ub = u[start:end, start:end]
        for i in range(end - start):
            rounded = torch.round(cols[:, i] / s).clamp_(-QMAX, QMAX)
            q[:, start + i] = rounded.to(torch.int8)
            err = (cols[:, i] - rounded * s) / ub[i, i]
            cols[:, i:].addr_(err, ub[i, i:], alpha=-1)
            errors[:, i] = err
        w[:, end:].addmm_(errors, u[start:end, end:], alpha=-1)
    return q, scale


class Hessians:
    """Forward hooks that add x^T x of each named module's input (float32, summed over every token position)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def add(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float().cpu()
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[1], x.shape[1])
                self.rows[name] = 0
            self.sums[name].addmm_(x.T, x)
            self.rows[name] += x.shape[0]
        return add

    def mean(self, name: str) -> torch.Tensor:
        if name not in self.sums:
            raise UserError(f"the calibration pass never reached {name}")
        return self.sums[name] / self.rows[name]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def builtin_requests(media_dir: Path) -> list:
    """The built-in calibration prompts (their pictures drawn into media_dir)."""
    from atb_models.demo.checkpoint import make_image

    requests = []
    for i in range(BUILTIN_IMAGES):
        path = media_dir / f"calibration_{i}.png"
        make_image(path, width=224 + 28 * (i % 5), height=224 + 28 * ((3 * i) % 5), seed=7000 + i)
        requests.append([{"image": str(path)}, {"text": BUILTIN_QUESTIONS[i % len(BUILTIN_QUESTIONS)]}])
    return requests + [[{"text": text}] for text in BUILTIN_TEXTS]


def folder_requests(folder: str, prompt: str) -> list:
    """One request per image or video of --calib_data, each asked `prompt`; anything else there is refused."""
    from atb_models.cli.inputs import Skipped, dataset_file_kind

    if not os.path.isdir(folder):
        raise UserError(f"--calib_data {folder}: " + ("not a folder" if os.path.exists(folder) else "no such folder"))
    requests = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            requests.append([{dataset_file_kind(name, path): path}, {"text": prompt}])
        except Skipped:
            continue
        except UserError as e:
            raise UserError(f"--calib_data: {e}") from None
    if not requests:
        raise UserError(f"--calib_data {folder}: no image or video in the folder")
    return requests


class Calibration:
    """The float model and its calibration samples (request plus greedy answer), ready to measure Hessians. A
    context manager: the built-in set's pictures live in a temporary folder until it closes."""

    def __init__(self, model_path: str, calib_data: str | None, prompt: str, tokens: int, device: str):
        from atb_models.engine.llm import LLM
        from atb_models.engine.sampling_params import SamplingParams

        if tokens < 1:
            raise UserError(f"--calib_tokens must be at least 1, got {tokens}")
        requests = folder_requests(calib_data, prompt) if calib_data else None  # refused before the model loads
        self._media = process_temp_folder("atb-calibration-")
        try:
            if requests is None:
                requests = builtin_requests(Path(self._media))
            self.llm = LLM(model_path, device=device, max_batch_size=4, enable_prefix_caching=False,
                           max_output_length=tokens)
            outputs = self.llm.generate(requests, SamplingParams(max_tokens=tokens, ignore_eos=True))
        except BaseException:
            shutil.rmtree(self._media, ignore_errors=True)
            raise
        failed = [out.error for out in outputs if out.error is not None]
        if failed:
            self.close()
            raise UserError(f"a calibration prompt failed: {failed[0]}")
        self.samples = [(request, out.token_ids) for request, out in zip(requests, outputs)]
        logger.info("calibration: %d prompts, %d positions", len(self.samples),
                    sum(out.prompt_token_count + len(out.token_ids) for out in outputs))

    def hessians(self, names: list[str]) -> Hessians:
        """H of each named module's input over every calibration sample."""
        hooks = Hessians(self.llm.runner.model, names)
        try:
            with torch.inference_mode():
                for request, tokens in self.samples:
                    self.llm.teacher_forced_logits(request, tokens)
        finally:
            hooks.remove()
        return hooks

    def close(self) -> None:
        self.llm.close()
        shutil.rmtree(self._media, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def passes(names: list[str], in_features: dict[str, int], budget: int = HESSIAN_BUDGET_BYTES) -> list[list[str]]:
    """`names` (modules, in model order) cut into consecutive passes whose float32 Hessians fit `budget` (one
    module per pass at least)."""
    out, current, used = [], [], 0
    for name in names:
        size = in_features[name] ** 2 * 4
        if current and used + size > budget:
            out.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return out + [current] if current else out
