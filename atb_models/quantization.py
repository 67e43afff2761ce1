"""Weight-only int8 (W8A16): which linears are int8, how a checkpoint says so, and the model's int8 form.

A quantized checkpoint (written by `python -m atb_models.quantize`) follows MindIE's convention: config.json holds
`"quantize": "w8a16"`, and quant_model_description.json names each tensor's format (`"W8A16"` or `"FLOAT"`), with
the kit's `"group_size"` (0: one scale per output channel). An int8 tensor `X.weight` comes with its float32 scales
`X.weight_scale` [out, groups]. The language model's linears (q/k/v, o, gate/up, down) are quantized, the LM head
only when asked; embeddings, norms and the vision tower stay as they were.

`LLM(path, quantize="w8a16")` on a float checkpoint builds the same int8 model and quantizes each tensor as it is
read (atb_models.weights), with the same function as the tool, so the two give identical bytes.

A GPTQ checkpoint (config.json's `quantization_config`, as AutoGPTQ and GPTQModel write it and as the published
Qwen2-VL GPTQ-Int8 models hold it) runs as W8A16 too where it is 8-bit and symmetric: its packed weights, zero points
and scales are rewritten into the kit's int8 weights and scales as they load (`gptq_to_int8`), losslessly.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from atb_models.cli.choices import QUANTIZE_CHOICES
from atb_models.errors import UserError

METHODS = QUANTIZE_CHOICES  # what --quantize offers
DESCRIPTION_FILE = "quant_model_description.json"
# The language model's quantizable linears, as the kit's module names end (q/k/v and gate/up are packed).
LAYER_LINEARS = (".self_attn.qkv_proj", ".self_attn.o_proj", ".mlp.gate_up_proj", ".mlp.down_proj")
# The checkpoint tensors behind them, as the checkpoint's classic names end.
CHECKPOINT_LINEARS = tuple(f".{part}.weight" for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                           "mlp.down_proj"))


@dataclass(frozen=True)
class Quantization:
    method: str                   # "w8a16"
    group_size: int | None        # None: one scale per output channel
    lm_head: bool = False         # the LM head quantized too
    from_float: bool = False      # the checkpoint is float: each tensor is quantized as it is read
    gptq_format: str | None = None  # "gptq" / "gptq_v2": a GPTQ checkpoint, its tensors rewritten as they load

    def describe(self) -> str:
        scales = "per output channel" if self.group_size is None else f"per group of {self.group_size}"
        head = ", LM head included" if self.lm_head else ""
        made = ("quantized as loaded" if self.from_float else
                f"from a GPTQ checkpoint ({self.gptq_format})" if self.gptq_format else "from a quantized checkpoint")
        return f"{self.method} ({scales}{head}, {made})"


def check_method(method) -> str:
    if method not in METHODS:
        raise UserError(f"quantize {method!r}: the kit knows {', '.join(METHODS)}")
    return method


def checkpoint_quantization(model_path: str, raw_config: dict) -> Quantization | None:
    """The quantization a checkpoint folder holds (config.json's "quantize", or a GPTQ `quantization_config`), or
    None for a float checkpoint."""
    method = raw_config.get("quantize")
    if "quantization_config" in raw_config:
        if method is not None:
            raise UserError(f"{model_path}: config.json holds both \"quantize\" and \"quantization_config\"; a "
                            "checkpoint is quantized one way")
        return gptq_quantization(os.path.join(model_path, "config.json"), raw_config["quantization_config"])
    if method is None:
        return None
    check_method(str(method).lower())
    path = os.path.join(model_path, DESCRIPTION_FILE)
    try:
        with open(path) as f:
            description = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_path} says quantize {method!r} but {DESCRIPTION_FILE} cannot be read: {e}") from None
    group = description.get("group_size", 0) if isinstance(description, dict) else None
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        raise UserError(f"{path}: group_size must be 0 (per channel) or a positive integer, got {group!r}")
    lm_head = any(name.endswith("lm_head.weight") and kind == "W8A16" for name, kind in description.items())
    return Quantization(str(method).lower(), group or None, lm_head)


GPTQ_FORMATS = ("gptq", "gptq_v2")  # v1 stores each zero point less one; GPTQModel's v2 stores it as it is
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # a GPTQ linear's tensors, beside its bias


def gptq_quantization(config_file: str, spec) -> Quantization:
    """What a GPTQ `quantization_config` runs as: 8-bit symmetric weights are the kit's W8A16 (q - 128 is the int8
    weight, the group's scale its scale); any other kind is refused here, before anything loads."""
    where = f"{config_file}: quantization_config"
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be an object, got {type(spec).__name__}")
    method = str(spec.get("quant_method", "")).lower()
    if method != "gptq":
        raise UserError(f"{where} quant_method {spec.get('quant_method')!r}: the kit runs 8-bit GPTQ checkpoints and "
                        "its own W8A16 (python -m atb_models.quantize), no other quantized format")
    bits, group = spec.get("bits"), spec.get("group_size", -1)
    if bits != 8 or isinstance(bits, bool):
        raise UserError(f"{where}: GPTQ with {bits!r}-bit weights; the kit runs 8-bit weights only (W8A16)")
    if spec.get("sym", True) is not True:
        raise UserError(f"{where}: asymmetric GPTQ (sym false) has zero points the kit's int8 weights cannot hold")
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise UserError(f"{where}: group_size must be -1 (per channel) or a positive integer, got {group!r}")
    checkpoint_format = spec.get("checkpoint_format", "gptq")
    if checkpoint_format not in GPTQ_FORMATS:
        raise UserError(f"{where}: checkpoint_format {checkpoint_format!r}; the kit reads {', '.join(GPTQ_FORMATS)}")
    return Quantization("w8a16", None if group == -1 else group, lm_head=spec.get("lm_head", False) is True,
                        gptq_format=checkpoint_format)


def gptq_to_int8(name: str, tensors: dict, gptq_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One 8-bit GPTQ linear's tensors (`GPTQ_TENSORS`: qweight int32 [in/4, out] holding input 4r+j in byte j of
    row r, qzeros int32 [groups, out/4] the same way along the outputs, scales [groups, out], g_idx [in] or absent
    where the inputs are in group order) as the kit's int8 weight [out, in] and float32 scales [out, groups]: the
    weight is q - zero, the same values exactly. Zero points other than 128 (asymmetric) and inputs out of group
    order (act-order) are refused."""
    qweight, qzeros, scales = (tensors[part] for part in GPTQ_TENSORS[:3])
    g_idx = tensors.get("g_idx")  # None: the inputs in group order
    int_types = (torch.int32, torch.uint32)
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2 or (g_idx is not None and g_idx.dim() != 1) \
            or qweight.dtype not in int_types or qzeros.dtype not in int_types or not scales.is_floating_point():
        kinds = ", ".join(f"{part} {tuple(t.shape)} {t.dtype}" for part, t in tensors.items())
        raise UserError(f"{name}: GPTQ tensors {kinds} are not an 8-bit GPTQ linear's: the checkpoint is damaged")
    in_features, out_features = qweight.shape[0] * 4, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != out_features or tuple(qzeros.shape) != (groups, out_features // 4) or out_features % 4 \
            or not groups or in_features % groups or (g_idx is not None and g_idx.shape[0] != in_features):
        shapes = ", ".join(f"{part} {tuple(t.shape)}" for part, t in tensors.items())
        raise UserError(f"{name}: GPTQ tensors of shapes {shapes} do not fit one 8-bit linear: the checkpoint is "
                        "damaged")
    shifts = torch.arange(0, 32, 8, dtype=torch.int32)
    values = (qweight.to(torch.int32).unsqueeze(1) >> shifts.view(1, 4, 1)) & 0xFF  # [in/4, 4, out]
    zeros = ((qzeros.to(torch.int32).unsqueeze(2) >> shifts.view(1, 1, 4)) & 0xFF).reshape(groups, out_features)
    if gptq_format == "gptq":
        zeros = zeros + 1
    if not bool((zeros == 128).all()):
        raise UserError(f"{name}: GPTQ zero points other than 128 (an asymmetric quantization) cannot be held in the "
                        "kit's int8 weights")
    in_order = torch.arange(in_features) // (in_features // groups)
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), in_order):
        raise UserError(f"{name}: GPTQ inputs out of group order (act-order, desc_act) are not supported: quantize "
                        "with desc_act false")
    weight = (values.reshape(in_features, out_features) - 128).to(torch.int8).t().contiguous()
    return weight, scales.to(torch.float32).t().contiguous()


def resolve(requested: str | None, stored: Quantization | None) -> Quantization | None:
    """What the model runs: the checkpoint's quantization, or `requested` applied at load to a float checkpoint."""
    if requested in (None, "none", ""):
        return stored
    method = check_method(requested)
    if stored is not None:
        if stored.method != method:
            raise UserError(f"the checkpoint is quantized {stored.method}; it cannot run as {method}")
        return stored
    return Quantization(method, None, from_float=True)


def quantized_module_names(model: nn.Module, quantization: Quantization) -> list[str]:
    names = [name for name, _ in model.named_modules()
             if name.startswith("model.layers.") and name.endswith(LAYER_LINEARS)]
    return names + (["lm_head"] if quantization.lm_head else [])


def convert_to_w8a16(model: nn.Module, quantization: Quantization, kernel) -> int:
    """Before loading: give each quantized linear an int8 weight and float32 scales [out, groups] in place of its
    float weight, computed by `kernel` (Kernels.w8a16). Returns how many were converted."""
    modules = dict(model.named_modules())
    names = quantized_module_names(model, quantization)
    if quantization.lm_head and getattr(model, "tie_word_embeddings", False):
        raise UserError("the checkpoint quantizes its LM head, but the LM head is tied to the embedding table: "
                        "quantize it without --quantize_lm_head")
    for name in names:
        module = modules[name]
        out_features, in_features = module.weight.shape
        group = quantization.group_size or in_features
        if in_features % group:
            raise UserError(f"{name}: group size {group} does not divide its {in_features} input columns on this "
                            "rank; use per-channel scales or another world size")
        loader = module.weight.weight_loader
        module.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8,
                                                 device=module.weight.device), requires_grad=False)
        module.weight.weight_loader = loader
        module.weight_scale = nn.Parameter(torch.zeros(out_features, in_features // group, dtype=torch.float32,
                                                       device=module.weight.device), requires_grad=False)
        module.weight_scale.weight_loader = getattr(module, "load_scale", loader)
        module.kernel = ScaledKernel(kernel, module.weight_scale)
    return len(names)


class ScaledKernel:
    """A quantized linear's kernel as its module calls it, kernel(x, weight, bias): the W8A16 kernel with the
    module's scales."""

    def __init__(self, kernel, scale: nn.Parameter):
        self.kernel = kernel
        self.scale = scale
        self.name = f"w8a16 {kernel.name}"

    def __call__(self, x, weight, bias=None):
        return self.kernel(x, weight, bias, self.scale)

    def pack(self, weight):
        return self.kernel.pack(weight, self.scale)
