"""Linears whose parameters carry a `weight_loader` that cuts their own piece out of a checkpoint tensor.

The loader in `atb_models.weights` only maps a checkpoint name to (parameter, shard id) and calls the parameter's
`weight_loader`; how a packed parameter is filled lives here, beside the layer it concerns.
"""
import torch
import torch.nn.functional as F
from torch import nn

from atb_models.errors import UserError


def _check_shape(name: str, expected: torch.Size, loaded: torch.Tensor) -> None:
    if tuple(expected) != tuple(loaded.shape):
        raise UserError(f"checkpoint tensor {name} has shape {tuple(loaded.shape)}, the config implies {tuple(expected)}")


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, name: str, shard_id=None) -> None:
    _check_shape(name, param.shape, loaded)
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b) with parameters created in the given dtype (no float32 detour on load)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear(Linear):
    """Several checkpoint linears sharing one input, stored as one matrix so one matmul computes them all
    (q/k/v, gate/up). `shard_sizes` maps each shard id to its output rows, in storage order."""

    def __init__(self, in_features: int, shard_sizes: dict, bias: bool, dtype: torch.dtype):
        super().__init__(in_features, sum(shard_sizes.values()), bias, dtype)
        self.shard_offsets = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        self.weight.weight_loader = self._load_shard
        if bias:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: torch.Tensor, loaded: torch.Tensor, name: str, shard_id) -> None:
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)
        _check_shape(name, target.shape, loaded)
        target.copy_(loaded)

    def split(self, y: torch.Tensor) -> list:
        return list(y.split([size for _, size in self.shard_offsets.values()], dim=-1))
