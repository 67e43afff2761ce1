"""Linears that know their tensor-parallel share and how to cut it out of a checkpoint tensor.

Every parameter carries a `weight_loader(param, source, name, shard_id)`; `source` is a checkpoint tensor read
lazily (`rows`, `cols`, `full`, `shape`), so a rank reads only its own slice. The loader in `atb_models.weights`
only maps checkpoint names to (parameter, shard id): how a layer is sharded lives here, beside the layer.
"""
import torch
from torch import nn

from atb_models import distributed
from atb_models.errors import UserError
from atb_models.kernels.linear import LinearKernel, packed_rows
from atb_models.layers.sharding import HeadLayout, ceil_div, even_split


def pack_weights(model: nn.Module) -> int:
    """Once the weights are loaded: put every linear weight its kernel reads faster in another layout into that
    layout (the loaded tensor is let go, so memory stays the same). Returns how many were packed. An LM head tied
    to the embedding table is packed where it holds the whole table (one rank) and its kernel streams the kit's
    panels (pack_panels), whose rows the embedding then reads (Embedding.read_rows_from); else it stays as it is."""
    packed = 0
    for module in model.modules():
        if not isinstance(module, (Linear, VocabParallelLMHead)):
            continue
        tied = getattr(module, "shares_weight", False)
        if tied and not module.holds_whole_table():
            continue
        # A tied head takes panels or nothing: another layout (oneDNN's) would have no rows for the embedding.
        layout = (module.kernel.pack_panels if tied else module.kernel.pack)(module.weight.detach())
        if layout is None:
            continue
        module.weight = nn.Parameter(layout, requires_grad=False)
        if tied:
            module.tied_to.read_rows_from(module)
        packed += 1
    return packed


def _check_shape(name: str, expected: tuple, actual: tuple) -> None:
    if tuple(expected) != tuple(actual):
        raise UserError(f"checkpoint tensor {name} has shape {tuple(actual)}, the config implies {tuple(expected)}")


def default_weight_loader(param: torch.Tensor, source, name: str, shard_id=None) -> None:
    """A replicated parameter: the whole tensor."""
    _check_shape(name, param.shape, source.shape)
    param.data.copy_(source.full())


def _copy_padded(target: torch.Tensor, part: torch.Tensor, dim: int) -> None:
    """Copy `part` to the start of `target` along `dim` and zero the rest (zero heads, padded vocabulary rows)."""
    target.zero_()
    target.narrow(dim, 0, part.shape[dim]).copy_(part)


class Linear(nn.Module):
    """y = x W^T (+ b), replicated on every rank, parameters created in the compute dtype, computed by `kernel`
    (the model's Kernels.linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, kernel: LinearKernel):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.bias)

    def _set_loader(self, loader) -> None:
        self.weight.weight_loader = loader
        if self.bias is not None:
            self.bias.weight_loader = loader


class QKVParallelLinear(Linear):
    """q, k and v projections packed into one column-parallel matmul: this rank's query heads (zero heads
    included), then its key heads, then its value heads."""

    def __init__(self, hidden_size: int, head_dim: int, layout: HeadLayout, bias: bool, dtype: torch.dtype,
                 kernel: LinearKernel):
        self.head_dim = head_dim
        self.layout = layout
        self.q_size = layout.q_per_rank * head_dim
        self.kv_size = layout.kv_per_rank * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias, dtype, kernel)
        self._set_loader(self._load)

    def _load(self, param, source, name, shard_id) -> None:
        d, layout = self.head_dim, self.layout
        if shard_id == "q":
            heads, (first, count), offset, size = layout.num_heads, layout.real_q_heads(), 0, self.q_size
        else:
            heads, first, count = layout.num_kv_heads, layout.first_kv, layout.kv_per_rank
            offset, size = (self.q_size, self.kv_size) if shard_id == "k" else (self.q_size + self.kv_size,
                                                                                self.kv_size)
        _check_shape(name, (heads * d, *param.shape[1:]), source.shape)
        _copy_padded(param.data.narrow(0, offset, size), source.rows(first * d, (first + count) * d), 0)


class MergedColumnParallelLinear(Linear):
    """Linears sharing one input (gate and up), each split by output rows, stored as one matmul."""

    def __init__(self, in_features: int, out_features: int, shard_ids: tuple, dtype: torch.dtype,
                 kernel: LinearKernel):
        self.full_size = out_features
        self.start, self.size = even_split(out_features, distributed.tp_size(), distributed.tp_rank(),
                                           "intermediate_size")
        self.shard_ids = shard_ids
        super().__init__(in_features, self.size * len(shard_ids), False, dtype, kernel)
        self._set_loader(self._load)

    def _load(self, param, source, name, shard_id) -> None:
        _check_shape(name, (self.full_size, *param.shape[1:]), source.shape)
        target = param.data.narrow(0, self.shard_ids.index(shard_id) * self.size, self.size)
        target.copy_(source.rows(self.start, self.start + self.size))

    def split(self, y: torch.Tensor):
        return y.split(self.size, dim=-1)


class MergedReplicatedLinear(Linear):
    """Linears sharing one input (a replicated MLP's gate and up, with biases), stored as one matmul on every
    rank: each checkpoint piece fills its block of output rows."""

    def __init__(self, in_features: int, out_features: int, shard_ids: tuple, bias: bool, dtype: torch.dtype,
                 kernel: LinearKernel):
        self.size = out_features
        self.shard_ids = shard_ids
        super().__init__(in_features, out_features * len(shard_ids), bias, dtype, kernel)
        self._set_loader(self._load)

    def _load(self, param, source, name, shard_id) -> None:
        block = param.data.narrow(0, self.shard_ids.index(shard_id) * self.size, self.size)
        _check_shape(name, block.shape, source.shape)
        block.copy_(source.full())

    def split(self, y: torch.Tensor):
        return y.split(self.size, dim=-1)


class RowParallelLinear(Linear):
    """Split by input columns: each rank multiplies its share, then one all-reduce sums the partial outputs.
    `columns` is (first, count) of the checkpoint's input columns this rank holds; the rest of its
    `in_features` are zero padding."""

    def __init__(self, in_features_full: int, in_features: int, columns: tuple, out_features: int,
                 dtype: torch.dtype, kernel: LinearKernel):
        self.in_features_full = in_features_full
        self.columns = columns
        super().__init__(in_features, out_features, False, dtype, kernel)
        self._set_loader(self._load)

    def _load(self, param, source, name, shard_id=None) -> None:
        _check_shape(name, (param.shape[0], self.in_features_full), source.shape)
        first, count = self.columns
        _copy_padded(param.data, source.cols(first, first + count), 1)

    def load_scale(self, param, source, name, shard_id=None) -> None:
        """The scales [out, groups] of an int8 weight (atb_models.quantization): one per output channel is whole on
        every rank; per-group scales are split with their columns, which must hold whole groups."""
        groups = source.shape[1] if len(source.shape) == 2 else 0
        if groups == 1:
            default_weight_loader(param, source, name)
            return
        group = self.in_features_full // groups if groups else 0
        described = self.weight.shape[1] // param.shape[1]  # (the description's group size; per channel: the input)
        if group != described:
            raise UserError(f"{name}: scales of shape {tuple(source.shape)}, where the quantization description's "
                            f"group_size gives {param.shape[1]} scale(s) a row on this rank: the checkpoint is damaged")
        first, count = self.columns
        if not group or first % group or count % group:
            raise UserError(f"{name}: scales of shape {source.shape} do not split into whole groups at this world "
                            f"size (input columns {first}..{first + count}); use per-channel scales or another "
                            "world size")
        _check_shape(name, (param.shape[0], self.in_features_full // group), source.shape)
        _copy_padded(param.data, source.cols(first // group, (first + count) // group), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(self.kernel(x, self.weight))


class Embedding(nn.Module):
    """The token embedding table, replicated on every rank. Where the LM head tied to it holds the whole table and
    packs it for the kit's kernels (pack_weights), the rows are read from the head's packed weight instead and the
    plain table is let go: one copy in memory, and the head streamed by the kit's panel kernel, several times as fast
    as oneDNN on the plain table at Qwen2-VL-2B's size (docs/PERFORMANCE.md)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)
        self.dtype = dtype
        self.packed_head = None  # the LM head whose packed weight holds the rows, once pack_weights has packed it

    def read_rows_from(self, head: "VocabParallelLMHead") -> None:
        object.__setattr__(self, "packed_head", head)  # a reference, not a submodule: the head is the model's
        self.weight = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.packed_head is not None:  # the same values: the packing keeps every value's bits
            return packed_rows(self.packed_head.weight, input_ids).to(self.dtype)
        return nn.functional.embedding(input_ids, self.weight)


class VocabParallelLMHead(nn.Module):
    """The LM head split by vocabulary rows; logits of all ranks are gathered so each rank can sample."""

    def __init__(self, hidden_size: int, vocab_size: int, dtype: torch.dtype, kernel: LinearKernel):
        super().__init__()
        self.kernel = kernel
        self.vocab_size = vocab_size
        world, rank = distributed.tp_size(), distributed.tp_rank()
        self.rows_per_rank = ceil_div(vocab_size, world)
        self.first = rank * self.rows_per_rank
        self.count = max(0, min(self.rows_per_rank, vocab_size - self.first))
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param, source, name, shard_id=None) -> None:
        _check_shape(name, (self.vocab_size, param.shape[1]), source.shape)
        _copy_padded(param.data, source.rows(self.first, self.first + self.count), 0)

    def tie_to(self, embedding: "Embedding") -> None:
        """Share the (replicated) embedding table's rows instead of a weight of its own."""
        rows = embedding.weight[self.first:self.first + self.count]
        if self.count == self.rows_per_rank:
            self.weight = nn.Parameter(rows, requires_grad=False)  # a view: no copy
            self.shares_weight = True
            object.__setattr__(self, "tied_to", embedding)  # a reference, not a submodule: the model holds it
        else:
            _copy_padded(self.weight.data, rows, 0)

    def holds_whole_table(self) -> bool:
        """Whether this head's rows are all of its embedding table's (one rank), where it shares them."""
        return getattr(self, "shares_weight", False) and self.first == 0 and self.count == self.vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = distributed.all_gather_last_dim(self.kernel(x, self.weight))
        return logits[..., :self.vocab_size]
