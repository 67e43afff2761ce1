"""Loading safetensors checkpoints into the kit's model.

Each tensor is read on its own (memory-mapped), converted to the dtype of the parameter it fills, and handed to
that parameter's `weight_loader`; peak host memory is the model plus one tensor. How a family's checkpoints name
their tensors, in every layout they come in, is the registry's (`ModelFamily.parameter_name`, atb_models.models);
which checkpoint tensors feed one packed parameter is the model's (`packed_modules`).
"""
import json
import os

import torch

from safetensors import safe_open

from atb_models.errors import UserError
from atb_models.layers.linear import default_weight_loader
from atb_models.models import model_family


def checkpoint_files(model_path: str) -> dict:
    """Map every tensor name in the checkpoint to the file holding it."""
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {index}: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise UserError(f"{index}: weight_map must map tensor names to shard file names")
        roots = _shard_roots(model_path)
        for name, f in weight_map.items():
            if os.path.isabs(f) or not _inside(os.path.join(model_path, f), roots):
                raise UserError(f"{index} names shard {f!r} for {name}, which lies outside {model_path}; shards "
                                "must be files of the model folder")
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(model_path, f))})
        if missing:
            raise UserError(f"{index} names shard {missing[0]}, which is not in {model_path}")
        # Each shard's header read now (a truncated or corrupt one, a tensor it lacks), so that no reader of the
        # checkpoint meets safetensors' own error later.
        for f in sorted(set(weight_map.values())):
            held = _shard_keys(os.path.join(model_path, f))
            absent = sorted(name for name, shard in weight_map.items() if shard == f and name not in held)
            if absent:
                raise UserError(f"{index} names shard {f} for {absent[0]}, which that shard does not hold")
        return {name: os.path.join(model_path, f) for name, f in weight_map.items()}
    files = sorted(f for f in os.listdir(model_path) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"no *.safetensors weights in {model_path}")
    names = {}
    for f in files:
        path = os.path.join(model_path, f)
        names.update((name, path) for name in _shard_keys(path))
    return names


def _shard_keys(path: str) -> set:
    """The tensor names in a safetensors file's header; a file safetensors cannot open is a UserError."""
    try:
        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"cannot read weights file {path}: {e}") from None


def _shard_roots(model_path: str) -> tuple:
    """Folders a shard may really live in: the model folder, and for a Hugging Face hub snapshot
    (<repo>/snapshots/<revision>, whose files are links into <repo>/blobs) that repository's blobs folder."""
    folder = os.path.realpath(model_path)
    parent = os.path.dirname(folder)
    if os.path.basename(parent) == "snapshots":
        return folder, os.path.join(os.path.dirname(parent), "blobs")
    return (folder,)


def _inside(path: str, roots: tuple) -> bool:
    """Whether `path`, links and `..` resolved, lies under one of `roots`."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, root]) == root for root in roots)


# safetensors' dtype names of the tensors a checkpoint may hold
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


class CheckpointTensor:
    """One checkpoint tensor, read lazily: a rank asks only for the rows or columns it holds, and what it reads
    is converted to `dtype` as it arrives. `bytes_read` counts what this process read of each tensor (in the
    file's dtype), so tests can check that a rank touched only its slices."""

    bytes_read: dict = {}

    def __init__(self, handle, name: str, dtype: torch.dtype, path: str):
        self.name = name
        self.path = path
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        self.file_dtype = _SAFETENSORS_DTYPES.get(self._slice.get_dtype(), torch.float32)
        self.dtype = dtype

    def _read(self, index) -> torch.Tensor:
        tensor = self._slice[index]
        if self.dtype.is_floating_point and not tensor.is_floating_point():
            raise UserError(f"tensor {self.name} in {self.path} holds {tensor.dtype} values where the model takes a "
                            "floating-point weight: the checkpoint does not belong to this model")
        if not self.dtype.is_floating_point and tensor.dtype != self.dtype:  # (an int32's values would wrap)
            raise UserError(f"tensor {self.name} in {self.path} holds {tensor.dtype} values where the model takes "
                            f"{self.dtype}: the checkpoint is damaged or not the kit's")
        read = CheckpointTensor.bytes_read
        read[self.name] = read.get(self.name, 0) + tensor.numel() * tensor.element_size()
        converted = tensor.to(self.dtype)
        # A NaN or inf weight turns every answer into garbage without a word; one pass over what was read finds it.
        if converted.is_floating_point() and not torch.isfinite(converted).all():
            if tensor.is_floating_point() and torch.isfinite(tensor).all():
                raise UserError(f"tensor {self.name} in {self.path} holds values beyond the range of {self.dtype}: "
                                "choose a wider --dtype")
            raise UserError(f"tensor {self.name} in {self.path} holds NaN or inf values: the checkpoint is damaged")
        return converted

    def full(self) -> torch.Tensor:
        return self._read(slice(None))

    def rows(self, start: int, end: int) -> torch.Tensor:
        return self._read(slice(start, end))

    def cols(self, start: int, end: int) -> torch.Tensor:
        return self._read((slice(None), slice(start, end)))


class LoadedTensor:
    """A tensor already in memory (an int8 weight or its scales quantized at load), read like a CheckpointTensor."""

    def __init__(self, tensor: torch.Tensor, name: str):
        self.name = name
        self.shape = tuple(tensor.shape)
        self._tensor = tensor

    def full(self) -> torch.Tensor:
        return self._tensor

    def rows(self, start: int, end: int) -> torch.Tensor:
        return self._tensor[start:end]

    def cols(self, start: int, end: int) -> torch.Tensor:
        return self._tensor[:, start:end]


def _quantized_at_load(source: CheckpointTensor, name: str) -> tuple[LoadedTensor, LoadedTensor]:
    """A float checkpoint tensor (read as float32) as int8 and its per-channel scales (atb_models.quantize's
    function: the same bytes as the tool writes). The whole tensor is read: a row's scale needs all its columns."""
    from atb_models.kernels.w8a16 import quantize

    q, scale = quantize(source.full())
    return LoadedTensor(q, name), LoadedTensor(scale, name + "_scale")


def _expected_names(params: dict, packed: dict) -> set:
    """The parameter names, packed ones split into their checkpoint pieces, that together fill `params`."""
    expected = set()
    for name in params:
        pieces = [piece for piece, (packed_piece, _) in packed.items() if packed_piece in name]
        if pieces:
            expected.update(name.replace(packed[p][0], p) for p in pieces)
        else:
            expected.add(name)
    return expected


def _gptq_linear(where: dict, name: str, gptq_format: str) -> tuple[LoadedTensor, LoadedTensor]:
    """A GPTQ linear (`name` its qweight) as the kit's int8 weight and scales, read whole from wherever its tensors
    lie (a sharded checkpoint may split them)."""
    from atb_models.quantization import GPTQ_TENSORS, gptq_to_int8

    base = name[:-len("qweight")]
    tensors = {}
    for part in GPTQ_TENSORS:
        if base + part not in where:
            if part == "g_idx":  # (some writers leave it out where the inputs are in group order)
                continue
            raise UserError(f"checkpoint tensor {name} has no {base + part} beside it: the GPTQ checkpoint is damaged")
        with safe_open(where[base + part], framework="pt") as handle:
            tensors[part] = handle.get_tensor(base + part)
    weight, scale = gptq_to_int8(base.rstrip("."), tensors, gptq_format)
    return LoadedTensor(weight, base + "weight"), LoadedTensor(scale, base + "weight_scale")


def load_weights(model, model_path: str, gptq_format: str | None = None) -> None:
    """Fill every parameter of `model` from the checkpoint; any tensor missing, unexpected or of the wrong shape
    is a UserError naming it. The tensors are named as the family of the model's config names them. gptq_format:
    the checkpoint is GPTQ's (atb_models.quantization.gptq_quantization); its linears load as int8."""
    family = model_family(model.config.model_type)
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    skip = set()
    if getattr(model, "tie_word_embeddings", False):
        # The head shares the embedding table; a copy in the checkpoint (some writers keep one) is not needed.
        skip.add("lm_head.weight")
        params.pop("lm_head.weight", None)
    where = checkpoint_files(model_path)
    by_file = {}
    for name, path in where.items():
        by_file.setdefault(path, []).append(name)
    gptq_parts = ()
    if gptq_format:
        from atb_models.quantization import GPTQ_TENSORS

        gptq_parts = tuple("." + part for part in GPTQ_TENSORS if part != "qweight")
    loaded = set()
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as handle:
            for name in names:
                canonical = family.parameter_name(name)
                if canonical in skip or canonical.endswith(gptq_parts):  # (a GPTQ linear's: read with its qweight)
                    continue
                gptq = bool(gptq_format) and canonical.endswith(".qweight")
                if gptq:
                    canonical = canonical[:-len("qweight")] + "weight"
                target, shard_id = canonical, None
                for piece, (packed_piece, shard) in packed.items():
                    if piece in canonical:
                        target, shard_id = canonical.replace(piece, packed_piece), shard
                        break
                param = params.get(target)
                if param is None:
                    raise UserError(f"unexpected tensor {name} in {path}: the {family.display_name} model has no "
                                    "such weight")
                loader = getattr(param, "weight_loader", default_weight_loader)
                scale = params.get(target + "_scale") if param.dtype == torch.int8 else None
                scale_source = None  # an int8 weight's scales made here, not read as a tensor of their own
                if gptq:
                    if scale is None:
                        raise UserError(f"tensor {name} in {path}: a GPTQ linear where the kit keeps {canonical} in "
                                        "floating point")
                    source, scale_source = _gptq_linear(where, name, gptq_format)
                else:
                    source = CheckpointTensor(handle, name, param.dtype, path)
                    if scale is not None and source.file_dtype.is_floating_point:
                        source, scale_source = _quantized_at_load(
                            CheckpointTensor(handle, name, torch.float32, path), name)
                if scale_source is not None:
                    scale.weight_loader(scale, scale_source, scale_source.name, shard_id)
                    loaded.add(canonical + "_scale")
                loader(param, source, name, shard_id)
                loaded.add(canonical)
    missing = sorted(_expected_names(params, packed) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {model_path} lacks tensor {missing[0]}{more}")
    model.after_loading()
